"""Adapter arithmetic (`adapter NAME = combine(...) using HOW(...)`) against the real PEFT 0.21
`add_weighted_adapter` in the same process: the same source LoRAs give the same combined
updates (exactly for every deterministic combination; for DARE the same masks when PEFT's call
follows `torch.manual_seed(seed)` on CPU, plus a statistical check of the masks themselves), and
the combined adapter's logits equal PEFT's. Plan-time refusals leave the model unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgery import rewrite
from surgery.adapters.units import adapter_names, set_active
from surgery.errors import PlanError, SurgeryError
from surgery.graph.site import Site
from surgery.methods import REGISTRY
from surgery.models import tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64], [5, 6, 7, 8, 9, 10, 11, 12]])
# sql: r=4 alpha=8 on q and v; chat: r=4 alpha=4 on q only (v has one source: PEFT's union)
SOURCES = (
    "adapter sql { apply lora(r=4, alpha=8) to *.self_attn.<q,v>_proj }\n"
    "adapter chat { apply lora(r=4, alpha=4) to *.self_attn.q_proj }\n"
)
WEIGHTS = {"sql": 0.7, "chat": -0.4}
DENSITY, SEED = 0.5, 11
# statement -> PEFT's add_weighted_adapter keywords
CASES = {
    "linear": {},
    "cat": {},
    "svd": {},
    "svd(rank=3, clamp=0.95)": {"svd_rank": 3, "svd_clamp": 0.95},
    "ties(density=0.5)": {"density": DENSITY},
    "ties(density=0.5, sign=frequency)": {"density": DENSITY, "majority_sign_method": "frequency"},
    "magnitude_prune(density=0.5)": {"density": DENSITY},
    "dare_linear(density=0.5, seed=11)": {"density": DENSITY},
    "dare_ties(density=0.5, seed=11)": {"density": DENSITY},
    "ties_svd(density=0.5, rank=6)": {"density": DENSITY, "svd_rank": 6},
    "dare_linear_svd(density=0.5, seed=11)": {"density": DENSITY},
    "dare_ties_svd(density=0.5, seed=11)": {"density": DENSITY},
    "magnitude_prune_svd(density=0.5)": {"density": DENSITY},
}


def randomize(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith((".A", ".B")):
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def sites(model: nn.Module) -> dict[str, Site]:
    return {path: m for path, m in model.named_modules() if isinstance(m, Site)}


def ours_delta(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """path -> s · B A of the adapter's edit there."""
    out = {}
    for path, site in sites(model).items():
        for key in site.edits:
            if key.adapter == adapter:
                edit = site.edit_module(key.name)
                out[path] = key.option("scaling") * (edit.B.detach() @ edit.A.detach())
    return out


def peft_delta(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[path.removeprefix("base_model.model.")] = module.get_delta_weight(adapter)
    return out


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module]:
    """Our model with adapters sql and chat, and a PEFT model with the same two LoRAs."""
    ours = tiny("llama")
    rewrite(ours, SOURCES)
    randomize(ours)
    theirs = peft.get_peft_model(
        tiny("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        adapter_name="sql",
    )
    theirs.add_adapter("chat", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, tensor in ours.state_dict().items():
            if key.endswith((".A", ".B")):
                path, adapter, factor = key.rsplit(".", 2)
                named[f"base_model.model.{path}.lora_{factor}.{adapter}.weight"].copy_(tensor)
    theirs.eval()
    for name in ("sql", "chat"):
        torch.testing.assert_close(ours_delta(ours, name), peft_delta(theirs, name))
    return ours, theirs


@pytest.mark.parametrize("how", list(CASES))
def test_each_combination_equals_peft_add_weighted_adapter(
    pair, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = pair
    name = "c" + str(list(CASES).index(how))
    kind = how.split("(")[0]
    rewrite(ours, f"adapter {name} = combine(sql: 0.7, chat: -0.4) using {how}")
    # PEFT's DARE draws its masks from the global generator, right after initializing the new
    # adapter's tensors (which draws from it too): seed it there, as `seed=` seeds ours
    inject = theirs.base_model.inject_adapter

    def seeded_inject(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(theirs.base_model, "inject_adapter", seeded_inject)
    theirs.add_weighted_adapter(
        list(WEIGHTS), list(WEIGHTS.values()), name, combination_type=kind, **CASES[how]
    )
    mine, peft_result = ours_delta(ours, name), peft_delta(theirs, name)
    assert sorted(mine) == sorted(peft_result) and len(mine) == 8  # q and v of 4 layers
    for path in mine:
        torch.testing.assert_close(mine[path], peft_result[path], rtol=1e-5, atol=1e-5)
        # the same operations in the same order: the factors themselves are bit-identical
        edit, layer = (
            sites(ours)[path].edit_module(name),
            theirs.get_submodule("base_model.model." + path),
        )
        assert torch.equal(edit.A, layer.lora_A[name].weight)
        assert torch.equal(edit.B, layer.lora_B[name].weight)
    if kind in ("cat", "linear", "ties", "dare_ties"):  # the adapter's logits, through the model
        set_active(ours, name)
        theirs.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
        set_active(ours, "sql")


def test_cat_is_the_exact_weighted_sum_for_any_ranks() -> None:
    model = tiny("llama")
    rewrite(model, "adapter a { apply lora(r=2, rslora=true) to *.q_proj }\n"
                   "adapter b { apply lora(r=5, alpha=3) to *.<q,k>_proj }")  # fmt: skip
    randomize(model, seed=3)
    rewrite(model, "adapter sum = combine(a: 2, b: -0.5) using cat")
    a, b, total = (ours_delta(model, n) for n in ("a", "b", "sum"))
    for path, delta in total.items():
        expected = 2 * a.get(path, 0) - 0.5 * b[path]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    edit = next(iter(sites(model).values())).edit_module("sum")
    assert edit.A.shape[0] == 7 and not edit.A.requires_grad  # rank 2 + 5, frozen as in PEFT


def test_dare_masks_are_seeded_and_keep_the_density_fraction() -> None:
    """DARE is random: the same seed gives the same adapter, another seed another one, and the
    kept fraction of A's entries (one source of weight 1, s = 1: A = mask · A / density) is
    the density within 5 standard deviations over the 2,048 entries."""
    model = tiny("llama")
    rewrite(model, "adapter a { apply lora(r=4, alpha=4) to *.self_attn.<q,v>_proj }")
    randomize(model)
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        rewrite(model, f"adapter {name} = combine(a: 1) using dare_linear(density=0.3, "
                       f"seed={seed})")  # fmt: skip
    kept, same, other = [], [], []
    for site in sites(model).values():
        A, x, y, z = (site.edit_module(n).A.detach() for n in ("a", "x", "y", "z"))
        kept.append(x != 0)
        torch.testing.assert_close(x[x != 0], (A / 0.3)[x != 0])
        same.append(torch.equal(x, y))
        other.append(torch.equal(x, z))
    fraction = torch.cat([k.flatten() for k in kept]).float().mean().item()
    assert abs(fraction - 0.3) < 5 * (0.3 * 0.7 / 2048) ** 0.5
    assert all(same) and not any(other)


def test_the_combined_adapter_routes_and_survives_save_and_load(tmp_path) -> None:
    from surgery.io import load_adapters, write_adapter_dir
    from surgery.lang.parser import parse
    from surgery.plan import make_plan

    model = tiny("llama")
    rewrite(model, SOURCES)
    randomize(model)
    combine = "adapter mix = combine(sql: 1, chat: 1) using svd(rank=4)\n"
    rewrite(model, combine)
    assert adapter_names(model) == ["sql", "chat", "mix"]
    set_active(model, "mix")
    with torch.no_grad():
        alone = model(IDS).logits
    if REGISTRY["lora"].emit_routed is not None:  # LoRA's routing is another part of issue 11
        with torch.no_grad():
            rows = model(IDS, adapter_names=["mix", "sql"]).logits
        torch.testing.assert_close(rows[0], alone[0], rtol=1e-5, atol=1e-5)
    plan = make_plan(tiny("llama"), parse(SOURCES + combine))
    write_adapter_dir(model, tmp_path / "a", rules_text=SOURCES + combine, plan=plan)
    loaded = tiny("llama")
    load_adapters(loaded, tmp_path / "a")  # one folder per adapter; mix's holds its own edits
    assert "combine" not in (tmp_path / "a" / "mix" / "rules.surg").read_text()
    set_active(loaded, "mix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("statement", "message", "caret"),
    [
        ("adapter m = combine(sql: 1, chta: 1) using cat", "no adapter named 'chta'", "chta: 1"),
        ("adapter m = combine(sql: 1, sql: 2) using cat", "'sql' is named twice", "sql: 2"),
        ("adapter sql = combine(chat: 1) using cat", "already has an adapter named 'sql'", "sql"),
        ("adapter m = combine(sql: 1) using tie(density=0.5)", "no combination named", "tie"),
        ("adapter m = combine(sql: 1) using ties", "ties needs density", "ties"),
        ("adapter m = combine(sql: 1) using ties(density=0)", "must be in (0, 1]", "density=0"),
        ("adapter m = combine(sql: 1) using linear(density=0.5)", "no option 'density'",
         "density=0.5"),
        ("adapter m = combine(sql: 1) using svd(rank=65)", "exceeds", "rank=65"),
        ("adapter m = combine(sql: 1, odd: 1) using linear", "need one rank", "linear"),
        ("adapter m = combine(sql: 1, ia: 1) using cat", "not a plain LoRA: its method is ia3",
         "ia: 1"),
        ("adapter m = combine(sql: 1, dora: 1) using cat", "its method is dora", "dora: 1"),
    ],
)  # fmt: skip
def test_refusals_are_located_and_change_nothing(statement: str, message: str, caret: str):
    model = tiny("llama")
    rewrite(model, "adapter sql { apply lora(r=4) to *.self_attn.<q,v>_proj }\n"
                   "adapter chat { apply lora(r=4) to *.self_attn.q_proj }\n"
                   "adapter odd { apply lora(r=2) to *.self_attn.q_proj }\n"
                   "adapter ia { apply ia3 to *.mlp.down_proj }\n"
                   "adapter dora { apply dora(r=4) to *.self_attn.k_proj }")  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("]", r"\]")) as error:
        rewrite(model, statement)
    assert error.value.span.text == caret
    assert adapter_names(model) == ["sql", "chat", "odd", "ia", "dora"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


def test_a_weight_that_is_not_a_number_is_a_syntax_error() -> None:
    with pytest.raises(SurgeryError, match="the weight of 'sql' must be a number"):
        rewrite(tiny("llama"), "adapter m = combine(sql: fast) using cat")


def test_the_api_runs_the_same_statement_and_the_plan_round_trips() -> None:
    from surgery.adapters.combine import combine_adapters
    from surgery.plan import Plan

    model = tiny("llama")
    rewrite(model, SOURCES)
    randomize(model)
    report = combine_adapters(
        model, "mix", ["sql", "chat"], [0.7, -0.4], how="ties", density=0.5, sign="frequency"
    )
    (step,) = report.plan.steps
    assert step.action == "combine" and dict(step.arguments)["source.chat"] == -0.4
    assert Plan.from_dict(report.plan.to_dict()) == report.plan
    twin = tiny("llama")
    rewrite(twin, SOURCES)
    randomize(twin)
    rewrite(twin, "adapter mix = combine(sql: 0.7, chat: -0.4) using ties(density=0.5, "
                  "sign=frequency)")  # fmt: skip
    torch.testing.assert_close(ours_delta(model, "mix"), ours_delta(twin, "mix"), rtol=0, atol=0)
    with pytest.raises(PlanError, match="one weight per source"):
        combine_adapters(model, "x", ["sql", "chat"], [1.0], how="cat")
    with pytest.raises(PlanError, match="must be a finite number"):
        combine_adapters(model, "x", ["sql"], [float("nan")], how="cat")


def test_cat_and_full_rank_svd_are_exact_on_gpt2_conv1d_and_an_embedding() -> None:
    """GPT-2's Conv1D stores its weight [in, out] and an Embedding's LoRA is transposed: the
    combined adapter computes what both sources active together compute."""
    model = tiny("gpt2")
    rewrite(model, "adapter a { apply lora(r=2) to *.attn.c_attn, ^transformer.wte }\n"
                   "adapter b { apply lora(r=3, alpha=5) to *.attn.c_attn }")  # fmt: skip
    randomize(model)
    rewrite(model, "adapter s = combine(a: 1, b: 1) using cat\n"
                   "adapter v = combine(a: 1, b: 1) using svd(rank=5)")  # fmt: skip
    logits = {}
    for active in (("a", "b"), ("s",), ("v",)):
        set_active(model, active)
        with torch.no_grad():
            logits[active] = model(IDS).logits
    torch.testing.assert_close(logits[("s",)], logits[("a", "b")], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[("v",)], logits[("a", "b")], rtol=1e-4, atol=1e-4)


def test_surgery_check_finds_what_needs_no_model() -> None:
    from surgery.lang.parser import parse
    from surgery.plan import lint

    assert lint(parse("adapter m = combine(a: 1) using cat\nmerge m")) == []
    for text, message in (
        ("adapter m = combine(a: 1) using tie", "no combination named 'tie'"),
        ("adapter m = combine(a: 1, a: 2) using cat", "named twice"),
        ("adapter m = combine(a: 1e999) using cat", "must be finite"),
        ("adapter m = combine(a: 1) using dare_ties(density=0.5, seed=-1)", "must be in"),
    ):
        with pytest.raises(PlanError, match=message):
            lint(parse(text))
