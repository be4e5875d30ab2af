"""Where the grammar and family rule files live, in a wheel and in a source checkout.

The wheel carries them under `surgery/_data/` (see pyproject.toml); a source checkout or an
editable install reads the top-level `grammar/` and `rules/` folders, the single source of truth.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """The folder holding `kind` ("grammar" or "rules")."""
    for candidate in (_PACKAGE / "_data" / kind, _PACKAGE.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"surgery is installed without its {kind}/ folder")


def grammar_text() -> str:
    return (data_dir("grammar") / "surgery.lark").read_text(encoding="utf-8")


def family_file(name: str) -> Path:
    return data_dir("rules") / f"{name}.surg"


def transformers_facts_file() -> Path:
    """rules/transformers.toml: facts about transformers model types, as data (surgery.hf)."""
    return data_dir("rules") / "transformers.toml"


def presets_file() -> Path:
    """rules/presets.toml: the built-in model presets, as data (surgery.presets)."""
    return data_dir("rules") / "presets.toml"


def family_names() -> list[str]:
    return sorted(p.stem for p in data_dir("rules").glob("*.surg"))
