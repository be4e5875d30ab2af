"""Shared-input groups (surgery/graph/shared_input.py): sibling LoRA edits that their parent calls
with one tensor (q, k, v; gate, up) compute x @ [A_q; A_k; A_v]^T once. Every case compares the
model with groups to the same model with `set_input_sharing(model, False)` (each edit alone).

Exactness: the maths is the same, the op order is not. MKL's sgemm rounds the columns of an
[T, 3r] product differently from three [T, r] products (`test_a_wide_matmul_rounds_differently`),
and the input gradient sums one [T, 3r] @ [3r, in] instead of three: outputs agree within 1e-6
and gradients within 1e-5 of their largest entry, not bitwise (measured: ~6e-7 and ~2e-6).
"""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from surgery import Site, disabled, hot_swap, rewrite, set_active
from surgery.graph.builder import Shared
from surgery.graph.input_groups import set_input_sharing
from surgery.graph.shared_input import SharedInputScope
from surgery.kbit import CHECKPOINTING_ENABLE
from surgery.models import from_config, preset_config, tiny
from surgery.parent_calls import shared_input_calls

ALL7 = "*.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def fill(model: nn.Module, seed: int = 1) -> None:
    """Random trainable tensors (LoRA's B = 0 would hide the branch)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def shared_edits(model: nn.Module) -> dict[str, list[str]]:
    """Site path -> the names of its edits computed through a group."""
    found = {}
    for path, site in model.named_modules():
        if isinstance(site, Site):
            emitted = site._surgery_emitted or ()
            names = [item.name for item in emitted if isinstance(item, Shared)]
            if names:
                found[path] = names
    return found


def scopes(model: nn.Module) -> list[SharedInputScope]:
    return [
        h for m in model.modules() for h in m._forward_pre_hooks.values()
        if isinstance(h, SharedInputScope)
    ]


def step(model: nn.Module, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every trainable tensor's gradient for a fixed loss."""
    model.zero_grad(set_to_none=True)
    out = call(model) if call is not None else model(input_ids=IDS).logits
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_close(a: tuple, b: tuple) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert (out_a - out_b).abs().max() <= 1e-6 * max(out_b.abs().max().item(), 1.0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        scale = max(grads_b[name].abs().max().item(), 1e-12)
        assert (grad - grads_b[name]).abs().max().item() <= 1e-5 * scale, name


def same_as_alone(model: nn.Module, call=None) -> None:
    """`model` with its groups computes what it computes with each edit alone."""
    with_groups = step(model, call)
    set_input_sharing(model, False)
    assert not shared_edits(model)
    alone = step(model, call)
    set_input_sharing(model, True)
    assert_close(with_groups, alone)


def llama(rules: str = f"apply lora(r=4, alpha=8) to {ALL7}", layers: int = 0) -> nn.Module:
    """tiny-llama (`layers` > 0: that many decoder layers) with `rules` and random adapters."""
    if layers:
        config = preset_config("tiny-llama")
        config.update({"num_hidden_layers": layers})
        model = from_config(config)
    else:
        model = tiny("llama")
    rewrite(model, rules)
    fill(model)
    return model


# ---- which edits share ---------------------------------------------------------------------------


def test_the_parents_forward_names_the_siblings() -> None:
    model = tiny("llama")
    layer = model.model.layers[0]
    assert shared_input_calls(type(layer.self_attn)) == (("q_proj", "k_proj", "v_proj"),)
    assert shared_input_calls(type(layer.mlp)) == (("gate_proj", "up_proj"),)
    assert shared_input_calls(type(layer)) == ()  # its children get different tensors


def test_llama_groups_q_k_v_and_gate_up_and_nothing_else() -> None:
    model = llama()
    keys = set(model.state_dict())
    shared = shared_edits(model)
    assert sorted({p.rsplit(".", 1)[1] for p in shared}) == [
        "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"
    ]
    layers = len(model.model.layers)
    assert len(shared) == 5 * layers and len(scopes(model)) == 2 * layers  # attn and mlp
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.k_proj
    assert type(q) is type(k)  # the slot is not in the graph: one template for all of them
    set_input_sharing(model, False)
    assert set(model.state_dict()) == keys and not scopes(model)


def test_llama_train_step_matches_each_edit_alone() -> None:
    same_as_alone(llama())


def test_the_entry_lives_for_one_call_of_the_parent() -> None:
    model = llama()
    model(input_ids=IDS)
    assert all(g.entry is None for scope in scopes(model) for g in scope.groups.values())


def test_ranks_only_some_siblings_and_dropout() -> None:
    # q and v (different ranks) share; k has no LoRA; gate/up: dropout keeps each alone
    model = llama(
        "apply lora(r=2) to *.self_attn.q_proj\napply lora(r=6) to *.self_attn.v_proj\n"
        "apply lora(r=4, dropout=0.1) to *.mlp.<gate,up>_proj"
    )
    assert sorted({p.rsplit(".", 1)[1] for p in shared_edits(model)}) == ["q_proj", "v_proj"]
    model.eval()  # dropout off, so the comparison is deterministic
    same_as_alone(model)


# ---- siblings that do not get one tensor --------------------------------------------------------


class Cross(nn.Module):
    """q reads x; k and v read y (cross-attention). `mutate` changes y in place between k and
    v, through a function the source check cannot see into."""

    def __init__(self, mutate: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(8, 8) for _ in range(3))
        self.mutate = mutate

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.k(y)
        if self.mutate:
            scale_in_place(y)
        return (self.q(x) * k + self.v(y)).sum(-1)


def scale_in_place(t: torch.Tensor) -> None:
    t.mul_(2.0)


XY = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5)), torch.randn(2, 3, 8)


def test_siblings_given_different_tensors_do_not_share() -> None:
    model = Cross()
    rewrite(model, "apply lora(r=2) to <q,k,v>")
    fill(model)
    assert sorted(shared_edits(model)) == ["k", "v"]  # the source names one y for both
    same_as_alone(model, lambda m: m(*XY))
    # called outside their parent (no scope), with other tensors: v's entry is k's, not v's
    y2 = XY[1] + 1.0
    same_as_alone(model, lambda m: m.k(XY[1]) * m.v(y2) + m.v(XY[1]))


def test_a_variable_bound_again_between_the_calls_is_not_proposed() -> None:
    class Rebinding(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            return self.b(x) + self.c(x)

    assert shared_input_calls(Rebinding) == ()


def test_an_input_changed_in_place_is_not_taken_from_the_entry() -> None:
    model = Cross(mutate=True)
    rewrite(model, "apply lora(r=2) to <q,k,v>")
    fill(model)
    assert sorted(shared_edits(model)) == ["k", "v"]
    with torch.no_grad():
        shared = model(XY[0], XY[1].clone())
        set_input_sharing(model, False)
        alone = model(XY[0], XY[1].clone())
    torch.testing.assert_close(shared, alone, rtol=1e-6, atol=1e-6)


def test_a_variable_modified_in_place_in_forward_is_not_proposed() -> None:
    class Mutating(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            x.add_(1.0)
            return a + self.b(x)

    assert shared_input_calls(Mutating) == ()


def test_a_wide_matmul_rounds_differently() -> None:
    """Why the groups are exact to 1e-6 and not bitwise (see the module doc)."""
    x, A = torch.randn(64, 96), torch.randn(12, 96)
    wide, alone = F.linear(x, A)[:, :4], F.linear(x, A[:4])
    assert (wide - alone).abs().max() <= 1e-6 * alone.abs().max()


# ---- adapters, routing, checkpointing --------------------------------------------------------


def two_adapters() -> nn.Module:
    body = "apply lora(r=4) to *.self_attn.<q,k,v>_proj, *.mlp.<gate,up>_proj"
    return llama(f"adapter a {{ {body} }}\nadapter b {{ {body.replace('r=4', 'r=2')} }}")


def test_several_adapters_active_inactive_disabled() -> None:
    model = two_adapters()  # a active, b inactive: b's edits join no group
    assert all(names == ["a"] for names in shared_edits(model).values())
    same_as_alone(model)
    with torch.no_grad():
        only_a = model(input_ids=IDS).logits
    set_active(model, ["a", "b"])  # both: one group per adapter and parent
    assert all(names == ["a", "b"] for names in shared_edits(model).values())
    assert {len(g.adapters) for s in scopes(model) for g in s.groups.values()} == {2, 3}
    same_as_alone(model)
    with torch.no_grad():  # b's edits (B = 0) add exactly nothing: a rounds as it did alone
        for path, param in model.named_parameters():
            if path.endswith(".b.B"):
                param.zero_()
        assert torch.equal(model(input_ids=IDS).logits, only_a)
    groups = {id(g) for s in scopes(model) for g in s.groups.values()}
    with disabled(model):
        assert not shared_edits(model)
        with torch.no_grad():
            base = model(input_ids=IDS).logits
    assert {id(g) for s in scopes(model) for g in s.groups.values()} == groups  # same objects
    set_active(model, [])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)


def test_rows_routed_to_adapters_compute_without_groups() -> None:
    model = two_adapters()
    set_active(model, ["a", "b"])
    rows = ["a", "b"]
    routed = model(input_ids=IDS, adapter_names=rows).logits.detach()
    assert all(names == ["a", "b"] for names in shared_edits(model).values())  # back after
    for i, name in enumerate(rows):
        set_active(model, name)
        with torch.no_grad():
            alone = model(input_ids=IDS[i : i + 1]).logits
        torch.testing.assert_close(routed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_same_path() -> None:
    model = llama()
    model.train()
    plain = step(model)
    for enable, kwargs in CHECKPOINTING_ENABLE:  # the new name first (the old one goes in v6)
        if hasattr(model, enable):
            getattr(model, enable)(**{kwargs: {"use_reentrant": False}})
            break
    checkpointed = step(model)
    set_input_sharing(model, False)
    alone = step(model)
    assert_close(checkpointed, plain)
    assert_close(checkpointed, alone)


# ---- lifecycle ---------------------------------------------------------------------------------


def test_merge_remove_and_hot_swap() -> None:
    model = llama()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    hot = tiny("llama")
    base_state = {k: v.clone() for k, v in hot.state_dict().items()}
    rewrite(hot, f"adapter x {{ apply lora(r=4, alpha=8) to {ALL7} }}\n"
                 f"adapter y {{ apply lora(r=4, alpha=8) to {ALL7} }}")
    fill(hot, 9)
    live = dict(model.named_parameters())
    with torch.no_grad():  # y gets model's adapter; x is swapped to y's values
        for name, param in hot.named_parameters():
            if ".y." in name:
                param.copy_(live[name.replace(".y.", ".lora.")])
    hot_swap(hot, "x", "y")
    with torch.no_grad():
        torch.testing.assert_close(hot(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    rewrite(hot, "remove")
    assert not scopes(hot) and not any(isinstance(m, Site) for m in hot.modules())
    assert all(torch.equal(hot.state_dict()[k], v) for k, v in base_state.items())
    rewrite(model, "merge")
    assert not scopes(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_agree() -> None:
    """deepcopy copies the groups with the adapters they hold; a pickled site computes alone
    (its groups are formed again on the next regrouping)."""
    model = llama()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    copied, loaded = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    q = copied.model.layers[0].self_attn.q_proj
    assert q._surgery_shared0.group.adapters[0] is q.lora
    assert len(shared_edits(copied)) == len(shared_edits(model)) and not shared_edits(loaded)
    set_input_sharing(loaded, True)
    assert len(shared_edits(loaded)) == len(shared_edits(model))
    for other in (copied, loaded):
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=IDS).logits, expected, rtol=0, atol=0)


def test_compiled_in_one_graph_like_each_edit_alone() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = llama(layers=1)  # dynamo's time goes into the HF layer's own code
    set_input_sharing(model, False)
    alone = step(model)
    set_input_sharing(model, True)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = compiled(input_ids=IDS).logits
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_close((out.detach(), grads), alone)
    with disabled(model):
        compiled(input_ids=IDS)
    compiled(input_ids=IDS)  # the same groups again: the first frame's guards still hold
    assert backend.frame_count == 2 and not counters["graph_break"]
    torch._dynamo.reset()


def test_inference_mode_computes_each_edit_alone() -> None:
    # inference tensors keep no version counter (reading it raises): `surgery generate` runs
    # under torch.inference_mode, so an edit computes its own product there, and equals the
    # unshared result bit for bit
    model = llama()
    with torch.inference_mode():
        shared = model(input_ids=IDS).logits
        set_input_sharing(model, False)
        alone = model(input_ids=IDS).logits
    assert torch.equal(shared, alone)
