"""Generation for many requests, each through its own adapter, in mixed-adapter batches
(`model.generate(..., adapter_names=[...])`, left padding with an attention mask)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.adapters.names import BASE_ROW
from surgery.adapters.units import active_adapters, adapter_names, set_active
from surgery.errors import ModelLoadError, SurgeryError
from surgery.serve.requests import Request, RequestError, encode

MIXED, PER_ADAPTER = "mixed", "per-adapter"


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
