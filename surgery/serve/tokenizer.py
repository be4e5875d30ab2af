"""A tokenizer from a directory someone else wrote: read like a model directory, never running
its code (`surgery.model_files`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from surgery.errors import ModelLoadError
from surgery.files import check_inside, read_text
from surgery.model_files import IgnoredCodeWarning

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in `directory`, untrusted input like a model directory: its own code
    (auto_map) is never run, nothing is downloaded, and no file links out of the directory."""
    from transformers import AutoTokenizer

    for path in directory.iterdir():  # whichever of its files transformers reads
        if path.is_symlink():
            check_inside(path, directory, "tokenizer file", ModelLoadError)
    config = directory / "tokenizer_config.json"
    if config.is_file():
        fields = _json_object(config)
        if "auto_map" in fields:
            if not _builtin_tokenizer(fields.get("tokenizer_class")):
                raise ModelLoadError(
                    f"{config} asks for the tokenizer's own Python code (auto_map), which "
                    "surgery never runs",
                    hint="use a tokenizer whose tokenizer_class is built into transformers, "
                    "or give token ids ('input_ids') instead of text",
                )
            warnings.warn(
                f"{config} names its own Python code (auto_map); surgery never runs it and "
                f"uses transformers' {fields['tokenizer_class']}",
                IgnoredCodeWarning,
                stacklevel=2,
            )
    try:
        return AutoTokenizer.from_pretrained(
            directory, trust_remote_code=False, local_files_only=True
        )
    except Exception as error:  # anything transformers raises about these files is the input's
        raise ModelLoadError(f"cannot load the tokenizer in {directory}: {error}") from None


def _json_object(file: Path) -> dict[str, Any]:
    try:
        fields = json.loads(read_text(file, "tokenizer config", ModelLoadError))
    except (ValueError, RecursionError) as error:
        raise ModelLoadError(f"cannot read {file}: it is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise ModelLoadError(f"cannot read {file}: it is not a JSON object")
    return fields


def _builtin_tokenizer(name: Any) -> bool:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(name, str):
        return False
    found = tokenizer_class_from_name(name) or tokenizer_class_from_name(name.removesuffix("Fast"))
    return found is not None and found.__module__.startswith("transformers.")
