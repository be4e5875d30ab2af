"""Per-row routing over every layer kind and option the routed methods take (fused parts,
GPT-2's Conv1D, embeddings, convs, half-precision bases), the cached banks (a changed adapter is
never served stale), per-row dropout, refusals, and Hypothesis over random row assignments with
padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_routing_sites import adapted, alone, assert_rows_match, graphs, ids_for
from torch import nn

from surgery import rewrite
from surgery.adapters.names import BASE_ROW
from surgery.adapters.router import RoutingError
from surgery.adapters.units import set_active
from surgery.models import tiny

# (family, rule prelude, one body per adapter)
KINDS = {
    "falcon-fused-parts": (
        "falcon",
        "use auto",
        (
            "apply lora(r=2) to attn.q, attn.v\napply ia3 to attn.k as scale0",
            "apply lora(r=3, alpha=6) to attn.k\napply ia3 to attn.k, attn.v as scale1",
            "apply lora(r=1) to *.self_attention.query_key_value",
        ),
    ),
    "gpt2-conv1d": (
        "gpt2",
        "use auto",
        (
            "apply lora(r=2) to *.attn.c_attn\napply ia3(on=input) to *.mlp.c_proj",
            "apply lora(r=2, alpha=4) to attn.q, attn.v\napply ia3 to *.mlp.c_proj",
            "apply ia3 to attn.k",
        ),
    ),
    "llama-embedding": (
        "llama",
        "",
        (
            "apply lora(r=2) to *.embed_tokens",
            "apply lora(r=4, alpha=2) to *.embed_tokens, *.self_attn.q_proj",
        ),
    ),
    "llama-dora-embedding": (
        "llama",
        "",
        ("apply dora(r=2) to *.embed_tokens", "apply lora(r=3) to *.embed_tokens"),
    ),
}


def kind_model(family: str, prelude: str, bodies: tuple[str, ...]) -> tuple[nn.Module, list[str]]:
    return adapted(bodies, family=family, prelude=prelude)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layer_kinds_route_per_row(kind: str) -> None:
    model, names = kind_model(*KINDS[kind])
    rows = [*names, BASE_ROW, *reversed(names)]
    assert_rows_match(model, rows, ids_for(len(rows)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_convs_route_as_one_grouped_conv() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    rewrite(
        model,
        "adapter c { apply dora(r=2) to conv }\n"  # DoRA is the first edit on its module
        "adapter a { apply lora(r=2) to conv }\n"
        "adapter b { apply lora(r=3, bias=true, alpha=6) to conv\napply ia3 to head }",
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    x, rows = torch.randn(4, 3, 7, 7), ["a", "b", BASE_ROW, "c"]
    with torch.no_grad():
        mixed = model(x, adapter_names=rows)
        for i, row in enumerate(rows):
            set_active(model, () if row == BASE_ROW else row)
            torch.testing.assert_close(mixed[i], model(x[i : i + 1])[0], atol=1e-5, rtol=0)


def test_half_precision_bases_route_with_fp32_adapters() -> None:
    model, names = adapted(
        ("apply lora(r=2) to *.self_attn.<q,v>_proj\napply ia3 to *.mlp.down_proj",
         "apply adapter(r=4) to *.mlp.down_proj"),
    )
    model.to(torch.bfloat16)  # the base in bf16; the adapters stay fp32 (the dtype policy)
    ids, rows = ids_for(3), [names[1], BASE_ROW, names[0]]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows).logits
        assert mixed.dtype == torch.bfloat16
        for i, row in enumerate(rows):
            expected = alone(model, row, input_ids=ids[i : i + 1])[0]
            torch.testing.assert_close(mixed[i], expected, atol=2e-2, rtol=2e-2)


def test_a_changed_adapter_is_never_served_from_a_stale_bank() -> None:
    model, names = adapted(("apply lora(r=2) to *.self_attn.q_proj", "apply ia3 to *.mlp.up_proj"))
    ids, rows = ids_for(3), [names[0], names[1], BASE_ROW]
    site = model.model.layers[0].self_attn.q_proj
    with torch.inference_mode():
        assert_rows_match(model, rows, ids)  # the banks are now cached
    with torch.no_grad():
        site.u0.B.mul_(3.0)  # in place: a new version
    assert_rows_match(model, rows, ids)
    state = {k: v * 0.5 for k, v in model.state_dict().items() if ".u1." in k}
    model.load_state_dict(state, strict=False)  # hot swap by copy
    assert_rows_match(model, rows, ids)
    site.u0.A = nn.Parameter(torch.randn_like(site.u0.A))  # a new parameter object
    assert_rows_match(model, rows, ids)
    with torch.no_grad():
        site.u0.B.data = torch.randn_like(site.u0.B)  # new storage, same version
    assert_rows_match(model, rows, ids)


def test_dropout_is_drawn_per_row_in_training_only_for_rows_whose_adapter_has_it() -> None:
    model, names = adapted(
        ("apply lora(r=2, dropout=0.5) to *.self_attn.<q,v>_proj\n"
         "apply adapter(r=4, dropout=0.5) to *.mlp.down_proj",
         "apply lora(r=2) to *.self_attn.<q,v>_proj"),
    )
    ids, rows = ids_for(3), [names[0], names[1], BASE_ROW]
    with torch.no_grad():
        evaluated = model(input_ids=ids, adapter_names=rows).logits
        model.train()
        first = model(input_ids=ids, adapter_names=rows).logits
        second = model(input_ids=ids, adapter_names=rows).logits
    assert not torch.allclose(first[0], second[0])  # u0's rows draw their dropout
    assert not torch.allclose(first[0], evaluated[0])
    for i in (1, 2):  # no dropout in u1 and the base: the eval result
        torch.testing.assert_close(first[i], evaluated[i], atol=1e-5, rtol=0)


def test_an_option_that_cannot_route_is_refused_by_name_with_the_model_unchanged() -> None:
    model = tiny("llama").eval()
    model.model.embed_tokens.scale_grad_by_freq = True
    rewrite(
        model,
        "adapter a { apply lora(r=2) to *.self_attn.q_proj, *.embed_tokens }\n"
        "adapter b { apply lora(r=2) to *.embed_tokens }",
    )
    before, ids = graphs(model), ids_for(2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with pytest.raises(RoutingError, match=r"lora.*scale_grad_by_freq"):
            model(input_ids=ids, adapter_names=["a", "b"])
        assert graphs(model) == before
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)


_SHARED: dict[str, tuple[nn.Module, list[str]]] = {}


def _shared() -> tuple[nn.Module, list[str]]:
    """One model for every Hypothesis example: LoRA, IA3 (both sides), bottlenecks and sparse in
    four adapters, some sharing modules."""
    if not _SHARED:
        _SHARED["model"] = adapted(
            (
                "apply lora(r=4) to *.self_attn.<q,v>_proj\napply ia3 to *.mlp.down_proj",
                "apply lora(r=2, alpha=4) to *.self_attn.q_proj\n"
                "apply ia3(on=input) to *.mlp.down_proj",
                "apply parallel_adapter(r=4) to *.mlp\napply sparse(fraction=0.05) to *.o_proj",
                "apply adapter(r=2, activation=gelu) to *.mlp.down_proj",
            ),
            seed=11,
        )
    return _SHARED["model"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_assignments_with_padding_equal_each_row_alone(data: st.DataObject) -> None:
    model, names = _shared()
    choices = [*names, BASE_ROW]
    rows = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=5), label="rows")
    length = data.draw(st.integers(2, 7), label="length")
    pads = data.draw(
        st.lists(st.integers(0, length - 1), min_size=len(rows), max_size=len(rows)), label="pads"
    )
    mask = torch.ones(len(rows), length, dtype=torch.long)
    for i, pad in enumerate(pads):
        mask[i, :pad] = 0  # left padding
    assert_rows_match(model, rows, ids_for(len(rows), length, seed=len(rows) + length), mask)
