"""Sites: readable fx code, shared templates, exact erasure, and behaviour as a module."""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgery import Site, rewrite
from surgery.graph.compare import same_structure
from surgery.graph.site import build_graph


def q_site(model: nn.Module, layer: int = 0) -> Site:
    site = model.model.layers[layer].self_attn.q_proj
    assert isinstance(site, Site)
    return site


def test_site_is_a_graph_module_calling_the_original_module(llama: nn.Module) -> None:
    original = llama.model.layers[0].self_attn.q_proj
    rewrite(llama, "apply lora(r=4, alpha=8) to *.self_attn.q_proj")
    site = q_site(llama)
    assert isinstance(site, torch.fx.GraphModule)
    assert site.base is original
    code = site.code
    assert "self.base(" in code and "self.lora.A" in code and "self.lora.B" in code
    assert "* 2.0" in code  # alpha / r
    assert [n.op for n in site.graph.nodes].count("call_module") == 1  # only base, no dropout


def test_sites_of_one_structure_share_graph_and_code(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4) to *.self_attn.q_proj")
    first, last = q_site(llama, 0), q_site(llama, 3)
    assert first.graph is last.graph and type(first) is type(last)
    assert first.lora is not last.lora


def test_site_reads_through_to_base_attributes(llama: nn.Module) -> None:
    base = llama.model.layers[0].self_attn.q_proj
    rewrite(llama, "apply lora to *.self_attn.q_proj")
    site = q_site(llama)
    assert site.weight is base.weight and site.in_features == base.in_features


def test_erasing_an_edit_leaves_exactly_the_fresh_graph(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4) to *.self_attn.q_proj as a\n"
                   "apply lora(r=2, dropout=0.1) to *.self_attn.q_proj as b")
    both = q_site(llama)
    rewrite(llama, "remove a")
    only_b = q_site(llama)
    fresh = build_graph(both._surgery_signature, (both.edits[1],))
    assert same_structure(only_b.graph, fresh)
    assert not same_structure(both.graph, fresh)
    assert only_b.edit_names() == ["b"]


def test_edits_compose_additively(llama: nn.Module) -> None:
    x = torch.randn(3, 64)
    rewrite(llama, "apply lora(r=4) to *.self_attn.q_proj as a\n"
                   "apply lora(r=2, alpha=1) to *.self_attn.q_proj as b")
    site = q_site(llama)
    for adapter in (site.a, site.b):
        nn.init.normal_(adapter.B)
    expected = site.base(x) + x @ site.a.delta_weight().T + x @ site.b.delta_weight().T
    torch.testing.assert_close(site(x), expected, rtol=1e-5, atol=1e-5)


def test_deepcopy_keeps_sites_working(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4) to *.self_attn.<q,v>_proj")
    nn.init.normal_(q_site(llama).lora.B)
    clone = copy.deepcopy(llama)
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(clone(ids).logits, llama(ids).logits)
    rewrite(clone, "merge")
    assert isinstance(q_site(llama), Site)  # the original is untouched
    assert not any(isinstance(m, Site) for m in clone.modules())


def test_dropout_only_in_training(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4, dropout=0.5) to *.self_attn.q_proj")
    site = q_site(llama)
    nn.init.normal_(site.lora.B)
    x = torch.randn(4, 64)
    site.eval()
    assert torch.equal(site(x), site(x))
    site.train()
    assert not torch.equal(site(x), site(x))


def test_gradients_reach_only_the_adapters(llama: nn.Module) -> None:
    rewrite(llama, "apply lora(r=4) to *.self_attn.<q,v>_proj")
    ids = torch.arange(12).unsqueeze(0)
    llama(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in llama.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in llama.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora.A", ".lora.B")) for n in with_grad)
    assert any(n.endswith(".lora.A") for n in with_grad)  # A gets a gradient through B's grad
