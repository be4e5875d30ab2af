"""One rank of tests/test_distributed.py: `torchrun --nproc-per-node 2 dist_worker.py OUT`.

Every check runs in this one launch (starting two processes that import torch costs more than
all the checks together). Each rank writes what it saw to OUT: `rank{r}.json` (losses, refusal
messages, equality flags) and safetensors files; the test compares them with a single-process
run. Not a test module itself (pytest collects `test_*.py` only); the test also imports its
constants and `train` so that both sides run the very same loop.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from surgery import PlanError, rewrite
from surgery.graph.site import Site
from surgery.io.adapters import adapter_state_dict
from surgery.models import tiny

# LoRA on q, v and IA3 on down_proj's input: two methods, two kinds of adapter tensors
RULES = "apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj\napply ia3(on=input) to *.mlp.down_proj"
STEPS, LR, ROWS, TOKENS = 3, 0.5, 4, 16
APPLY_MORE = "apply lora(r=2) to *.mlp.up_proj"


def rewritten(seed: int = 0) -> nn.Module:
    model = tiny("llama", seed=seed)
    rewrite(model, RULES)
    return model


def batch(vocab: int) -> torch.Tensor:
    """The global batch; rank r of w trains on rows r*ROWS/w .. (r+1)*ROWS/w."""
    return torch.randint(0, vocab, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))


def train(model: nn.Module, ids: torch.Tensor, mean: Callable[[torch.Tensor], float]) -> list:
    """STEPS of plain SGD (no momentum: an update is proportional to its gradient, so rounding
    differences between reductions stay rounding-sized instead of being normalized up as Adam
    would); `mean` turns this rank's loss into the global batch's."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mean(loss.detach()))
    return losses


def refusal(model: nn.Module, rules: str) -> str:
    """The PlanError message `rules` get on `model` ('' when they are accepted: a failure)."""
    try:
        rewrite(model, rules, dry_run=True)
    except PlanError as error:
        return str(error)
    return ""


def full(state: dict) -> dict[str, torch.Tensor]:
    """A state dict with every DTensor gathered (a collective: every rank calls it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
MARK = re.compile(r"<!-- (executed: (?P<name>\S+)|not executed) -->")


def doc_blocks(text: str) -> list[tuple[str | None, str]]:
    """Each fenced block of a doc: (the name its `<!-- executed: NAME -->` line gives it, or
    "" after `<!-- not executed -->`, or None when unmarked; its text)."""
    blocks: list[tuple[str | None, str]] = []
    mark: str | None = None
    body: list[str] | None = None  # the lines of the block being read
    for line in text.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if body is not None:
            if fence:
                blocks.append((mark, "".join(body)))
                body, mark = None, None
            else:
                body.append(line)
        elif found := MARK.fullmatch(line.strip()):
            mark = found["name"] or ""
        elif fence:
            body = []
        elif line.strip():
            mark = None
    return blocks


def run_doc_scripts(out: Path) -> None:
    """Run docs/distributed.md's executed scripts, each in its own folder beside the rules
    file the doc gives them, as `torchrun` would: `script.py OUT` on this rank. They run in
    this launch's process group: their `init_process_group` and `destroy_process_group` calls
    do nothing here (a group initialized again in one process may meet the previous one's
    rendezvous keys in torchrun's store and hang)."""
    from unittest import mock

    import torch.distributed as dist

    named = {name: body for name, body in doc_blocks(DOC.read_text()) if name}
    keep_group = (
        mock.patch.object(dist, "init_process_group", lambda *a, **k: None),
        mock.patch.object(dist, "destroy_process_group", lambda *a, **k: None),
    )
    for name, body in named.items():
        if not name.endswith(".py"):
            continue
        folder = out / "docs" / Path(name).stem
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rules.surg").write_text(named["rules.surg"])
        os.chdir(folder)
        sys.argv = [name, str(folder)]
        with keep_group[0], keep_group[1]:
            exec(compile(body, f"{DOC}:{name}", "exec"), {"__name__": "__main__"})


def main(out: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # nothing here draws at random, but dropout would
    result: dict = {}

    def mean(loss: torch.Tensor) -> float:
        dist.all_reduce(loss)
        return loss.item() / world

    def shard(model: nn.Module) -> torch.Tensor:
        rows = batch(model.config.vocab_size).chunk(world)
        return rows[rank]

    # ---- DDP: train, then rewriting the wrapper is refused -------------------------------
    model = rewritten()
    ddp = DDP(model)
    result["ddp_losses"] = train(ddp, shard(model), mean)
    save_file(adapter_state_dict(model), out / f"ddp_rank{rank}.safetensors")
    result["ddp_apply"] = refusal(ddp, APPLY_MORE)

    # ---- FSDP2: fully_shard per decoder layer and the root -------------------------------
    model = rewritten()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = shard(model)
    result["fsdp2_losses"] = train(model, ids, mean)
    before = snapshot(model)
    result["fsdp2_merge"] = refusal(model, "merge")
    result["fsdp2_apply"] = refusal(model, APPLY_MORE)
    result["fsdp2_prompt"] = refusal(model, "apply prompt(n=2) to model.embed_tokens")
    result["fsdp2_unchanged"] = unchanged(model, before)
    # merge after gathering: rank 0 gets the whole state dict and merges a plain copy
    gathered = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        save_file({k: v.contiguous() for k, v in gathered.items()}, out / "fsdp2_full.safetensors")
        plain = rewritten(seed=1)
        plain.load_state_dict(gathered)
        rewrite(plain, "merge")
        save_file(plain.state_dict(), out / "fsdp2_merged.safetensors")

    # ---- DCP: sharded save, load into a fresh sharded model ------------------------------
    dcp.save(model.state_dict(), checkpoint_id=out / "dcp")
    fresh = rewritten(seed=1)
    for layer in fresh.model.layers:
        fully_shard(layer)
    fully_shard(fresh)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=out / "dcp")
    fresh.load_state_dict(state)
    mine, theirs = full(model.state_dict()), full(fresh.state_dict())
    result["dcp_exact"] = mine.keys() == theirs.keys() and all(
        torch.equal(mine[k], theirs[k]) for k in mine
    )

    # ---- FSDP1, use_orig_params=True (root unit): train, refusals, gathered merge ----------
    model = rewritten()
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    result["fsdp1_losses"] = train(wrapped, shard(model), mean)
    before = snapshot(model)
    result["fsdp1_merge"] = refusal(model, "merge")
    result["fsdp1_merge_wrapper"] = refusal(wrapped, "merge")
    result["fsdp1_apply"] = refusal(model, APPLY_MORE)
    result["fsdp1_apply_wrapper"] = refusal(wrapped, APPLY_MORE)
    with FSDP.summon_full_params(wrapped, writeback=False):
        result["fsdp1_merge_summoned"] = refusal(model, "merge")
        if rank == 0:  # the fix the refusal names
            plain = rewritten()  # the base as its checkpoint has it, adapters to be loaded
            loaded = plain.load_state_dict(adapter_state_dict(model), strict=False)
            result["fsdp1_unexpected"] = loaded.unexpected_keys
            rewrite(plain, "merge")
            save_file(plain.state_dict(), out / "fsdp1_merged.safetensors")
    result["fsdp1_unchanged"] = unchanged(model, before)

    # ---- FSDP1, use_orig_params=False: layers and adapters in their own units ------------
    model = rewritten()
    layer_type = type(model.model.layers[0])
    adapters = {id(m) for s in model.modules() if isinstance(s, Site) for m in s.children()}
    adapters -= {id(s.base) for s in model.modules() if isinstance(s, Site)}
    policy = functools.partial(  # uniform requires_grad per FlatParameter
        lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, layer_type) or id(m) in adapters
    )
    wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    result["fsdp1_flat_merge"] = refusal(model, "merge")
    result["fsdp1_flat_merge_wrapper"] = refusal(wrapped, "merge")
    result["fsdp1_flat_apply"] = refusal(model, APPLY_MORE)

    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    run_doc_scripts(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
