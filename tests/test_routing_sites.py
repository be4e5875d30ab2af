"""Per-row routing of site methods (`model(..., adapter_names=[...])`): every registered site
method either routes, each row equal to running that row alone with its adapter active (or all
adapters disabled for `__base__`), or is refused by name before anything runs. Every parameter
method (MoE experts) is refused by name, the model unchanged; model-level methods route through
the model's hooks (tests/test_routing_tokens.py)."""

from __future__ import annotations

import pytest
import torch
from placement_cases import MOE_IDS, assert_every_placement_decided, methods_of, moe, moe_logits
from torch import nn

from surgery import rewrite
from surgery.adapters.names import BASE_ROW
from surgery.adapters.router import RoutingError
from surgery.adapters.units import active_adapters, disabled, set_active
from surgery.graph.param_site import PARAM
from surgery.graph.placement import MODEL, SITE
from surgery.graph.site import Site, routes
from surgery.models import tiny

ATOL = 1e-5
# Per routing method: each adapter's body (different ranks and options on purpose).
ROUTED = {
    "lora": (
        "apply lora(r=2) to *.self_attn.<q,v>_proj",
        "apply lora(r=4, alpha=16, rslora=true, bias=true) to *.self_attn.q_proj, *.mlp.down_proj",
        "apply lora(r=3, dropout=0.1, init=pissa) to *.self_attn.<q,v>_proj",
        "apply lora(r=1, init=olora) to *.self_attn.v_proj, *.mlp.up_proj",
    ),
    # two DoRA edits of different adapters cannot share a module yet (the core builds the graph
    # of all edits, in which the second DoRA is not first): each adapter its own modules
    "dora": (
        "apply dora(r=2) to *.self_attn.<q,v>_proj",
        "apply dora(r=4, alpha=4, dropout=0.1) to *.self_attn.k_proj, *.mlp.down_proj\n"
        "apply lora(r=2) to *.self_attn.q_proj",
    ),
    "ia3": (
        "apply ia3 to *.self_attn.<k,v>_proj",
        "apply ia3(on=input) to *.mlp.down_proj, *.self_attn.v_proj",
        "apply ia3 to *.mlp.down_proj",
    ),
    "adapter": (
        "apply adapter(r=4) to *.mlp.down_proj as bottleneck",
        "apply adapter(r=8, activation=gelu, dropout=0.1) to *.mlp.down_proj, *.self_attn.o_proj",
        "apply adapter(r=2, activation=silu) to *.mlp",
    ),
    "parallel_adapter": (
        "apply parallel_adapter(r=4) to *.mlp",
        "apply parallel_adapter(r=2, scale=2, activation=tanh) to *.mlp, *.self_attn.q_proj",
    ),
    "sparse": (
        "apply sparse(fraction=0.05) to *.self_attn.q_proj",
        "apply sparse(fraction=0.1) to *.self_attn.<q,v>_proj",
    ),
}
# Per site method that cannot route: two adapters using it (the call must be refused by name).
REFUSED = {
    "loha": "apply loha(r=2, alpha=4) to *.self_attn.q_proj",
    "lokr": "apply lokr(r=2) to *.self_attn.q_proj",
    "oft": "apply oft(block_size=8) to *.self_attn.q_proj",
    "vera": "apply vera(r=4) to *.self_attn.q_proj",
    "trained_copy": "apply trained_copy to *.mlp.down_proj",
    "trainable_tokens": "apply trainable_tokens(ids=[3, 7]) to *.embed_tokens",
}
# methods whose two edits cannot share a module even in alternative adapters (yet): the second
# adapter puts its edit elsewhere
ELSEWHERE = {"trained_copy": "apply trained_copy to *.mlp.up_proj"}
MIXES = (
    "apply lora(r=4) to *.self_attn.<q,v>_proj\napply ia3 to *.mlp.down_proj",
    "apply lora(r=2, alpha=4) to *.self_attn.<q,k>_proj",
    "apply ia3(on=input) to *.mlp.down_proj\napply adapter(r=4) to *.mlp.down_proj as bottleneck",
)


def adapted(
    bodies: tuple[str, ...] | list[str], seed: int = 1, family: str = "llama", prelude: str = ""
) -> tuple[nn.Module, list[str]]:
    """A tiny model with one adapter per body (u0, u1, ...), every adapter tensor moved away
    from its identity initialization."""
    model = tiny(family).eval()
    names = [f"u{i}" for i in range(len(bodies))]
    blocks = (f"adapter {n} {{\n{b}\n}}" for n, b in zip(names, bodies, strict=True))
    rewrite(model, "\n".join([prelude, *blocks]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model, names


def alone(model: nn.Module, row: str, **inputs: torch.Tensor) -> torch.Tensor:
    """The logits of one row run on its own with its adapter active (none for BASE_ROW)."""
    before = active_adapters(model)
    try:
        if row == BASE_ROW:
            with disabled(model):
                return model(**inputs).logits
        set_active(model, row)
        return model(**inputs).logits
    finally:
        set_active(model, before)


def assert_rows_match(
    model: nn.Module, rows: list[str], ids: torch.Tensor, mask: torch.Tensor | None = None
) -> None:
    extra = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows, **extra).logits
        for i, row in enumerate(rows):
            one = {k: v[i : i + 1] for k, v in {"input_ids": ids, **extra}.items()}
            expected = alone(model, row, **one)[0]
            keep = slice(None) if mask is None else mask[i].bool()
            torch.testing.assert_close(mixed[i][keep], expected[keep], atol=ATOL, rtol=0)


def graphs(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules() if isinstance(m, Site)]


def ids_for(rows: int, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


SITE_METHODS = methods_of(SITE)
EXCUSED = {
    MODEL: "virtual tokens route through the model's hooks, not through sites: "
    "tests/test_routing_tokens.py",
}


def test_every_placement_is_tested_or_excused() -> None:
    assert_every_placement_decided((SITE, PARAM), EXCUSED)


@pytest.mark.parametrize("method", SITE_METHODS)
def test_every_site_method_routes_or_is_refused(method: str) -> None:
    """A new site method must decide: route (and be listed in ROUTED, whose rows must equal
    each row alone) or leave `emit_routed` None (listed in REFUSED: refused with its name)."""
    if routes(method):
        assert method in ROUTED, f"{method} routes: give it adapters in ROUTED"
        model, names = adapted(ROUTED[method])
        rows = [*names, BASE_ROW, *reversed(names)]
        assert_rows_match(model, rows, ids_for(len(rows)))
        return
    assert method in REFUSED, f"{method} does not route: give it a rule in REFUSED"
    model, names = adapted([REFUSED[method], ELSEWHERE.get(method, REFUSED[method])])
    before, ids = graphs(model), ids_for(3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with pytest.raises(RoutingError, match=method):
            model(input_ids=ids, adapter_names=[names[0], names[1], BASE_ROW])
        assert graphs(model) == before
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_mixed_methods_in_one_adapter_route_per_row() -> None:
    model, names = adapted(MIXES, seed=3)
    rows = [names[1], BASE_ROW, names[0], names[2], names[0], names[1]]
    assert_rows_match(model, rows, ids_for(len(rows), 9, seed=4))


def test_left_padding_and_base_rows() -> None:
    model, names = adapted(MIXES, seed=5)
    rows = [names[0], BASE_ROW, names[2], names[1]]
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :5] = 0
    mask[3, :1] = 0
    assert_rows_match(model, rows, ids_for(4, 8, seed=6), mask)


def test_graphs_return_after_a_routed_call_and_after_one_that_raised() -> None:
    model, names = adapted(MIXES)
    before, ids = graphs(model), ids_for(2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model(input_ids=ids, adapter_names=[names[1], names[2]])
        assert graphs(model) == before
        bad = ids.clone()
        bad[0, 0] = 10_000  # out of the vocabulary: raises inside the routed forward
        with pytest.raises(IndexError):
            model(input_ids=bad, adapter_names=[names[1], names[2]])
        assert graphs(model) == before
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_gradients_reach_only_the_adapters_the_rows_used_and_equal_running_alone() -> None:
    model, names = adapted(
        (
            "apply lora(r=2) to *.self_attn.<q,v>_proj\napply ia3 to *.mlp.down_proj",
            "apply lora(r=4) to *.self_attn.q_proj\napply sparse(fraction=0.1) to *.mlp.up_proj",
            "apply adapter(r=4) to *.mlp.down_proj as bottleneck",
        )
    )
    model.train()
    ids = ids_for(3)
    rows = [names[0], BASE_ROW, names[1]]
    model(input_ids=ids, adapter_names=rows).logits[[0, 2]].sum().backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert routed and all(f".{names[2]}." not in n for n in routed)  # u2: no row, no gradient
    model.zero_grad(set_to_none=True)
    for i in (0, 2):
        alone(model, rows[i], input_ids=ids[i : i + 1]).sum().backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert routed.keys() == single.keys()
    for name, grad in routed.items():  # fp32 sums of logits: relative to the gradient's scale
        scale = float(single[name].abs().max())
        torch.testing.assert_close(grad, single[name], atol=1e-5 * scale, rtol=0, msg=name)


def test_generate_with_left_padding_equals_each_row_alone() -> None:
    model, names = adapted(MIXES, seed=7)
    rows = [names[0], names[2], BASE_ROW, names[1]]
    ids = ids_for(4, 6, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :4] = 0
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(ids, attention_mask=mask, adapter_names=rows, **settings)
        for i, row in enumerate(rows):
            before = active_adapters(model)
            if row == BASE_ROW:
                set_active(model, ())
            else:
                set_active(model, row)
            one = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **settings)
            set_active(model, before)
            assert torch.equal(mixed[i], one[0]), row


# Per parameter method: a body for two adapters (the weights every row reads: never routed).
PARAMETER_REFUSED = {
    "lora_experts": "apply lora(r=2) to *.experts.gate_up_proj",
    "ia3_experts": "apply ia3(on=input) to *.experts.down_proj[0:2]",
}


@pytest.mark.parametrize("method", methods_of(PARAM))
def test_every_parameter_method_is_refused_by_name(method: str) -> None:
    assert method in PARAMETER_REFUSED, f"give {method} a rule in PARAMETER_REFUSED"
    model = moe()
    body = PARAMETER_REFUSED[method]
    rewrite(model, f"adapter a {{ {body} }}\nadapter b {{ {body} }}")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
        expected = moe_logits(model)
        before = [(n, type(m)) for n, m in model.named_modules()]
        with pytest.raises(RoutingError, match=method):
            model(MOE_IDS.repeat(2, 1), adapter_names=["a", "b"])
        assert [(n, type(m)) for n, m in model.named_modules()] == before
        torch.testing.assert_close(moe_logits(model), expected, atol=0, rtol=0)
