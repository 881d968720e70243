"""Prompts from a `reasoning-gym` generator: problems with an exact, verifiable answer.

`reasoning-gym` (https://github.com/open-thought/reasoning-gym) holds 100+ procedural
generators; each makes problems ``{"question", "answer", "metadata"}`` from a seed and difficulty
settings, and scores an answer with its own verifier, ``dataset.score_answer(answer, entry)``
(`rlhf_lightning.rewards.ReasoningGymReward`).

`ReasoningGymPrompts` generates the problems of both splits instead of reading a file; the
rest (tokenising, the chat template, ``too_long``, batches) is `PromptDataModule`'s.

Splits. Item ``i`` of a generator at seed ``s`` is drawn from ``Random(s + i)``, so two seeds a
few apart share most of their items, shifted. The held-out split therefore comes first: the
first ``eval_size`` distinct questions of the generator at ``eval_seed``. Then, at
``train_seed``, the first ``shots`` distinct questions not held out become the worked examples,
and the next ``train_size`` distinct questions that are neither held out nor examples the
training prompts. No question is in two of these sets; a generator with fewer distinct questions
than asked for stops with a `ConfigError`. The data seeds are fixed in the config, not the run's
``seed``: every run of a seed sweep is trained and judged on the same problems.

Prompt. The ``shots`` examples come before every question, with their answers, so the policy
sees the form its answer must take: a bare answer. ``instruction`` (if set) follows every
question, the examples' included. Without a chat template the prompt is text::

    Q: <example question>
    A: <its answer>
    ...
    Q: <question>
    A:

and the answer is the first line of the response (``generation.stop_token: "\\n"`` ends it
there). With one (``policy.use_chat_template=true``) each example is a user turn and an
assistant turn, the question the last user turn, and the answer the assistant's reply.

Columns. Each prompt carries ``answer`` (the generator's reference answer) and
``reasoning_gym`` (a JSON object naming the generator, its difficulty, the seed and the index
of the item, from which the reward regenerates the exact entry its verifier needs).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from typing import Any

from rlhf_lightning.config import ConfigError
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.validation import BadRows, SourceRow
from rlhf_lightning.errors import require

log = logging.getLogger(__name__)

ITEM_COLUMN = "reasoning_gym"  # the column that identifies a prompt's problem
# Draw at most this many items per item wanted (plus MIN_DRAWS) before giving up on finding
# enough distinct questions.
DRAWS_PER_ITEM = 20
MIN_DRAWS = 1000


def create_generator(generator: str, difficulty: dict | None, seed: int):
    """The reasoning-gym dataset ``generator`` with ``difficulty`` settings at ``seed``.

    Its size is nominal: items are made on demand by index. Raises `ConfigError` naming the
    generator or the difficulty setting that reasoning-gym does not accept.
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if generator not in DATASETS:
        close = [name for name in sorted(DATASETS) if name[:3] == generator[:3]]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"invalid config: data.prompts.generator: reasoning-gym has no generator "
            f"{generator!r} ({len(DATASETS)} generators, e.g. chain_sum, leg_counting{hint})"
        )
    settings = dict(difficulty or {})
    if {"seed", "size"} & settings.keys():
        raise ConfigError(
            "invalid config: data.prompts.difficulty: seed and size are set by eval_seed, "
            "train_seed, eval_size and train_size, not here"
        )
    try:
        return reasoning_gym.create_dataset(generator, seed=seed, size=1, **settings)
    except (TypeError, ValueError, AssertionError) as error:
        fields = ", ".join(
            name
            for name in DATASETS[generator][1].__dataclass_fields__
            if name not in ("seed", "size")
        )
        raise ConfigError(
            f"invalid config: data.prompts.difficulty: {generator} rejects {settings}: "
            f"{error or type(error).__name__} (its settings: {fields})"
        ) from None


def distinct_items(dataset, count: int, exclude: set[str], what: str) -> list[tuple[int, dict]]:
    """The first ``count`` items ``(index, entry)`` of ``dataset`` whose questions are distinct
    and not in ``exclude``; their questions are added to ``exclude``.

    Raises `ConfigError` when ``DRAWS_PER_ITEM * count + MIN_DRAWS`` draws do not find them
    (the generator's settings allow too few distinct questions).
    """
    found: list[tuple[int, dict]] = []
    limit = DRAWS_PER_ITEM * count + MIN_DRAWS
    index = 0
    while len(found) < count:
        if index == limit:
            raise ConfigError(
                f"invalid config: data.prompts: {len(found)} distinct {what} questions in "
                f"{limit} draws of {dataset.config}, {count} asked for; lower the sizes or "
                "widen data.prompts.difficulty"
            )
        entry = dataset[index]
        if entry["question"] not in exclude:
            exclude.add(entry["question"])
            found.append((index, entry))
        index += 1
    return found


class ReasoningGymPrompts(PromptDataModule):
    """Train and held-out prompts generated by a reasoning-gym generator (see the module doc).

    ``generator``: a reasoning-gym dataset name (``chain_sum``, ``leg_counting``, ...);
    ``difficulty``: its config's settings (e.g. ``{min_terms: 2, max_terms: 3}``);
    ``train_size`` / ``eval_size`` prompts drawn at ``train_seed`` / ``eval_seed``; ``shots``
    worked examples before each question; ``instruction`` appended to every question.
    ``seed`` (the run's) orders the rollouts only. The other arguments are
    `PromptDataModule`'s.
    """

    what = "reasoning-gym prompts"

    def __init__(
        self,
        generator: str,
        tokenizer,
        max_prompt_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        train_size: int,
        eval_size: int,
        train_seed: int,
        eval_seed: int,
        difficulty: dict | None = None,
        shots: int = 3,
        instruction: str | None = None,
        too_long: str = "error",
        num_workers: int = 0,
        chat_template: bool = False,
    ) -> None:
        super().__init__(
            path=f"reasoning_gym:{generator}",
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            too_long=too_long,
            num_workers=num_workers,
            chat_template=chat_template,
        )
        self.check_settings(locals())
        self.generator = generator
        self.difficulty = dict(difficulty or {})
        create_generator(generator, self.difficulty, eval_seed)  # fails now, not in setup
        self.train_size = train_size
        self.eval_size = eval_size
        self.train_seed = train_seed
        self.eval_seed = eval_seed
        self.shots = shots
        self.instruction = instruction
        self.examples: list[dict] = []  # the worked examples, after setup

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """Raise `FieldError` for a setting that cannot work: this class's own, and those it
        passes on to `PromptDataModule` (its other arguments at their defaults)."""
        for key in ("train_size", "eval_size"):
            require(settings[key] >= 1, key, f"must be >= 1, got {settings[key]}")
        require(settings["shots"] >= 0, "shots", f"must be >= 0, got {settings['shots']}")
        require(
            settings["train_seed"] != settings["eval_seed"],
            "eval_seed",
            f"must differ from train_seed ({settings['train_seed']}): the held-out problems come "
            "from their own seed",
        )
        parameters = inspect.signature(PromptDataModule.__init__).parameters
        inherited = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
        inherited.update({n: v for n, v in settings.items() if n in parameters})
        PromptDataModule.check_settings(inherited)

    def _read_splits(self, bad_rows: BadRows) -> tuple[list[dict], list[dict]]:
        taken: set[str] = set()
        held_out = create_generator(self.generator, self.difficulty, self.eval_seed)
        train = create_generator(self.generator, self.difficulty, self.train_seed)
        eval_entries = distinct_items(held_out, self.eval_size, taken, "held-out")
        examples = distinct_items(train, self.shots, taken, "example")
        train_entries = distinct_items(train, self.train_size, taken, "training")
        self.examples = [entry for _, entry in examples]
        _check_verifier(held_out, eval_entries, self.generator)
        return (
            self._items(train_entries, self.train_seed, "train", bad_rows),
            self._items(eval_entries, self.eval_seed, "eval", bad_rows),
        )

    def _items(self, entries, seed: int, split: str, bad_rows: BadRows) -> list[dict]:
        source = f"reasoning_gym:{self.generator} ({split}, seed {seed})"
        rows = [
            SourceRow(source, number, None, self._row(index, entry, seed))
            for number, (index, entry) in enumerate(entries, start=1)
        ]
        return self._make_items(rows, source, bad_rows)

    def _row(self, index: int, entry: dict, seed: int) -> dict:
        """A prompt row: the prompt (text or chat), ``answer`` and ``ITEM_COLUMN``."""
        item = {
            "generator": self.generator,
            "difficulty": self.difficulty,
            "seed": seed,
            "index": index,
        }
        row = {"answer": entry["answer"], ITEM_COLUMN: json.dumps(item, sort_keys=True)}
        if self.chat_template:
            messages = []
            for example in self.examples:
                messages.append({"role": "user", "content": self._question(example)})
                messages.append({"role": "assistant", "content": str(example["answer"])})
            messages.append({"role": "user", "content": self._question(entry)})
            row["messages"] = messages
        else:
            lines = [f"Q: {self._question(e)}\nA: {e['answer']}\n" for e in self.examples]
            row["prompt"] = "".join(lines) + f"Q: {self._question(entry)}\nA:"
        return row

    def _question(self, entry: dict) -> str:
        question = entry["question"].strip()
        return f"{question}\n{self.instruction}" if self.instruction else question


def _check_verifier(dataset, entries: list[tuple[int, dict]], generator: str) -> None:
    """Warn when the generator's verifier does not give its own reference answer full marks
    (a generator with several right answers can do that; the reward is then partly noise)."""
    low = sum(dataset.score_answer(entry["answer"], entry) < 1.0 for _, entry in entries)
    if low:
        log.warning(
            "reasoning_gym:%s: the verifier scores its own answer below 1 on %d of %d held-out "
            "items",
            generator,
            low,
            len(entries),
        )
