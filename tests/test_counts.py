"""Parameter counts on full-size skeletons (meta device) against public figures and PEFT.

Planning and rewriting a 7B-405B skeleton on the meta device costs no memory: adapters are
built on meta too. The plan's counts (a dry run) must equal the real counts after execution.
"""

from __future__ import annotations

import pytest
from torch import nn

from surgery import Site, rewrite
from surgery.models import PRESETS, load_model, tiny

QV = "apply lora(r=8) to *.self_attn.<q,v>_proj"
ALL_SEVEN = "apply lora(r=8) to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj"
FALCON_QKV = "apply lora(r=8) to *.self_attention.query_key_value"

LLAMA_7B_BASE = 6_738_415_616  # Llama-2-7B's published parameter count
FALCON_7B_BASE = 6_921_720_704  # Falcon-7B (embeddings tied with the head)


def real_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over unique parameters, as PEFT counts them."""
    params = list(model.parameters())  # de-duplicates tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def llama_base_count(name: str) -> int:
    """Llama parameter count from the config, by formula (untied embeddings and head)."""
    c = PRESETS[name][0]()
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    assert not c.tie_word_embeddings
    return 2 * c.vocab_size * h + c.num_hidden_layers * layer + h


def llama_qv_lora_count(name: str, r: int) -> int:
    c = PRESETS[name][0]()
    h = c.hidden_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    return c.num_hidden_layers * r * ((h + h) + (h + kv))


def sites(model: nn.Module) -> list[Site]:
    return [m for m in model.modules() if isinstance(m, Site)]


def peft_counts(model: nn.Module, targets: list[str], r: int = 8) -> tuple[int, int]:
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=targets))
    return wrapped.get_nb_trainable_parameters()


# ---- Llama-2-7B ---------------------------------------------------------------------------


def test_llama_7b_base_count() -> None:
    model = load_model("llama-2-7b", meta=True)
    assert real_counts(model)[1] == LLAMA_7B_BASE == llama_base_count("llama-2-7b")


def test_llama_7b_lora_qv() -> None:
    model = load_model("llama-2-7b", meta=True)
    plan = rewrite(model, QV, dry_run=True)
    assert plan.total_before == LLAMA_7B_BASE
    assert plan.trainable == 4_194_304
    assert plan.total == 6_742_609_920
    line = "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    assert plan.totals_line() == line
    assert len(plan.targets) == 64
    assert {t.shapes for t in plan.targets} == {(("A", (8, 4096)), ("B", (4096, 8)))}
    assert sites(model) == [], "a dry run changed the model"

    report = rewrite(model, QV)
    assert (report.trainable, report.total) == (plan.trainable, plan.total)
    assert report.totals_line() == line
    assert real_counts(model) == (4_194_304, 6_742_609_920)
    assert len(sites(model)) == 64


def test_llama_7b_lora_all_seven_projections() -> None:
    model = load_model("llama-2-7b", meta=True)
    plan = rewrite(model, ALL_SEVEN, dry_run=True)
    assert plan.trainable == 19_988_480
    assert plan.total == LLAMA_7B_BASE + 19_988_480
    assert len(plan.targets) == 7 * 32
    report = rewrite(model, ALL_SEVEN)
    assert (report.trainable, report.total) == (plan.trainable, plan.total)
    assert real_counts(model) == (plan.trainable, plan.total)
    assert len(sites(model)) == 7 * 32


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_llama_7b_counts_match_peft() -> None:
    ours = rewrite(load_model("llama-2-7b", meta=True), ALL_SEVEN, dry_run=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft_counts(load_model("llama-2-7b", meta=True), targets)
    assert (ours.trainable, ours.total) == theirs


def test_adapters_on_meta_stay_on_meta() -> None:
    model = load_model("llama-2-7b", meta=True)
    rewrite(model, ALL_SEVEN)
    adapter_params = [
        p
        for site in sites(model)
        for e in site.edits
        for p in site.get_submodule(e.name).parameters()
    ]
    assert len(adapter_params) == 2 * 7 * 32
    assert sum(p.numel() for p in adapter_params) == 19_988_480
    assert all(p.is_meta for p in adapter_params)
    assert all(p.requires_grad for p in adapter_params)
    # nothing anywhere in the model holds real memory
    assert all(t.is_meta for t in model.state_dict().values())
    assert all(p.is_meta for p in model.parameters())


def test_merge_and_remove_on_meta_restore_the_counts() -> None:
    model = load_model("llama-2-7b", meta=True)
    rewrite(model, QV)
    plan = rewrite(model, "remove", dry_run=True)
    assert (plan.trainable, plan.total) == (0, LLAMA_7B_BASE)
    rewrite(model, "remove")
    assert sites(model) == []
    assert real_counts(model) == (0, LLAMA_7B_BASE)
    rewrite(model, QV + "\nmerge")
    assert sites(model) == []
    assert real_counts(model)[1] == LLAMA_7B_BASE


# ---- Falcon-7B ----------------------------------------------------------------------------


def test_falcon_7b_lora_fused_qkv() -> None:
    model = load_model("falcon-7b", meta=True)
    plan = rewrite(model, FALCON_QKV, dry_run=True)
    assert plan.total_before == FALCON_7B_BASE
    assert plan.trainable == 2_359_296
    # query_key_value: 4544 -> 4544 + 2 * 64 (71 query heads of 64, one shared k and v head)
    assert {t.shapes for t in plan.targets} == {(("A", (8, 4544)), ("B", (4672, 8)))}
    report = rewrite(model, FALCON_QKV)
    assert (report.trainable, report.total) == (2_359_296, FALCON_7B_BASE + 2_359_296)
    assert real_counts(model) == (report.trainable, report.total)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_falcon_7b_counts_match_peft() -> None:
    ours = rewrite(load_model("falcon-7b", meta=True), FALCON_QKV, dry_run=True)
    theirs = peft_counts(load_model("falcon-7b", meta=True), ["query_key_value"])
    assert (ours.trainable, ours.total) == theirs


# ---- the largest presets: counts by formula -----------------------------------------------


@pytest.mark.parametrize("name", ["llama-2-70b", "llama-3.1-405b"])
def test_large_presets_plan_and_apply_on_meta(name: str) -> None:
    model = load_model(name, meta=True)
    base = llama_base_count(name)
    expected = llama_qv_lora_count(name, 8)
    plan = rewrite(model, QV, dry_run=True)
    assert plan.total_before == base
    assert (plan.trainable, plan.total) == (expected, base + expected)
    report = rewrite(model, QV)
    assert (report.trainable, report.total) == (plan.trainable, plan.total)
    assert real_counts(model) == (plan.trainable, plan.total)


def test_large_preset_figures() -> None:
    # the formula itself, against the published sizes
    assert llama_base_count("llama-2-70b") == 68_976_648_192
    assert llama_base_count("llama-3.1-405b") == 405_853_388_800
    assert llama_qv_lora_count("llama-2-70b", 8) == 16_384_000
    assert llama_qv_lora_count("llama-3.1-405b", 8) == 50_577_408


# ---- dry-run counts equal real counts (tiny models, real tensors) -------------------------

PROGRAMS = [
    "apply lora(r=4) to *.self_attn.<q,v>_proj",
    "apply lora(r=2, alpha=4) to ** : Linear",
    "apply lora to *.q_proj\nunfreeze *.input_layernorm, ^model.norm",
    "apply lora to *.q_proj\nfreeze *.q_proj.lora.A",
    "apply lora to *.q_proj\napply lora(r=2) to *.v_proj as second\nmerge second",
    "apply lora to *.<q,v>_proj\nremove lora\napply lora(r=4) to *.k_proj",
    "use llama\n"
    "apply lora(r=4) to layers[0:2].self_attn.q_proj, layers[-1].mlp.down_proj\n"
    "unfreeze embed",
    "freeze **\nunfreeze ^lm_head",
    "apply oft(block_size=16) to *.self_attn.<q,v>_proj\napply oft(r=2, share=true) to *.down_proj",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_plan_counts_equal_real_counts_llama(program: str) -> None:
    model = tiny("llama")
    plan = rewrite(model, program, dry_run=True)
    report = rewrite(model, program)
    assert (plan.trainable, plan.total) == (report.trainable, report.total)
    assert real_counts(model) == (plan.trainable, plan.total)


def test_plan_counts_equal_real_counts_falcon_tied_embeddings() -> None:
    model = tiny("falcon")
    embedding = model.get_input_embeddings().weight
    assert embedding is model.get_output_embeddings().weight  # Falcon ties them
    program = "apply lora(r=4) to *.query_key_value, *.dense_4h_to_h\nunfreeze ^lm_head"
    plan = rewrite(model, program, dry_run=True)
    rewrite(model, program)
    assert real_counts(model) == (plan.trainable, plan.total)
    # the shared matrix counts once, and unfreezing the head unfreezes the embedding
    assert embedding.requires_grad
    lora = 4 * 4 * ((64 + 96) + (256 + 64))
    assert plan.trainable == lora + embedding.numel()


def test_step_counts_are_running_totals() -> None:
    model = tiny("llama")
    program = "apply lora(r=4) to *.q_proj\nunfreeze ^model.norm\napply lora(r=2) to *.v_proj as v"
    plan = rewrite(model, program, dry_run=True)
    q = 4 * 4 * (64 + 64)
    v = 4 * 2 * (64 + 32)
    assert [s.trainable_after for s in plan.steps] == [q, q + 64, q + v]
    assert plan.steps[-1].total_after == plan.total


# ---- the other families' skeletons ---------------------------------------------------------

ROBERTA_QV = "use roberta\napply lora(r=8) to attn.q, attn.v"


@pytest.mark.parametrize(
    "name, base, lora",
    [
        # RobertaForMaskedLM; the LoRA paper's Table 2 lists LoRA on query, value at 0.3M / 0.8M
        ("roberta-base", 124_697_433, 294_912),
        ("roberta-large", 355_412_057, 786_432),
    ],
)
def test_roberta_lora_qv_matches_the_lora_paper(name: str, base: int, lora: int) -> None:
    c = PRESETS[name].config()
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    assert lora == n * 2 * 8 * (h + h)
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    lm_head = (h * h + h) + 2 * h + c.vocab_size  # dense, layer norm, decoder bias (weight tied)
    assert base == embeddings + n * layer + lm_head

    model = load_model(name, meta=True)
    plan = rewrite(model, ROBERTA_QV, dry_run=True)
    assert (plan.total_before, plan.trainable, plan.total) == (base, lora, base + lora)
    assert len(plan.targets) == 2 * n
    report = rewrite(model, ROBERTA_QV)
    assert real_counts(model) == (report.trainable, report.total) == (lora, base + lora)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_roberta_counts_match_peft() -> None:
    ours = rewrite(load_model("roberta-base", meta=True), ROBERTA_QV, dry_run=True)
    theirs = peft_counts(load_model("roberta-base", meta=True), ["query", "value"])
    assert (ours.trainable, ours.total) == theirs


PHI3_ALL = "use phi3\napply lora(r=8) to attn.qkv, attn.o, mlp.gate_up, mlp.down"


def test_phi3_mini_counts_by_formula() -> None:
    c = PRESETS["phi-3-mini"].config()
    h, i, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    # qkv_proj [h + 2 kv, h], o_proj, gate_up_proj [2 i, h], down_proj; two RMSNorms; no biases
    layer = (h + 2 * kv) * h + h * h + 2 * i * h + i * h + 2 * h
    base = 2 * v * h + n * layer + h  # embeddings and head untied, final norm
    assert base == 3_821_079_552  # Phi-3-mini's published 3.8B
    r = 8
    lora = n * r * ((h + h + 2 * kv) + (h + h) + (h + 2 * i) + (i + h))
    assert lora == 12_582_912

    model = load_model("phi-3-mini", meta=True)
    plan = rewrite(model, PHI3_ALL, dry_run=True)
    assert (plan.total_before, plan.trainable, plan.total) == (base, lora, base + lora)
    assert len(plan.targets) == 4 * n
    report = rewrite(model, PHI3_ALL)
    assert real_counts(model) == (report.trainable, report.total) == (lora, base + lora)


def test_pythia_base_count_by_formula() -> None:
    c = PRESETS["pythia-1.4b"].config()
    h, i, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    # every Linear has a bias; two LayerNorms per layer (weight and bias)
    layer = (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
    base = 2 * v * h + n * layer + 2 * h
    assert base == 1_414_647_808  # the Pythia paper's 1.4B total
    assert real_counts(load_model("pythia-1.4b", meta=True)) == (base, base)
