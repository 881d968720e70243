"""Memory and speed options of the trained policy: LoRA adapters, gradient checkpointing, compile.

**LoRA** (Hu et al. 2021, through PEFT): low-rank adapters are injected *in place* into the
policy's linear layers (``inject_lora``), so the policy stays the plain ``*ForCausalLM`` object
(``generate``, ``base_model`` and ``get_output_embeddings`` work as before) and only the adapters
(and the value head) train. The frozen reference is then the same weights with the adapters
switched off (``AdaptersDisabled``): no second copy of the model is held, which is where LoRA's
memory saving in RLHF comes from (the reference copy and the full AdamW state both go away).
``merged_copy`` folds the adapters into a plain model for export.

**Gradient checkpointing** recomputes each decoder layer's activations during the backward pass
instead of storing them (``enable_gradient_checkpointing``): less memory, ~1/3 more compute.
transformers applies it only to modules in training mode, which is why ``PPOModule`` switches
the policy to ``train()`` (dropout is disabled at load) for the update.

**torch.compile** of the training forward: ``compile_policy`` compiles ``PolicyWithValueHead``
in place (``nn.Module.compile``, so ``state_dict`` keys do not change); ``generate`` is left eager.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    """Whether PEFT adapter layers are injected anywhere in ``model``."""
    try:
        return bool(_tuner_layers(model))
    except ImportError:  # peft not installed: no adapters either
        return False


def inject_lora(
    lm: nn.Module,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
) -> nn.Module:
    """Inject LoRA adapters into ``lm`` in place and freeze everything else; returns ``lm``.

    ``target_modules``: PEFT's names of the wrapped linear layers, or ``"all-linear"`` (every
    linear layer but the LM head). The adapters start as the identity (B = 0), so the policy
    equals the reference before the first update.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "policy.lora needs the PEFT package: pip install 'rlhf-lightning[lora]'"
        ) from err
    if isinstance(target_modules, str) and target_modules == "all-linear":
        target_modules = sorted(_linear_layer_names(lm))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
    )
    for param in lm.parameters():
        param.requires_grad_(False)
    try:
        inject_adapter_in_model(config, lm)  # only the new lora_* parameters require grad
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"policy.lora.target_modules={list(target_modules)}: {err}") from None
    if not has_adapters(lm):
        raise ValueError(f"policy.lora.target_modules={list(target_modules)} matched no layer")
    return lm


def _linear_layer_names(lm: nn.Module) -> set[str]:
    """Leaf names of the ``nn.Linear`` layers of ``lm`` except its output embeddings."""
    head = lm.get_output_embeddings()
    return {
        name.rsplit(".", 1)[-1]
        for name, module in lm.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model: every adapter layer off inside the block."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersDisabled:
    """The reference model of a LoRA policy: the policy's weights with the adapters off.

    Called like a causal LM (``ref(input_ids=..., ...)``, ``ref.generate(...)``). It is not an
    ``nn.Module`` on purpose: it owns no parameters (``PPOModule`` would otherwise freeze the
    policy's adapters as "reference weights"), and moving it is a no-op because it lives wherever
    the policy lives.
    """

    def __init__(self, lm: nn.Module) -> None:
        if not has_adapters(lm):
            raise ValueError("AdaptersDisabled needs a model with adapters (see inject_lora)")
        self.lm = lm

    def __call__(self, **kwargs):
        with adapters_disabled(self.lm):
            return self.lm(**kwargs)

    def generate(self, **kwargs):
        with adapters_disabled(self.lm):
            return self.lm.generate(**kwargs)

    @property
    def generation_config(self):
        """The policy LM's (``generate`` reads it from there)."""
        return self.lm.generation_config

    @generation_config.setter
    def generation_config(self, value) -> None:
        self.lm.generation_config = value

    def parameters(self):
        return self.lm.parameters()

    def to(self, *args, **kwargs) -> AdaptersDisabled:
        return self

    def eval(self) -> AdaptersDisabled:
        return self


def merged_copy(lm: nn.Module) -> nn.Module:
    """A copy of ``lm`` with its LoRA adapters folded into the weights (plain transformers
    layers, loadable without PEFT); ``lm`` itself is unchanged. Without adapters: a plain copy.
    """
    merged = copy.deepcopy(lm)
    if not has_adapters(merged):
        return merged
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        layer = merged.get_submodule(name)
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    return merged


def save_adapters(lm: nn.Module, out_dir, base_model: str | None = None) -> None:
    """The LoRA adapters of ``lm`` alone, in PEFT's format (``adapter_config.json``,
    ``adapter_model.safetensors``): ``PeftModel.from_pretrained(base, out_dir)`` rebuilds the
    trained policy from its base model."""
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config = copy.deepcopy(lm.peft_config["default"])
    config.base_model_name_or_path = base_model
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.save_pretrained(out_dir)
    state = get_peft_model_state_dict(lm)
    state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_policy(policy: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the policy's forward in place (``generate`` stays eager)."""
    policy.compile(**compile_kwargs)
    return policy
