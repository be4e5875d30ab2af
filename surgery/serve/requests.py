"""Request files for `surgery generate`: one JSON object a line, each naming its adapter (or
none: the base model) and giving a prompt, as text or as token ids. Every line is checked, and a
bad one is an error located by file and line (`requests.jsonl:3: ...`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.adapters.names import BASE_ROW
from surgery.errors import SurgeryError, did_you_mean
from surgery.files import read_text

FIELDS = ("id", "adapter", "prompt", "input_ids")


class RequestError(SurgeryError):
    """A request that cannot be served as written, located by its file and line."""


@dataclass(frozen=True)
class Request:
    """One line of a requests file. `adapter` is None for the base model."""

    id: str | int
    adapter: str | None
    prompt: str | None = None
    input_ids: tuple[int, ...] | None = None
    line: int = 0  # where it was read, for errors found after reading (0: not from a file)


def parse_requests(
    text: str, where: str, adapters: Sequence[str], *, tokenizer: bool
) -> list[Request]:
    """The requests of a JSONL text (`where` names it in errors: `requests.jsonl:3: ...`).
    Every line is checked: a JSON object with only the known fields, an adapter that is loaded
    (`adapters`; null, absent or "__base__" is the base model), exactly one of `prompt` (text,
    only with a `tokenizer`) and `input_ids` (a non-empty list of token ids), and an id (a
    string or an integer; default the line number) no other request has. Blank lines are
    skipped."""
    requests: list[Request] = []
    seen: dict[str | int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        request = _request(line, adapters, tokenizer, number, f"{where}:{number}")
        if request.id in seen:
            raise RequestError(
                f"{where}:{number}: id {request.id!r} is already used on line {seen[request.id]}",
                hint="give every request its own id, or leave ids out (the line number is used)",
            )
        seen[request.id] = number
        requests.append(request)
    if not requests:
        raise RequestError(f"{where} holds no requests (one JSON object per line)")
    return requests


def _request(
    line: str, adapters: Sequence[str], tokenizer: bool, number: int, at: str
) -> Request:
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise RequestError(f"{at}: not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise RequestError(f"{at}: a request is a JSON object, not {type(fields).__name__}")
    unknown = [key for key in fields if key not in FIELDS]
    if unknown:
        raise RequestError(
            f"{at}: unknown field {unknown[0]!r} (a request has {', '.join(FIELDS)})",
            hint=did_you_mean(unknown[0], FIELDS),
        )
    rid = fields.get("id", number)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise RequestError(f"{at}: 'id' must be a string or an integer")
    adapter = fields.get("adapter")
    if adapter == BASE_ROW:
        adapter = None
    if adapter is not None and (not isinstance(adapter, str) or adapter not in adapters):
        loaded = ", ".join(adapters) if adapters else "none"
        raise RequestError(
            f"{at}: adapter {adapter!r} is not loaded (adapters: {loaded}; null or "
            f"'{BASE_ROW}' for the base model)",
            hint=did_you_mean(adapter, adapters) if isinstance(adapter, str) else None,
        )
    if ("prompt" in fields) == ("input_ids" in fields):
        raise RequestError(f"{at}: give either 'prompt' (text) or 'input_ids', not both or none")
    if "prompt" in fields:
        prompt = fields["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(f"{at}: 'prompt' must be a non-empty string")
        if not tokenizer:
            raise RequestError(
                f"{at}: a text prompt needs a tokenizer, and the model has none",
                hint="give token ids ('input_ids'), or a model directory with a tokenizer "
                "(or --tokenizer DIR)",
            )
        return Request(rid, adapter, prompt=prompt, line=number)
    ids = fields["input_ids"]
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        raise RequestError(f"{at}: 'input_ids' must be a non-empty list of integers >= 0")
    return Request(rid, adapter, input_ids=tuple(ids), line=number)


def read_requests(
    path: Path | str, adapters: Sequence[str], *, tokenizer: bool
) -> list[Request]:
    """The requests in the JSONL file `path` (see `parse_requests`)."""
    text = read_text(Path(path), "requests file", RequestError)
    return parse_requests(text, str(path), adapters, tokenizer=tokenizer)


def encode(requests: Sequence[Request], tokenizer: Any, vocab: int, where: str) -> list[list[int]]:
    """Each request's prompt as token ids (text through `tokenizer`, with its special tokens);
    an id the model has no embedding for is an error at the request's line."""
    prompts = []
    for request in requests:
        if request.input_ids is not None:
            ids = list(request.input_ids)
        elif tokenizer is None:
            raise RequestError(f"{where}:{request.line}: a text prompt needs a tokenizer")
        else:
            ids = list(tokenizer(request.prompt)["input_ids"])
        too_large = [i for i in ids if i >= vocab]
        if too_large:
            raise RequestError(
                f"{where}:{request.line}: token id {too_large[0]} is out of range: the model's "
                f"vocabulary has {vocab} tokens"
            )
        if not ids:
            raise RequestError(f"{where}:{request.line}: the prompt encodes to no tokens")
        prompts.append(ids)
    return prompts
