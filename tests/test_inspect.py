"""Soft prompts read back (`surgery.nearest_tokens`, `surgery inspect`): each virtual token's
nearest vocabulary tokens by cosine similarity, refused with the reason for prefixes."""

from __future__ import annotations

import json
import re
import shlex
import string
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery.soft_prompts
from surgery import SurgeryError, nearest_tokens, rewrite
from surgery.cli import main
from surgery.models import load_model, tiny

IDS = [3, 4, 250]
PROMPT = f"use llama\napply prompt(n=5, init=ids, ids={IDS}) to embed"
CYCLED = [3, 4, 250, 3, 4]  # init=ids cycles the ids to n


def prompted(rules: str = PROMPT) -> nn.Module:
    model = tiny("llama")
    rewrite(model, rules)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def saved(tmp_path: Path, rules: str, name: str = "adapter", model: str = "tiny-llama") -> Path:
    out = tmp_path / name
    assert main(["apply", "-e", rules, "--model", model, "--out", str(out)]) == 0
    return out


# ---- the Python function -------------------------------------------------------------------


def test_a_prompt_initialized_from_ids_reads_back_those_ids_at_similarity_one() -> None:
    tokens = nearest_tokens(prompted(), top=3)
    assert [t.index for t in tokens] == list(range(5))
    assert [t.neighbours[0].token_id for t in tokens] == CYCLED
    for token in tokens:
        assert (token.adapter, token.edit, token.method, token.note) == (
            "default", "prompt", "prompt", None)
        assert token.neighbours[0].score == pytest.approx(1.0, abs=1e-6)
        assert token.neighbours[1].score < 0.9  # random rows: nothing else is that near
        scores = [n.score for n in token.neighbours]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert all(n.text is None for n in token.neighbours)


def test_an_infix_reads_back_like_a_prompt() -> None:
    """An infix's tokens are input embeddings too (they only sit elsewhere in the row)."""
    tokens = nearest_tokens(prompted(PROMPT.replace("prompt(", "infix(after=7, ")), top=2)
    assert [t.neighbours[0].token_id for t in tokens] == CYCLED
    assert {(t.edit, t.method) for t in tokens} == {("infix", "infix")}
    assert all(t.neighbours[0].score == pytest.approx(1.0, abs=1e-6) for t in tokens)


def hand_computed(rows: torch.Tensor, table: torch.Tensor, top: int) -> tuple[list, list]:
    """Every cosine similarity one at a time (no shared normalization), then a full sort."""
    cosine = torch.stack([torch.nn.functional.cosine_similarity(row[None], table) for row in rows])
    ranked = cosine.sort(dim=1, descending=True, stable=True)
    return ranked.indices[:, :top].tolist(), ranked.values[:, :top].tolist()


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_is_read_through_its_encoder_and_the_model_is_unchanged(encoder: str) -> None:
    torch.manual_seed(0)
    model = prompted(f"use llama\napply p_tuning(n=4, encoder={encoder}, hidden=16) to embed")
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tokens = nearest_tokens(model, top=4)
    with torch.no_grad():
        rows = model.p_tuning.encoder(model.p_tuning.embedding)
    ids, scores = hand_computed(rows, model.get_input_embeddings().weight, 4)
    assert [[n.token_id for n in t.neighbours] for t in tokens] == ids
    got = [[n.score for n in t.neighbours] for t in tokens]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(scores), atol=1e-6, rtol=0)
    # the encoder's input has other neighbours: the encoder's output is what was read
    table = model.get_input_embeddings().weight
    assert ids != hand_computed(model.p_tuning.embedding.detach(), table, 4)[0]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert hasattr(model.p_tuning, "encoder")  # not baked
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
def test_a_prefix_is_refused_with_the_reason(method: str) -> None:
    model = prompted(f"use llama\napply {method}(n=3) to layers.*")
    with pytest.raises(SurgeryError, match="keys and values in every layer's attention cache, "
                                           "not input embeddings"):
        nearest_tokens(model)


def test_a_bf16_model_reads_back_exactly_and_a_meta_model_is_refused() -> None:
    model = tiny("llama").to(torch.bfloat16)
    rewrite(model, "use llama\napply prompt(n=2, init=ids, ids=[9, 77]) to embed")
    assert [(t.neighbours[0].token_id, t.neighbours[0].score) for t in nearest_tokens(model, 1)] \
        == [(9, 1.0), (77, 1.0)]
    meta = load_model("tiny-llama", meta=True)
    rewrite(meta, "use llama\napply prompt(n=2, init=ids, ids=[9, 77]) to embed")
    with pytest.raises(SurgeryError, match=r"no float values to compare with \(the meta device"):
        nearest_tokens(meta)


def test_a_model_without_virtual_tokens_is_an_error() -> None:
    with pytest.raises(SurgeryError, match="has no virtual-token edit"):
        nearest_tokens(tiny("llama"))
    with pytest.raises(SurgeryError, match="has no virtual-token edit"):
        nearest_tokens(prompted("apply lora(r=2) to *.q_proj"))


SEVERAL = (
    "use llama\n"
    "adapter words { apply prompt(n=2, init=ids, ids=[7, 9]) to embed }\n"
    "adapter coded { apply p_tuning(n=3, hidden=8) to embed as pt }\n"
    "adapter deep { apply prefix(n=2) to layers.* }\n"
    "adapter low { apply lora(r=2) to embed }"
)


def test_several_adapters_are_chosen_by_adapter_or_edit() -> None:
    model = prompted(SEVERAL)
    words = nearest_tokens(model, 1, adapter="words")
    assert [(t.adapter, t.edit, t.neighbours[0].token_id) for t in words] == [
        ("words", "words", 7), ("words", "words", 9)]  # an adapter's edit: its name
    assert [t.adapter for t in nearest_tokens(model, 1, edit="pt")] == ["coded"] * 3
    # every adapter: the prefix among them is named, and so are the ones that can be read
    with pytest.raises(SurgeryError, match="edit 'deep' \\(prefix, adapter 'deep'\\)") as caught:
        nearest_tokens(model)
    assert "virtual tokens are input embeddings: 'words', 'coded'" in str(caught.value)
    with pytest.raises(SurgeryError, match="adapter 'low' has no virtual-token edit"):
        nearest_tokens(model, adapter="low")
    with pytest.raises(SurgeryError, match=r"(?s)no adapter named 'wrods'.*did you mean 'words'"):
        nearest_tokens(model, adapter="wrods")
    with pytest.raises(SurgeryError, match="no virtual-token edit named 'p'"):
        nearest_tokens(model, edit="p")


def test_an_edit_of_the_same_adapter_on_the_embedding_is_refused() -> None:
    """LoRA on the embedding changes the vocabulary that adapter's rows sit beside: the base
    table would mislead. Another adapter's edit there does not concern this one."""
    model = prompted("use llama\nadapter a { apply prompt(n=2, init=ids, ids=[1]) to embed\n"
                     "apply lora(r=2) to embed }\nadapter b { apply lora(r=2) to embed as other }")
    with pytest.raises(SurgeryError, match=r"adapter 'a' also edits the input embedding \(lora 'a"):
        nearest_tokens(model, adapter="a")
    model = prompted("use llama\nadapter a { apply prompt(n=2, init=ids, ids=[1]) to embed }\n"
                     "adapter b { apply lora(r=2) to embed }")
    assert nearest_tokens(model, 1, adapter="a")[0].neighbours[0].token_id == 1


def test_top_bounds() -> None:
    model = prompted()
    assert len(nearest_tokens(model, 256)[0].neighbours) == 256  # the whole vocabulary
    for top, message in ((0, "at least 1"), (257, "more than the 256 vocabulary tokens")):
        with pytest.raises(SurgeryError, match=message):
            nearest_tokens(model, top)
    with pytest.raises(TypeError, match="'top' must be int"):
        nearest_tokens(model, "3")


def test_zero_rows_have_no_direction_and_ties_go_to_the_lower_id() -> None:
    model = prompted("use llama\napply prompt(n=2, init=ids, ids=[5]) to embed")
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[20] = weight[5] * 4  # the direction of 5 (scaled exactly): a three-way tie
        weight[10] = weight[5] * 2
        weight[0] = 0  # a zero vocabulary row is never a neighbour (no NaN)
        model.prompt.embedding[1] = 0
    first, zero = nearest_tokens(model, 2)
    with torch.no_grad():
        model.prompt.embedding[0, 3] = torch.nan
    assert nearest_tokens(model, 1)[0].note == "the vector is not finite"
    with torch.no_grad():
        model.prompt.embedding[0] = weight[5]
    assert [n.token_id for n in first.neighbours] == [5, 10]  # 20 ties with them, and loses
    assert [n.token_id for n in nearest_tokens(model, 4)[0].neighbours][:3] == [5, 10, 20]
    assert (zero.neighbours, zero.norm, zero.note) == ((), 0.0, "a zero vector has no direction")
    scores = [n.score for n in nearest_tokens(model, 255)[0].neighbours]
    assert 0 not in [n.token_id for n in nearest_tokens(model, 255)[0].neighbours]
    assert all(-1 <= s <= 1 for s in scores)
    with pytest.raises(SurgeryError, match=r"255 vocabulary tokens .*1 embedding rows are zero"):
        nearest_tokens(model, 256)


def test_chunks_of_the_vocabulary_give_the_same_answer(monkeypatch) -> None:
    model = prompted("use llama\napply p_tuning(n=3, hidden=8) to embed")
    whole = nearest_tokens(model, 10)
    monkeypatch.setattr(surgery.soft_prompts, "CHUNK", 7)
    chunked = nearest_tokens(model, 10)
    assert [[n.token_id for n in t.neighbours] for t in chunked] == [
        [n.token_id for n in t.neighbours] for t in whole]
    scores = [[[n.score for n in t.neighbours] for t in found] for found in (chunked, whole)]
    torch.testing.assert_close(*map(torch.tensor, scores), atol=1e-6, rtol=0)


# ---- with a tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """tiny-llama saved with a 31-token character-level tokenizer (ids past it: no text)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(string.ascii_lowercase + " .,!")}}
    chars = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    chars.decoder = decoders.Fuse()
    directory = tmp_path_factory.mktemp("model")
    tiny("llama").save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_a_tokenizer_decodes_each_neighbour(model_dir: Path) -> None:
    from surgery.serve import load_tokenizer

    model = prompted("use llama\napply prompt(n=3, init=ids, ids=[8, 9, 200]) to embed")
    tokens = nearest_tokens(model, 2, tokenizer=load_tokenizer(model_dir))
    assert [t.neighbours[0].text for t in tokens] == ["h", "i", None]  # 200: past its vocabulary


def test_the_command_decodes_with_the_model_directory_tokenizer(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    rules = "use llama\napply prompt(n=2, init=ids, ids=[8, 9]) to embed"
    adapter = saved(tmp_path, rules, model=str(model_dir))
    code, out, err = cli(capsys, "--adapter", str(adapter), "--model", str(model_dir),
                         "--top", "2")
    assert code == 0, err
    assert "'h' 8 (1.0000)" in out and "'i' 9 (1.0000)" in out
    assert "no tokenizer" not in out


# ---- the command -----------------------------------------------------------------------------


def test_the_command_reads_a_saved_prompt_back(tmp_path: Path, capsys) -> None:
    adapter = saved(tmp_path, PROMPT)
    capsys.readouterr()
    code, out, err = cli(capsys, "--adapter", str(adapter), "--model", "tiny-llama",
                         "--top", "2", "--json")
    assert code == 0, err
    tokens = json.loads(out)
    assert [t["neighbours"][0]["token_id"] for t in tokens] == CYCLED
    assert all(abs(t["neighbours"][0]["score"] - 1) <= 1e-6 for t in tokens)
    assert all(len(t["neighbours"]) == 2 and t["neighbours"][0]["text"] is None for t in tokens)
    code, out, err = cli(capsys, "--adapter", str(adapter), "--model", "tiny-llama")
    assert code == 0, err
    assert "adapter 'default', edit 'prompt' (prompt)" in out
    assert "│     2 │" in out and "250 (1.0000)" in out
    assert "tiny-llama has no tokenizer to decode them" in out


def test_the_command_takes_several_adapters_under_names(tmp_path: Path, capsys) -> None:
    one = saved(tmp_path, "use llama\napply prompt(n=1, init=ids, ids=[11]) to embed", "one")
    two = saved(tmp_path, "use llama\napply p_tuning(n=2, hidden=8) to embed", "two")
    capsys.readouterr()
    code, out, err = cli(capsys, "-a", f"x={one}", "-a", f"y={two}", "-m", "tiny-llama",
                         "--top", "1", "--json")
    assert code == 0, err
    tokens = json.loads(out)
    assert [(t["adapter"], t["method"]) for t in tokens] == [
        ("x", "prompt"), ("y", "p_tuning"), ("y", "p_tuning")]
    assert tokens[0]["neighbours"][0]["token_id"] == 11


def test_the_command_reads_one_adapter_beside_a_prefix(tmp_path: Path, capsys) -> None:
    prompt = saved(tmp_path, "use llama\napply prompt(n=1, init=ids, ids=[11]) to embed", "p")
    prefix = saved(tmp_path, "use llama\napply prefix(n=2) to layers.*", "q")
    capsys.readouterr()
    both = ("-a", f"x={prompt}", "-a", f"y={prefix}", "-m", "tiny-llama", "--top", "1")
    code, out, err = cli(capsys, *both)
    assert code == 1 and "is a prefix" in err and "--name NAME" in err
    code, out, err = cli(capsys, *both, "--name", "x", "--json")
    assert code == 0, err
    assert [(t["adapter"], t["neighbours"][0]["token_id"]) for t in json.loads(out)] == [("x", 11)]
    code, out, err = cli(capsys, *both, "--edit", "nope")
    assert code == 1 and "no virtual-token edit named 'nope'" in err


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
def test_the_command_refuses_a_prefix_with_exit_1(method: str, tmp_path: Path, capsys) -> None:
    adapter = saved(tmp_path, f"use llama\napply {method}(n=2) to layers.*")
    capsys.readouterr()
    code, out, err = cli(capsys, "--adapter", str(adapter), "--model", "tiny-llama")
    assert code == 1 and out == ""
    assert err.startswith(f"error: edit '{method}' ({method}, adapter 'default') is a prefix")
    assert "not input embeddings" in err and "Traceback" not in err


def test_the_command_checks_top(tmp_path: Path, capsys) -> None:
    adapter = saved(tmp_path, PROMPT)
    capsys.readouterr()
    for top in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as usage:
            cli(capsys, "--adapter", str(adapter), "--model", "tiny-llama", "--top", top)
        assert usage.value.code == 2
    code, _, err = cli(capsys, "--adapter", str(adapter), "--model", "tiny-llama", "--top", "300")
    assert code == 1 and "top=300 is more than the 256 vocabulary tokens" in err
    code, _, err = cli(capsys, "--adapter", str(tmp_path / "missing"), "--model", "tiny-llama")
    assert code == 1 and "Traceback" not in err


# ---- docs/methods.md's example and transcript are real -----------------------------------------

SECTION = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text(
    encoding="utf-8").split("### Reading soft prompts back", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    """The section's fenced blocks opened with ```language (every other line closes or opens)."""
    found = re.findall(r"^```(\w*)\n(.*?)^```$", SECTION, flags=re.S | re.M)
    return [body for opened, body in found if opened == language]


def test_the_documented_example_prints_what_its_comments_say(capsys) -> None:
    (code,) = blocks("python")
    exec(compile(code, "docs/methods.md", "exec"), {})
    shown = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    assert capsys.readouterr().out.splitlines() == shown


def test_the_documented_transcript_is_real_output(tmp_path: Path, capsys, monkeypatch) -> None:
    (transcript,) = blocks("")
    monkeypatch.chdir(tmp_path)
    commands = re.split(r"^\$ surgery ", transcript, flags=re.M)[1:]
    for command in commands:
        argv, *shown = command.rstrip("\n").splitlines()
        capsys.readouterr()
        assert main(shlex.split(argv)) == 0
        if shown:
            assert [line.rstrip() for line in capsys.readouterr().out.splitlines()] == shown
    assert shown and argv.startswith("inspect")
