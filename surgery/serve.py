"""Generation for many requests, each through its own adapter: `surgery generate` and its Python
side.

A request names an adapter (or none: the base model) and gives a prompt, as text when there is
a tokenizer, as token ids otherwise. Requests run in batches of mixed adapters
(`model.generate(..., adapter_names=[...])`, left padding with an attention mask), one batched
computation per site. When an adapter is built from a method that cannot route per row, the
requests run instead in batches of one adapter each (`set_active`), and the run says so: every
request still gets exactly its adapter's output, never another's.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapters.names import BASE_ROW
from surgery.adapters.units import active_adapters, adapter_names, set_active
from surgery.errors import ModelLoadError, SurgeryError, did_you_mean
from surgery.files import check_inside, read_text
from surgery.model_files import IgnoredCodeWarning

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
FIELDS = ("id", "adapter", "prompt", "input_ids")
MIXED, PER_ADAPTER = "mixed", "per-adapter"


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


@dataclass(frozen=True)
class Result:
    id: str | int
    adapter: str | None
    generated_ids: list[int]
    finish_reason: str  # "eos": the model ended it; "length": max_new_tokens reached
    text: str | None = None  # with a tokenizer: the generated ids decoded

    def to_json(self) -> dict[str, Any]:
        fields = {
            "id": self.id,
            "adapter": self.adapter,
            "generated_ids": self.generated_ids,
            "finish_reason": self.finish_reason,
        }
        if self.text is not None:
            fields["text"] = self.text
        return fields


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default), or sampled with a seed, so that the
    same requests, batch size and seed give the same outputs."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Run:
    """What `generate_requests` did: the results in request order, and how it batched them
    (`mode`: MIXED, or PER_ADAPTER with `reason` saying which method could not route)."""

    results: list[Result]
    mode: str
    batches: int
    reason: str | None = None


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


def has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved in `directory`, untrusted input like a model directory: its own code
    (auto_map) is never run, nothing is downloaded, and no file links out of the directory."""
    from transformers import AutoTokenizer

    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "config.json"):
        if (directory / name).exists():
            check_inside(directory / name, directory, "tokenizer file", ModelLoadError)
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


def encode(requests: Sequence[Request], tokenizer: Any, vocab: int, where: str) -> list[list[int]]:
    """Each request's prompt as token ids (text through `tokenizer`, with its special tokens);
    an id the model has no embedding for is an error at the request's line."""
    prompts = []
    for request in requests:
        if request.input_ids is not None:
            ids = list(request.input_ids)
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


def generate_requests(
    model: nn.Module,
    requests: Sequence[Request],
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    where: str = "<requests>",
    progress: Callable[[int], None] | None = None,
) -> Run:
    """Generate every request's continuation with its adapter (or the base model), in batches of
    `batch_size`; `progress(n)` is called after each batch with the number of requests done.
    The model's active adapters are the same afterwards."""
    if batch_size < 1 or max_new_tokens < 1:
        raise SurgeryError("batch_size and max_new_tokens must be at least 1")
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or not can_generate():
        raise ModelLoadError(f"{type(model).__name__} cannot generate text (it has no LM head)")
    prompts = encode(requests, tokenizer, model.get_input_embeddings().num_embeddings, where)
    loaded = adapter_names(model)
    used = list(dict.fromkeys(r.adapter for r in requests if r.adapter is not None))
    missing = [name for name in used if name not in loaded]
    if missing:
        raise RequestError(f"adapter '{missing[0]}' is not loaded on the model")
    reason = _cannot_route(model, used) if loaded else None
    order = list(range(len(requests)))
    if reason is not None:  # one adapter per batch: requests grouped by adapter, stable
        order.sort(key=lambda i: (requests[i].adapter is not None, requests[i].adapter or ""))
    batches = _batches(order, requests, batch_size, grouped=reason is not None)
    config = _generation_config(model, tokenizer, max_new_tokens, sampling)
    results: list[Result | None] = [None] * len(requests)
    before = active_adapters(model) if loaded else None
    done = 0
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.inference_mode():
            torch.manual_seed(sampling.seed)
            for batch in batches:
                rows = [requests[i].adapter or BASE_ROW for i in batch]
                if reason is not None and loaded:
                    set_active(model, () if rows[0] == BASE_ROW else rows[0])
                routed = {"adapter_names": rows} if loaded and reason is None else {}
                outputs = _generate(model, [prompts[i] for i in batch], config, routed)
                for i, generated in zip(batch, outputs, strict=True):
                    results[i] = _result(requests[i], generated, config, tokenizer)
                done += len(batch)
                if progress is not None:
                    progress(done)
    finally:
        if before is not None and reason is not None:
            set_active(model, before)
    return Run(
        [r for r in results if r is not None],
        MIXED if reason is None else PER_ADAPTER,
        len(batches),
        reason,
    )


def _cannot_route(model: nn.Module, adapters: list[str]) -> str | None:
    """Why `adapters` cannot share a batch on `model` (the router's own check, run with no
    batch, switching nothing for good), or None when they can."""
    from surgery.adapters.router import RoutingError, begin, end

    try:
        begin(model, adapters, None)
    except RoutingError as error:
        return error.message
    finally:
        end(model)
    return None


def _batches(
    order: list[int], requests: Sequence[Request], size: int, *, grouped: bool
) -> list[list[int]]:
    """`order` cut into batches of `size`; `grouped`: a batch never holds two adapters."""
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if (
            last is None
            or len(last) == size
            or (grouped and requests[last[0]].adapter != requests[i].adapter)
        ):
            batches.append([i])
        else:
            last.append(i)
    return batches


def _generation_config(model: nn.Module, tokenizer: Any, new: int, sampling: Sampling) -> Any:
    """The model's generation config with the run's choices: every one of them explicit, so a
    model directory's generation_config.json (a sampling default) never changes the run."""
    config = copy.deepcopy(model.generation_config)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = config.pad_token_id
    if pad is None:
        eos = config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    config.update(max_new_tokens=new, max_length=None, min_new_tokens=None, pad_token_id=pad)
    config.update(do_sample=sampling.sample, num_beams=1, num_return_sequences=1)
    if sampling.sample:
        config.update(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
        )
    else:
        config.update(temperature=None, top_k=None, top_p=None)
    return config


def _generate(
    model: nn.Module, prompts: list[list[int]], config: Any, routed: dict[str, Any]
) -> list[list[int]]:
    """The generated ids of each prompt (without the prompt), left-padded into one batch."""
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    output = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        **routed,
    )
    # a decoder-only model returns prompt + continuation; an encoder-decoder its decoder
    # sequence, which starts with the decoder's start token
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else width
    return output[:, start:].tolist()


def _result(request: Request, generated: list[int], config: Any, tokenizer: Any) -> Result:
    """One request's result: the generated ids up to the first end-of-sequence id (kept), as
    the padding after it belongs to the batch, not to the request."""
    eos = config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    end = next((n + 1 for n, token in enumerate(generated) if token in stops), None)
    tokens = generated if end is None else generated[:end]
    text = None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
    return Result(request.id, request.adapter, tokens, "length" if end is None else "eos", text)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def write_results(results: Sequence[Result], file: Any) -> None:
    """One JSON object per line, in request order."""
    for result in results:
        file.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
