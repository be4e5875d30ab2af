"""Sites are transparent in the state dict: a rewritten model's base tensors keep their original
keys (`q_proj.weight`), adapter tensors sit beside them (`q_proj.lora.A`). So a Trainer or
`save_pretrained` checkpoint of a rewritten model loads into the plain architecture with the base
exact, and back into a rewritten model with everything exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from surgery import rewrite
from surgery.errors import PlanError
from surgery.graph.logical import iter_edits
from surgery.models import tiny

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])

CASES = {
    "lora_qv": ("llama", "apply lora(r=2) to *.self_attn.<q,v>_proj"),
    # fused parts, and a LoRA on GPT-2's lm_head, whose weight is tied to the embedding
    "gpt2_fused": ("gpt2", "use auto\napply lora(r=2) to attn.q, attn.v\n"
                   "apply lora(r=2) to lm_head as head"),
    "ia3": ("llama", "apply ia3 to *.self_attn.<k,v>_proj"),
    "dora": ("llama", "apply dora(r=2) to *.self_attn.q_proj"),
    "stacked": ("llama", "apply lora(r=2) to *.self_attn.q_proj\napply ia3 to *.self_attn.q_proj"),
    # a site inside the module another site wraps
    "nested": ("llama", "apply lora(r=2) to *.mlp.down_proj\napply adapter(r=2) to *.mlp"),
}


def rewritten(case: str, seed: int = 0) -> nn.Module:
    """The case's model, rewritten, with every adapter tensor moved off its (often zero) init so
    that a load which dropped one would show."""
    family, rules = CASES[case]
    model = tiny(family, seed=seed).eval()
    rewrite(model, rules)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, adapter in iter_edits(model):
            for tensor in adapter.state_dict(keep_vars=True).values():
                if tensor.is_floating_point():
                    tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


def adapter_keys(model: nn.Module) -> set[str]:
    return {
        f"{path}.{edit}.{name}"
        for path, edit, adapter in iter_edits(model)
        for name in adapter.state_dict()
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("case", CASES)
def test_save_pretrained_loads_into_the_plain_architecture(case: str, tmp_path) -> None:
    model = rewritten(case)
    plain_keys = list(tiny(CASES[case][0]).state_dict())
    state = model.state_dict()
    added = adapter_keys(model)
    assert [k for k in state if k not in added] == plain_keys  # the plain keys, in their order
    assert set(state) == set(plain_keys) | added
    model.save_pretrained(tmp_path)  # safetensors; drops tied duplicates by key
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()  # nothing re-initialized at random
    assert info["mismatched_keys"] == set()
    assert info["unexpected_keys"] == added
    loaded = plain.state_dict()
    assert list(loaded) == plain_keys
    assert all(torch.equal(loaded[k], state[k]) for k in plain_keys)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_loads_back_into_a_rewritten_model_exactly(case: str, tmp_path) -> None:
    model = rewritten(case)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = rewritten(case, seed=7)
    result = fresh.load_state_dict(saved, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    again = fresh.state_dict()
    assert list(again) == list(saved)
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert torch.equal(logits(fresh), logits(model))


def test_a_plain_state_dict_leaves_exactly_the_adapters_missing() -> None:
    plain = tiny("llama", seed=3).state_dict()
    model = rewritten("nested")
    result = model.load_state_dict(plain, strict=False)
    assert set(result.missing_keys) == adapter_keys(model) and result.unexpected_keys == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.items())


@pytest.mark.parametrize("action", ["merge", "remove"])
def test_keys_are_plain_again_after_merge_or_remove(action: str) -> None:
    model = rewritten("lora_qv")
    rewrite(model, action)
    assert list(model.state_dict()) == list(tiny("llama").state_dict())


def test_load_errors_name_the_keys_the_caller_gave() -> None:
    model = rewritten("nested")
    state = dict(model.state_dict())
    at = "model.layers.0.mlp"
    del state[f"{at}.down_proj.weight"]  # a site's base inside another site's base
    state[f"{at}.down_proj.stray"] = torch.zeros(1)
    state[f"{at}.up_proj.weight"] = torch.zeros(3)
    state[f"{at}.down_proj.lora.A"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)
    text = str(error.value)
    assert f'Missing key(s) in state_dict: "{at}.down_proj.weight"' in text
    assert f'Unexpected key(s) in state_dict: "{at}.down_proj.stray"' in text
    assert f"size mismatch for {at}.up_proj.weight" in text
    assert f"size mismatch for {at}.down_proj.lora.A" in text
    assert ".base." not in text


def test_old_physical_keys_are_refused_not_misread() -> None:
    """`q_proj.base.weight` (a state dict saved before sites were transparent) is not taken for
    `q_proj.weight`: a strict load names both keys."""
    model = rewritten("lora_qv")
    state = dict(model.state_dict())
    key = "model.layers.0.self_attn.q_proj"
    state[f"{key}.base.weight"] = state.pop(f"{key}.weight")
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [f"{key}.weight"]
    assert result.unexpected_keys == [f"{key}.base.weight"]


def test_keep_vars_assign_and_compiled_prefix() -> None:
    model = rewritten("lora_qv")
    site = model.model.layers[0].self_attn.q_proj
    live = model.state_dict(keep_vars=True)
    assert live["model.layers.0.self_attn.q_proj.weight"] is site.base.weight
    assert live["model.layers.0.self_attn.q_proj.lora.A"] is site.lora.A
    compiled = torch.compile(model)  # nothing compiles before a call
    assert list(compiled.state_dict()) == [f"_orig_mod.{k}" for k in model.state_dict()]
    new = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(new, assign=True)
    assert site.base.weight is not live["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(site.base.weight, new["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(site.lora.B, new["model.layers.0.self_attn.q_proj.lora.B"])


def test_named_parameters_stay_physical_and_both_names_resolve() -> None:
    """named_parameters/named_modules follow the real module tree (what module-replacing tools
    and `get_submodule` need); the logical name resolves to the same tensor."""
    model = rewritten("lora_qv")
    names = dict(model.named_parameters())
    key = "model.layers.0.self_attn.q_proj"
    assert names[f"{key}.base.weight"] is model.get_parameter(f"{key}.weight")
    assert names[f"{key}.lora.A"] is model.state_dict(keep_vars=True)[f"{key}.lora.A"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.proj.register_buffer("scale", torch.ones(4))
        self.proj.inner = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("name", ["weight", "bias", "scale", "inner", "base"])
def test_an_edit_cannot_take_a_name_of_the_base(name: str) -> None:
    """Edit names never clash with the wrapped module's keys: parameter, buffer and child names
    (and the site's own `base`) are refused at plan time, the model unchanged."""
    model = _Block()
    with pytest.raises(PlanError):
        rewrite(model, f"apply lora(r=2) to proj as {name}")
    assert type(model.proj) is nn.Linear
