"""LoRA (reference = adapters disabled), gradient checkpointing and torch.compile of the policy."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_lightning.cli.train import run
from rlhf_lightning.config import ConfigError, PolicyOptions, policy_options_from
from rlhf_lightning.evaluation import load_policy_for_inference
from rlhf_lightning.models import PolicyWithValueHead, load_causal_lm, load_tokenizer
from rlhf_lightning.models.adapters import (
    AdaptersDisabled,
    adapters_disabled,
    compile_policy,
    enable_gradient_checkpointing,
    has_adapters,
    inject_lora,
    merged_copy,
)
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards import TokenFractionReward
from tests.conftest import compose_config
from tests.ppo_helpers import fit, tiny_config


def _ids(n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    return ids, mask


def _logits(lm, ids, mask):
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask).logits


def _perturb_adapters(lm, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_starts_as_identity_trains_only_adapters_and_reference_is_the_base():
    base = load_causal_lm("builtin:tiny")
    lm = inject_lora(copy.deepcopy(base), r=4, alpha=8)
    ids, mask = _ids()
    torch.testing.assert_close(_logits(lm, ids, mask), _logits(base, ids, mask))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every linear layer but the LM head got adapters
    assert not has_adapters(lm.get_output_embeddings())
    assert {n.split(".")[-4] for n in trainable} >= {"q_proj", "v_proj", "down_proj"}

    _perturb_adapters(lm)
    ref = AdaptersDisabled(lm)
    assert not torch.allclose(_logits(lm, ids, mask), _logits(base, ids, mask), atol=1e-3)
    torch.testing.assert_close(_logits(ref, ids, mask), _logits(base, ids, mask))
    # the context manager restores the adapters, also after an exception
    with pytest.raises(RuntimeError), adapters_disabled(lm):
        raise RuntimeError
    assert not torch.allclose(_logits(lm, ids, mask), _logits(base, ids, mask), atol=1e-3)


def test_merged_copy_is_a_plain_model_with_the_adapted_outputs(tmp_path):
    lm = inject_lora(load_causal_lm("builtin:tiny"), r=4, alpha=8)
    _perturb_adapters(lm)
    ids, mask = _ids()
    merged = merged_copy(lm)
    assert not has_adapters(merged) and has_adapters(lm)  # the original keeps its adapters
    torch.testing.assert_close(_logits(merged, ids, mask), _logits(lm, ids, mask))
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids, mask), _logits(lm, ids, mask))


def test_lora_target_modules_that_match_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"policy\.lora\.target_modules=\['no_such_layer'\]"):
        inject_lora(load_causal_lm("builtin:tiny"), target_modules=["no_such_layer"])


def test_ppo_with_lora_moves_the_policy_and_never_the_reference():
    cfg = tiny_config(budget__num_iterations=3)
    tokenizer = load_tokenizer("builtin:tiny", padding_side="left")
    base = load_causal_lm("builtin:tiny")
    lm = inject_lora(copy.deepcopy(base), r=8, alpha=16)
    module = PPOModule(
        PolicyWithValueHead(lm),
        AdaptersDisabled(lm),
        tokenizer,
        TokenFractionReward("e"),
        cfg,
    )
    trainer, _ = fit(module, max_epochs=3)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    named = dict(module.policy.named_parameters())
    assert {n for n, p in named.items() if id(p) in optimized} == {
        n for n in named if "lora_" in n or n.startswith("value_head.")
    }
    ids, mask = _ids()
    torch.testing.assert_close(_logits(module.ref_lm, ids, mask), _logits(base, ids, mask))
    assert not torch.allclose(_logits(lm, ids, mask), _logits(base, ids, mask), atol=1e-4)


def _tiny_cfg(tmp_path, *overrides):
    from tests.tasks.test_tasks import TINY

    return compose_config([f"paths.output_dir={tmp_path}", *TINY, "task=ppo",
                           "reward=token_fraction", "~logger", "task.eval_every=0",
                           *overrides])  # fmt: skip


@pytest.mark.slow
def test_lora_ppo_run_exports_merged_weights_and_its_checkpoint_loads_the_same(tmp_path):
    run(_tiny_cfg(tmp_path, "peft=lora", "policy.lora.r=4"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert not has_adapters(exported)
    from_ckpt, _ = load_policy_for_inference(tmp_path / "checkpoints" / "last.ckpt")
    base = load_causal_lm("builtin:tiny")
    ids, mask = _ids()
    torch.testing.assert_close(_logits(from_ckpt, ids, mask), _logits(exported, ids, mask))
    assert not torch.allclose(_logits(exported, ids, mask), _logits(base, ids, mask), atol=1e-4)
    # The adapters alone, in PEFT's format, rebuild the same policy on the base model.
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(
        load_causal_lm("builtin:tiny"), tmp_path / "policy" / "adapter"
    )
    torch.testing.assert_close(_logits(adapted, ids, mask), _logits(exported, ids, mask))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["peft=lora", "policy.lora.r=0"], "policy.lora.r"),
        (["peft=lora", "policy.lora.dropout=1.0"], "policy.lora.dropout"),
        (["peft=lora", "policy.lora.target_modules=[]"], "policy.lora.target_modules"),
        (["peft=lora", "+policy.lora.rank=4"], "policy.lora.rank"),
        (["policy.compile=yes"], "policy.compile"),
        (["policy.gradient_checkpointing=maybe"], "policy.gradient_checkpointing"),
    ],
)
def test_bad_policy_options_fail_before_any_model_loads(tmp_path, overrides, key, monkeypatch):
    import rlhf_lightning.tasks.ppo as ppo_task

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ppo_task, "load_policy_lm", no_models)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(_tiny_cfg(tmp_path, *overrides))


def test_policy_options_default_to_off():
    assert policy_options_from({"name_or_path": "builtin:tiny"}) == PolicyOptions()


def _grads_and_saved_bytes(policy, ids, mask):
    """Gradients of a scalar of the policy's outputs, and the bytes autograd saved for backward."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    policy.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, values = policy(ids, mask, response_start=6)
        loss = logits.float().logsumexp(-1).mean() + values.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return grads, saved[0]


def test_gradient_checkpointing_saves_less_for_backward_and_gives_the_same_gradients():
    lm = load_causal_lm("builtin:tiny")
    plain, ckpt = PolicyWithValueHead(copy.deepcopy(lm)), PolicyWithValueHead(copy.deepcopy(lm))
    torch.nn.init.normal_(plain.value_head.weight)
    ckpt.value_head.load_state_dict(plain.value_head.state_dict())
    enable_gradient_checkpointing(ckpt.lm)
    ids, mask = _ids(n=4, t=32)
    ckpt.eval()  # transformers checkpoints only in training mode (PPOModule trains in train())
    _, saved_eval = _grads_and_saved_bytes(ckpt, ids, mask)
    plain.train(), ckpt.train()
    expected, saved_plain = _grads_and_saved_bytes(plain, ids, mask)
    got, saved_ckpt = _grads_and_saved_bytes(ckpt, ids, mask)
    assert saved_eval == saved_plain
    assert saved_ckpt < 0.5 * saved_plain  # the layers' activations are recomputed, not kept
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_compiled_policy_matches_eager_and_keeps_its_state_dict_keys():
    torch._dynamo.reset()
    lm = load_causal_lm("builtin:tiny")
    eager = PolicyWithValueHead(copy.deepcopy(lm))
    torch.nn.init.normal_(eager.value_head.weight)
    compiled = copy.deepcopy(eager)
    compile_policy(compiled, backend="aot_eager", dynamic=True)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    ids, mask = _ids()
    for response_start in (6, 8):  # two shapes, one dynamic graph
        e_logits, e_values = eager(ids, mask, response_start=response_start)
        c_logits, c_values = compiled(ids, mask, response_start=response_start)
        torch.testing.assert_close(c_logits, e_logits)
        torch.testing.assert_close(c_values, e_values)
    assert compiled._compiled_call_impl is not None
