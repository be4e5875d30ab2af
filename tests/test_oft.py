"""OFT against the real PEFT 0.21: same weights give the same logits both ways through the
codec, the same trainable counts, merges that agree with PEFT's `merge_and_unload`, exact
removal; and the refusals (sizes that do not divide, conflicting or unused arguments, options
the package does not implement)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import OFTConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from surgery import PlanError, Site, rewrite
from surgery.edit import Edit
from surgery.io.peft_config import PeftFormatError
from surgery.methods.codec import CODECS
from surgery.methods.oft import rotation, skew
from surgery.models import tiny

IDS = torch.arange(3, 19).unsqueeze(0)
CODEC = CODECS["oft"]
PREFIX = "base_model.model."
# (PEFT config options, target modules): hidden 64, intermediate 172 in the tiny Llama
CASES = {
    "block16-neumann": (dict(oft_block_size=16), ["q_proj", "v_proj", "up_proj"]),
    "r4-share-exact": (
        dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False),
        ["k_proj", "o_proj"],
    ),
    "r2-terms3-down": (dict(r=2, oft_block_size=0, num_cayley_neumann_terms=3), ["down_proj"]),
    # eps large enough that the N(0, 0.1) blocks are projected but the rotation is no identity
    "block16-coft": (dict(oft_block_size=16, coft=True, eps=0.5), ["q_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny("llama").eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def peft_model(base: nn.Module, options: dict, targets: list[str]) -> PeftModel:
    """A PEFT OFT model with random (non-identity) rotations: init_weights=False draws N(0, 0.1)."""
    torch.manual_seed(3)
    config = OFTConfig(target_modules=targets, init_weights=False, **options)
    return get_peft_model(copy.deepcopy(base), config).eval()


def saved_config(model: PeftModel, tmp: Path) -> dict:
    model.peft_config["default"].save_pretrained(str(tmp))
    return json.loads((tmp / "adapter_config.json").read_text())


def edits_of(model: nn.Module) -> list[Edit]:
    return [
        Edit(path, key.name, key.method, options=key.options)
        for path, site in model.named_modules()
        if isinstance(site, Site)
        for key in site.edits
    ]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(".oft.Q")}


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_oft_both_ways_counts_merge_and_remove(base: nn.Module, case: str, tmp_path: Path):
    options, targets = CASES[case]
    theirs = peft_model(base, options, targets)
    # taken before PEFT's first forward, which projects them in place with coft
    saved = {k: v.clone() for k, v in get_peft_model_state_dict(theirs).items()}
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base))  # the rotations do something
    names = [n for n, _ in base.named_modules()]

    # PEFT -> surgery: the rules text `rewrite` takes, and the tensors
    rules, tensors = CODEC.import_(saved_config(theirs, tmp_path), saved, names)
    ours = copy.deepcopy(base)
    report = rewrite(ours, rules)
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]
    assert adapter_tensors(ours).keys() == tensors.keys()
    ours.load_state_dict(tensors, strict=False)
    assert_close(logits(ours), expected)
    projected = get_peft_model_state_dict(theirs)  # the same tensors after a forward (coft)
    for key, value in adapter_tensors(ours).items():
        assert_close(value, projected[PREFIX + key.replace(".oft.Q", ".oft_R.weight")])
    # and they train alike: the same gradients for the same loss
    for model in (ours, theirs):
        model.zero_grad()
        model(IDS).logits.square().mean().backward()
    grads = {
        k.removesuffix(".oft.Q"): p.grad for k, p in ours.named_parameters() if p.requires_grad
    }
    for key, param in theirs.named_parameters():
        if param.requires_grad:
            path = key.removeprefix("base_model.model.").removesuffix(".oft_R.default.weight")
            torch.testing.assert_close(grads.pop(path), param.grad, rtol=1e-4, atol=1e-7)
    assert not grads

    # surgery -> PEFT: a directory PeftModel.from_pretrained reads
    config, weights = CODEC.export(edits_of(ours), adapter_tensors(ours), names)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(out / "adapter_model.safetensors"))
    back = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    assert_close(logits(back), logits(ours))

    # merge: equal to the unmerged model and to PEFT's merge; remove: the base, bit for bit
    merged = copy.deepcopy(ours)
    rewrite(merged, "merge")
    assert not any(isinstance(m, Site) for m in merged.modules())
    assert_close(logits(merged), logits(ours))
    peft_merged = theirs.merge_and_unload()
    assert_close(logits(merged), logits(peft_merged))
    for key, value in peft_merged.state_dict().items():
        assert_close(merged.state_dict()[key], value)
    rewrite(ours, "remove")
    assert [type(m) for m in ours.modules()] == [type(m) for m in base.modules()]
    state = base.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize(
    "arguments",
    [
        "",
        "block_size=8",
        "r=4, share=true",
        "block_size=4, cayley=exact",
        "block_size=2, terms=2",
        "block_size=16, coft=true, eps=6e-05",
    ],
)
def test_insertion_is_bit_identical(base: nn.Module, arguments: str) -> None:
    model = copy.deepcopy(base)
    rewrite(model, f"apply oft({arguments}) to *.self_attn.<q,v>_proj, *.mlp.up_proj")
    assert torch.equal(logits(model), logits(base))


def test_zero_gives_the_identity_exactly_and_a_rotation_otherwise() -> None:
    Q = torch.zeros(3, 6)  # b = 4
    for terms in (0, 2, 3, 5, 8):
        assert torch.equal(rotation(Q, 4, terms), torch.eye(4).expand(3, 4, 4))
    Q = 0.05 * torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    S = skew(Q, 4)
    assert torch.equal(S, -S.transpose(-1, -2)) and torch.equal(S[:, 0, 1:], Q[:, :3])
    R = rotation(Q, 4, 0)  # the exact Cayley transform is orthogonal
    assert_close(R @ R.transpose(-1, -2), torch.eye(4).expand(3, 4, 4))


@given(
    b=st.sampled_from([2, 3, 4, 8]),
    blocks=st.integers(1, 4),
    share=st.booleans(),
    cayley=st.sampled_from(["exact", "terms=2", "terms=3", "terms=4", "terms=7"]),
    bias=st.booleans(),
    coft=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30, deadline=None)
def test_identity_merge_and_remove_on_random_linears(
    b: int, blocks: int, share: bool, cayley: str, bias: bool, coft: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(b * blocks, 5, bias=bias))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, b * blocks)
    with torch.no_grad():
        reference = model(x)
        args = f"block_size={b}, share={str(share).lower()}, " + (
            "cayley=exact" if cayley == "exact" else cayley
        ) + (", coft=true, eps=0.3" if coft else "")
        rewrite(model, f"apply oft({args}) to 0")
        assert torch.equal(model(x), reference)
        model[0].oft.Q.normal_(0, 0.3)
        rotated = model(x)
        merged = copy.deepcopy(model)
        rewrite(merged, "merge")
        assert_close(merged(x), rotated)
        rewrite(model, "remove")
    assert isinstance(model[0], nn.Linear)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def refusal(model: nn.Module, rules: str) -> PlanError:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError) as caught:
        rewrite(model, rules)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return caught.value


def test_block_sizes_that_do_not_divide_are_refused_at_the_argument(base: nn.Module) -> None:
    model = copy.deepcopy(base)
    error = refusal(model, "apply oft(block_size=24) to *.q_proj")
    text = str(error)
    assert "block_size=24 must divide in_features=64" in text
    assert "2, 4, 8, 16, 32, 64" in text  # the hint lists the sizes that fit
    assert "^" * len("block_size=24") in text  # the caret sits on the argument
    error = refusal(model, "apply oft(r=5) to *.q_proj")
    assert "r=5" in str(error) and "1, 2, 4, 8, 16, 32" in str(error)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("apply oft(r=4, block_size=16) to *.q_proj", "r (the number of blocks) or block_size"),
        ("apply oft(cayley=exact, terms=3) to *.q_proj", "cayley=exact has none"),
        ("apply oft(block_size=0) to *.q_proj", "needs r or block_size"),
        ("apply oft(eps=0.1) to *.q_proj", "constrained OFT, which is off"),
        ("apply oft(terms=1) to *.q_proj", "must be at least 2"),
        ("apply oft to model.embed_tokens", "attaches to Linear layers"),
    ],
)
def test_conflicting_unused_or_unsupported_arguments_are_refused(
    base: nn.Module, rules: str, message: str
) -> None:
    assert message in str(refusal(copy.deepcopy(base), rules))


@pytest.mark.parametrize(
    "option", [{"module_dropout": 0.1}, {"bias": "all"}, {"layer_replication": [[0, 1]]}]
)
def test_peft_options_not_implemented_are_refused_on_import(
    base: nn.Module, option: dict, tmp_path: Path
) -> None:
    theirs = peft_model(base, {"oft_block_size": 16}, ["q_proj"])
    config = {**saved_config(theirs, tmp_path), **option}
    with pytest.raises(PeftFormatError, match=next(iter(option))):
        CODEC.import_(config, get_peft_model_state_dict(theirs), [])


def test_hostile_tensor_keys_are_refused_on_import() -> None:
    key = 'base_model.model.x"\napply lora to **\n#.oft_R.weight'
    with pytest.raises(PeftFormatError, match="module path"):
        CODEC.import_({"oft_block_size": 4}, {key: torch.zeros(2, 6)}, [])
