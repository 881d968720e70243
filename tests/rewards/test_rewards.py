"""Tests for rlhf_lightning.rewards: every reward source, validation and Hydra selection."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rlhf_lightning.errors import UserError
from rlhf_lightning.models import (
    ModelNotAvailableError,
    ScalarRewardModel,
    load_tokenizer,
)
from rlhf_lightning.models.tiny import TINY_LLAMA_CONFIG, build_char_tokenizer
from rlhf_lightning.rewards import (
    CallableReward,
    ClassifierReward,
    LearnedReward,
    RewardError,
    RewardSource,
    TokenFractionReward,
    VaderReward,
    build_reward,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "reward"


def my_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A user reward function: response length minus prompt length."""
    return [float(len(r) - len(p)) for p, r in zip(prompts, responses, strict=True)]


def _load_reward_config(name: str, **overrides):
    config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return OmegaConf.merge(config, overrides)


# --- rule-based ------------------------------------------------------------------------------


def test_token_fraction_reward():
    reward = TokenFractionReward("e")
    scores = reward(["ignored", "", "x"], ["eee", "abe", ""])
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, torch.tensor([1.0, 1 / 3, 0.0]))
    with pytest.raises(ValueError, match="single character"):
        TokenFractionReward("ee")


def test_vader_reward_ranks_sentiment_and_ignores_prompt():
    reward = VaderReward()
    scores = reward(
        ["Review:", "Review:", "Something awful happened."],
        ["I love this wonderful, great movie!", "This was terrible and boring.", " It is fine."],
    )
    assert scores[0] > 0.5 and scores[1] < -0.5
    alone = reward(["Something wonderful happened."], [" It is fine."])
    assert alone.item() == scores[2].item()


def test_reward_configs_instantiate():
    token_fraction = instantiate(_load_reward_config("token_fraction"))
    assert isinstance(token_fraction, TokenFractionReward) and token_fraction.target == "e"
    assert isinstance(instantiate(_load_reward_config("vader")), VaderReward)
    assert OmegaConf.is_missing(_load_reward_config("learned"), "path")


# --- callables and validation ----------------------------------------------------------------


def test_callable_reward_from_function_and_import_paths():
    prompts, responses = ["ab", "a"], ["abcd", ""]
    expected = torch.tensor([2.0, -1.0])
    for fn in (
        my_reward,
        "tests.rewards.test_rewards:my_reward",
        "tests.rewards.test_rewards.my_reward",
    ):
        reward = CallableReward(fn)
        assert reward.name == "my_reward"
        scores = reward(prompts, responses)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, expected)


def test_hydra_target_partial_selects_user_function():
    config = OmegaConf.create(
        {"_target_": "tests.rewards.test_rewards.my_reward", "_partial_": True}
    )
    reward = build_reward(instantiate(config))
    assert isinstance(reward, CallableReward)
    torch.testing.assert_close(reward(["x"], ["xyz"]), torch.tensor([2.0]))


def test_build_reward():
    source = TokenFractionReward("a")
    assert build_reward(source) is source
    assert isinstance(build_reward("tests.rewards.test_rewards:my_reward"), CallableReward)
    with pytest.raises(TypeError, match="cannot use a int as a reward"):
        build_reward(3)


def three_scores(prompts, responses):
    return [1.0, 2.0, 3.0]


def column_of_scores(prompts, responses):
    return np.ones((len(responses), 1))


def words(prompts, responses):
    return ["good" for _ in responses]


def nothing(prompts, responses):
    return None


def one_nan(prompts, responses):
    return [1.0, math.nan, 0.0, 2.0]


def infinite(prompts, responses):
    return torch.tensor([math.inf, 0.0, -math.inf, 0.0])


def too_big_for_float32(prompts, responses):
    return [1e39, 0.0, 0.0, 0.0]


def one_number(prompts, responses):
    return 0.5


def with_a_none(prompts, responses):
    return [1.0, None, 0.0, 0.0]


def divides_by_zero(prompts, responses):
    return [1 / 0 for _ in responses]


class Scorer:
    """A callable object used as a reward: named by its class."""

    def __call__(self, prompts, responses):
        return [1.0]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (three_scores, r"three_scores returned 3 scores for 4 responses$"),
        (column_of_scores, r"column_of_scores returned shape \(4, 1\) for 4 responses"),
        (words, r"words returned a list of 4 \(str, e\.g\. 'good'\), which is not 4 numbers"),
        (nothing, r"nothing returned None; expected 4 numbers$"),
        (one_nan, r"one_nan returned non-finite scores at positions \[1\]: \[nan\]$"),
        (infinite, r"infinite returned non-finite scores at positions \[0, 2\]: \[inf, -inf\]"),
        (
            too_big_for_float32,
            r"float32 returned scores beyond the float32 range at positions \[0\]",
        ),
        (one_number, r"one_number returned shape \(\) for 4 responses"),
        (with_a_none, r"with_a_none returned a list of 4 \(NoneType/float, e\.g\. None\)"),
        (divides_by_zero, r"divides_by_zero raised ZeroDivisionError: division by zero$"),
        (Scorer(), r"Scorer returned 1 score for 4 responses$"),
    ],
)
def test_bad_reward_functions_give_one_reward_error(fn, message):
    reward = CallableReward(fn)
    with pytest.raises(
        RewardError, match=r"^reward tests\.rewards\.test_rewards\.\S*" + message
    ) as raised:
        reward(["p", "q", "r", "s"], ["a", "b", "c", "d"])
    assert isinstance(raised.value, UserError)
    if fn is divides_by_zero:  # the original exception stays chained for debugging
        assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_reward_source_subclass_errors_name_its_class():
    class Broken(RewardSource):
        def score(self, prompts, responses):
            return {"a": 1.0}

    with pytest.raises(
        RewardError, match=r"reward tests\.rewards\.test_rewards\..*Broken returned a dict"
    ):
        Broken()(["p"], ["r"])


def test_reward_inputs_must_pair_up():
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        TokenFractionReward("a")(["p", "q"], ["r"])


def test_bad_callables_give_clear_errors():
    with pytest.raises(ImportError, match="cannot import 'no_such_module'"):
        CallableReward("no_such_module:fn")
    with pytest.raises(ImportError, match="has no attribute 'missing'"):
        CallableReward("tests.rewards.test_rewards:missing")
    with pytest.raises(TypeError, match="not a callable"):
        CallableReward("tests.rewards.test_rewards:CONF_DIR")
    with pytest.raises(ValueError, match="expected 'pkg.module:function'"):
        CallableReward("nodots")


def test_scores_are_ordinary_tensors():
    scores = CallableReward(lambda p, r: torch.ones(len(r)))(["a"], ["b"])
    assert not scores.is_inference()
    scores[0] = -1.0  # callers may edit scores in place (e.g. a missing-EOS penalty)
    assert scores.tolist() == [-1.0]


def test_base_class_reports_missing_score():
    with pytest.raises(RewardError, match="RewardSource raised NotImplementedError"):
        RewardSource()(["a"], ["b"])


# --- extra prompt columns --------------------------------------------------------------------


def exact_match(prompts, responses, answer):
    """A verifiable reward: 1 when the response is the reference answer."""
    return [float(response == expected) for response, expected in zip(responses, answer)]


def sees_everything(prompts, responses, **columns):
    return [float(len(columns))] * len(responses)


def keyword_only(prompts, responses, *, answer, weight=2.0):
    return [weight * (response == expected) for response, expected in zip(responses, answer)]


def test_callable_reward_gets_the_columns_its_signature_names():
    columns = {"answer": ["4", "9"], "source": ["a", "b"]}
    prompts, responses = ["2+2=", "3*3="], ["4", "8"]
    assert CallableReward(exact_match)(prompts, responses, **columns).tolist() == [1.0, 0.0]
    assert CallableReward(keyword_only)(prompts, responses, **columns).tolist() == [2.0, 0.0]
    assert CallableReward(my_reward)(prompts, responses, **columns).tolist() == [-3.0, -3.0]
    assert CallableReward(sees_everything)(prompts, responses, **columns).tolist() == [2.0, 2.0]
    # A column named like the first parameters does not collide with them.
    assert CallableReward(sees_everything)(prompts, responses, prompts=[1, 2]).tolist() == [0, 0]
    partial_fn = functools.partial(keyword_only, weight=3.0)
    assert CallableReward(partial_fn)(prompts, responses, **columns).tolist() == [3.0, 0.0]


def test_a_parameter_no_column_fills_is_one_reward_error():
    expected = (
        r"^reward tests\.rewards\.test_rewards\.exact_match takes 'answer', which no column of "
        r"the prompt data fills \(columns given: 'source'\)"
    )
    with pytest.raises(RewardError, match=expected):
        CallableReward(exact_match)(["p"], ["r"], source=["x"])
    with pytest.raises(RewardError, match=r"\(columns given: none\)"):
        CallableReward(exact_match)(["p"], ["r"])


def test_builtin_sources_ignore_columns_and_subclasses_may_take_them():
    scores = TokenFractionReward("e")(["p"], ["ee"], answer=["x"], level=[3])
    assert scores.tolist() == [1.0]

    class Matches(RewardSource):
        def score(self, prompts, responses, answer):
            return [float(r == a) for r, a in zip(responses, answer)]

    assert Matches()(["p", "q"], ["a", "b"], answer=["a", "c"], extra=[0, 0]).tolist() == [1, 0]


def test_columns_must_have_one_value_per_prompt():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 prompts"):
        CallableReward(exact_match)(["p", "q"], ["r", "s"], answer=["x"])


# --- model-based -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    reward_model = ScalarRewardModel.from_backbone(tiny_model_dir)
    reward_model.set_normalization(gain=2.0, bias=-1.0)
    out_dir = tmp_path_factory.mktemp("reward_model")
    reward_model.save_pretrained(out_dir, load_tokenizer(tiny_model_dir))
    return out_dir


def _reference_scores(reward_model, tokenizer, texts: list[str], normalize: bool) -> torch.Tensor:
    """Score each text alone, unpadded: the naive reference for batched scoring."""
    scores = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        scores.append(reward_model(ids, torch.ones_like(ids), normalize=normalize))
    return torch.cat(scores)


def test_learned_reward_matches_unbatched_scoring(reward_model_dir: Path):
    prompts = ["Q: hi\nA:", "Q: why?\nA:", "x", "", "long prompt " * 3]
    responses = [" hello", " because.", "y", "z", " end"]
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    reward_model = ScalarRewardModel.from_pretrained(reward_model_dir)
    tokenizer = load_tokenizer(reward_model_dir)
    for normalize in (True, False):
        reward = LearnedReward(reward_model_dir, batch_size=2, normalize=normalize).to("cpu")
        expected = _reference_scores(reward_model, tokenizer, texts, normalize)
        torch.testing.assert_close(reward(prompts, responses), expected)


def test_learned_reward_truncates_from_the_left(tiny_model_dir: Path, tmp_path: Path):
    """A model trained on texts cut to their last 6 tokens is scored on the last 6."""
    from rlhf_lightning.data.preferences import RewardTextFormat

    torch.manual_seed(0)
    reward_model = ScalarRewardModel.from_backbone(
        tiny_model_dir, text_format=RewardTextFormat(joiner="", max_length=6)
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    reward_model.save_pretrained(tmp_path, tokenizer)
    reward = LearnedReward(tmp_path, normalize=False)
    expected = _reference_scores(reward_model, tokenizer, ["ending"], normalize=False)
    torch.testing.assert_close(reward(["a long prompt, then the "], ["ending"]), expected)


def test_learned_reward_rejects_incomplete_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        LearnedReward(tmp_path)


def test_learned_reward_config(reward_model_dir: Path):
    reward = instantiate(_load_reward_config("learned", path=str(reward_model_dir)))
    assert isinstance(reward, LearnedReward) and reward.normalize


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        **TINY_LLAMA_CONFIG,
    )
    torch.manual_seed(0)
    out_dir = tmp_path_factory.mktemp("classifier")
    LlamaForSequenceClassification(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def test_classifier_reward_is_the_label_logit(classifier_dir: Path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = build_char_tokenizer()
    prompts, responses = ["The film ", "A", ""], ["was great.", "wful, really", "ok"]
    expected = []
    for text in (p + r for p, r in zip(prompts, responses, strict=True)):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected.append(model(ids).logits[0, 1])
    reward = ClassifierReward(classifier_dir, label="POSITIVE", batch_size=2)
    torch.testing.assert_close(reward(prompts, responses), torch.stack(expected).detach())
    negative = ClassifierReward(classifier_dir, label="NEGATIVE")(prompts, responses)
    assert not torch.allclose(negative, torch.stack(expected).detach())


def test_classifier_reward_unknown_label_lists_labels(classifier_dir: Path):
    with pytest.raises(ValueError, match=r"its labels are \['NEGATIVE', 'POSITIVE'\]"):
        ClassifierReward(classifier_dir, label="positive")


def test_classifier_imdb_config_offline_fails_clearly():
    from huggingface_hub import try_to_load_from_cache

    config = _load_reward_config("classifier_imdb")
    if isinstance(try_to_load_from_cache(config.name_or_path, "config.json"), str):
        pytest.skip(f"{config.name_or_path} is in this machine's hub cache")
    with pytest.raises(Exception) as raised:
        instantiate(config)
    error = raised.value
    while not isinstance(error, ModelNotAvailableError) and error.__cause__ is not None:
        error = error.__cause__  # Hydra wraps errors raised by the target
    assert isinstance(error, ModelNotAvailableError)
    assert "lvwerra/distilbert-imdb: not reachable and not in the local cache" in str(error)
