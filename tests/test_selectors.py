"""Selector semantics, as documented in docs/language.md ("the matching rules")."""

from __future__ import annotations

import pytest
import torch

from surgery import ResolveError, rewrite


def paths(model: torch.nn.Module, selector: str) -> list[str]:
    plan = rewrite(model, f"apply lora(r=1) to {selector}", dry_run=True)
    return [t.path for t in plan.targets]


def test_card_line_matches_exactly_the_q_and_v_projections(llama: torch.nn.Module) -> None:
    got = paths(llama, "*.self_attn.<q,v>_proj")
    layers = llama.config.num_hidden_layers
    assert got == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"]


def test_whole_segments_only(llama: torch.nn.Module) -> None:
    assert len(paths(llama, "q_proj")) == 4
    with pytest.raises(ResolveError):
        paths(llama, "_proj")
    with pytest.raises(ResolveError):
        paths(llama, "q_pro")


def test_star_is_exactly_one_segment(llama: torch.nn.Module) -> None:
    assert len(paths(llama, "layers.*.self_attn.q_proj")) == 4
    with pytest.raises(ResolveError):  # self_attn is two segments below layers
        paths(llama, "layers.*.q_proj")
    assert len(paths(llama, "layers.**.q_proj")) == 4


def test_anchor(llama: torch.nn.Module) -> None:
    assert paths(llama, "^lm_head") == ["lm_head"]
    assert len(paths(llama, "^model.layers.*.mlp.up_proj")) == 4
    with pytest.raises(ResolveError):
        paths(llama, "^layers.0.mlp.up_proj")  # not at the root


def test_star_inside_a_name_stays_in_the_segment(llama: torch.nn.Module) -> None:
    assert [p.rsplit(".", 1)[1] for p in paths(llama, "layers[0].mlp.*_proj")] == [
        "gate_proj", "up_proj", "down_proj"]


def test_indices_and_slices(llama: torch.nn.Module) -> None:
    def layers(sel: str) -> list[int]:
        return [int(p.split(".")[2]) for p in paths(llama, sel)]

    assert layers("layers[0].mlp.up_proj") == [0]
    assert layers("layers[-1].mlp.up_proj") == [3]
    assert layers("layers[1:3].mlp.up_proj") == [1, 2]
    assert layers("layers[-2:].mlp.up_proj") == [2, 3]
    assert layers("layers[::2].mlp.up_proj") == [0, 2]
    assert layers("layers[0, 3].mlp.up_proj") == [0, 3]
    assert layers("layers[3, 0:2].mlp.up_proj") == [0, 1, 3]  # model order, each once


@pytest.mark.parametrize("selector", ["layers[4].mlp.up_proj", "layers[-5].mlp.up_proj",
                                      "layers[2:9].mlp.up_proj", "layers[3:1].mlp.up_proj",
                                      "mlp[0].up_proj"])
def test_bad_indices_are_errors_not_clipping(llama: torch.nn.Module, selector: str) -> None:
    with pytest.raises(ResolveError):
        paths(llama, selector)


def test_type_filter_includes_subclasses(falcon: torch.nn.Module) -> None:
    got = paths(falcon, "h.0.** : Linear")
    assert "transformer.h.0.self_attention.query_key_value" in got
    assert all(type(falcon.get_submodule(p)).__name__ == "FalconLinear" for p in got)


def test_every_selector_and_option_must_match(llama: torch.nn.Module) -> None:
    with pytest.raises(ResolveError, match="option 'x'"):
        paths(llama, "*.self_attn.<q,x>_proj")
    with pytest.raises(ResolveError, match="nothing"):
        paths(llama, "*.self_attn.q_proj, *.nonexistent")


def test_union_is_deduplicated_in_model_order(llama: torch.nn.Module) -> None:
    got = paths(llama, "layers[1].mlp.up_proj, *.mlp.up_proj, layers[0].mlp.up_proj")
    assert got == [f"model.layers.{i}.mlp.up_proj" for i in range(4)]


def test_aliases_with_prefix_and_index(llama: torch.nn.Module) -> None:
    rules = "use llama\napply lora(r=1) to layers[0:2].mlp.up_proj, attn.q"
    got = [t.path for t in rewrite(llama, rules, dry_run=True).targets]
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                   "model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]


def test_sites_are_transparent_and_adapters_selectable(llama: torch.nn.Module) -> None:
    rewrite(llama, "apply lora(r=2) to *.self_attn.q_proj as main")
    plan = rewrite(llama, "freeze **\nunfreeze *.main, ^model.layers.0.self_attn.q_proj.weight",
                   dry_run=True)
    unfrozen = plan.steps[1].param_paths
    assert "model.layers.0.self_attn.q_proj.weight" in unfrozen
    assert "model.layers.3.self_attn.q_proj.main.B" in unfrozen
    assert len(unfrozen) == 4 * 2 + 1
    # apply never targets adapter insides, and a site is still found under its path
    assert paths(llama, "*.q_proj") == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
