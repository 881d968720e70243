"""Convert a GGUF checkpoint into a plain HF directory (safetensors weights + tokenizer).

transformers dequantises GGUF weights on load, which is slow (the GGUF reader parses all metadata);
converting once and loading the safetensors copy afterwards is fast.

Command line: `rlhf-convert-gguf MODEL.gguf OUT_DIR [--dtype float32]`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rlhf_lightning.models._util import DTYPES, resolve_dtype, write_directory_atomically


def remove_gguf_quantization(model) -> None:
    """Detach the GGUF quantizer transformers attaches on load (the weights are already dense).

    Without this, `save_pretrained` refuses to save a model loaded with `gguf_file=`.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32"
) -> Path:
    """Dequantise the causal LM in `gguf_path` and save it with its tokenizer to `out_dir`.

    Writes `config.json`, `model.safetensors` (in `dtype`) and the tokenizer files; `out_dir` is
    created if needed. Returns `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    source_dir, file_name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=file_name, dtype=resolve_dtype(dtype)
    )
    remove_gguf_quantization(model)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rlhf-convert-gguf",
        description="Convert a GGUF causal LM into a HF directory (safetensors + tokenizer).",
    )
    parser.add_argument("gguf", type=Path, help="path of the .gguf file")
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"GGUF file not found: {args.gguf}")
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} already exists; choose a new directory")
    write_directory_atomically(
        args.out_dir, lambda tmp_dir: convert_gguf_to_hf(args.gguf, tmp_dir, args.dtype)
    )
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
