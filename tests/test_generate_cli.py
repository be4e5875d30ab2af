"""`surgery generate` and `surgery.serve`: requests through named adapters in mixed batches.

Every result must equal running its request alone (no padding) with only its adapter active:
a batch never lends one row's adapter to another. Tests that need another branch of issue 11
say so in their skip reason: per-row LoRA routing (`rsite`) and `load_adapter(..., name=)`
(`files`).
"""

from __future__ import annotations

import inspect
import io
import json
import string
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import rewrite
from surgery.adapters.units import active_adapters, set_active
from surgery.cli import main
from surgery.graph import site as site_module
from surgery.io import write_adapter_dir
from surgery.io.load import load_adapter
from surgery.models import tiny
from surgery.serve import (
    MIXED,
    PER_ADAPTER,
    RequestError,
    Sampling,
    generate_requests,
    parse_requests,
)

TWO = (
    "adapter sql { apply lora(r=4) to *.self_attn.<q,v>_proj }\n"
    "adapter chat { apply ia3 to *.mlp.down_proj }"
)
TWO_LORAS = (
    "adapter sql { apply lora(r=4) to *.self_attn.<q,v>_proj }\n"
    "adapter chat { apply lora(r=2) to *.mlp.down_proj }"
)
LINES = [
    {"adapter": "sql", "input_ids": [5, 6, 7]},
    {"adapter": None, "input_ids": [1, 9, 3, 4, 5, 8]},
    {"id": "c", "adapter": "chat", "input_ids": [9]},
    {"adapter": "sql", "input_ids": [3, 3]},
    {"adapter": "__base__", "input_ids": [7, 7, 7, 7]},
    {"adapter": "chat", "input_ids": [11, 12, 13, 14]},
]
NEW = 5
needs_lora_routing = pytest.mark.skipif(
    not site_module.routes("lora"), reason="per-row LoRA routing lands on branch rsite"
)
needs_named_load = pytest.mark.skipif(
    "name" not in inspect.signature(load_adapter).parameters,
    reason="load_adapter(model, dir, name=...) lands on branch files",
)


def adapted(rules: str) -> nn.Module:
    """tiny-llama with `rules`, every adapter tensor moved off its identity init (so each
    adapter changes the output), and no end-of-sequence id (every row runs NEW tokens)."""
    model = tiny("llama")
    rewrite(model, rules)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if ".sql." in name or ".chat." in name:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.5)
    model.generation_config.eos_token_id = None
    return model


def jsonl(lines: list[dict]) -> str:
    return "\n".join(json.dumps(line) for line in lines) + "\n"


def alone(model: nn.Module, adapter: str | None, ids: list[int], **options) -> list[int]:
    """The request run by itself, unpadded, with only its adapter active."""
    before = active_adapters(model)
    set_active(model, () if adapter in (None, "__base__") else adapter)
    try:
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW, pad_token_id=0, do_sample=False, **options
        )
    finally:
        set_active(model, before)
    return out[0, len(ids) :].tolist()


def check_alone(model: nn.Module, lines: list[dict], results) -> None:
    assert [r.id for r in results] == [line.get("id", n) for n, line in enumerate(lines, 1)]
    for line, result in zip(lines, results, strict=True):
        assert result.adapter == (None if line["adapter"] == "__base__" else line["adapter"])
        assert result.generated_ids == alone(model, line["adapter"], line["input_ids"])


def test_requests_run_per_adapter_when_a_method_cannot_route(monkeypatch) -> None:
    # whatever routes on this branch, take LoRA's routed emitter away: the run must fall back
    # to batches of one adapter each, say so, and still give every row its own adapter
    monkeypatch.delitem(site_module._ROUTED_EMITTERS, "lora", raising=False)
    model = adapted(TWO)
    requests = parse_requests(jsonl(LINES), "r.jsonl", ["sql", "chat"], tokenizer=False)
    seen = []
    run = generate_requests(model, requests, batch_size=2, max_new_tokens=NEW, progress=seen.append)
    assert run.mode == PER_ADAPTER and "lora" in run.reason
    assert run.batches == 3  # base x2, sql x2, chat x2: never two adapters in one batch
    assert seen == [2, 4, 6]
    check_alone(model, LINES, run.results)
    assert active_adapters(model) == ("sql",)  # the first adapter added stays the active one


def test_base_rows_share_one_routed_batch_on_a_model_with_adapters() -> None:
    model = adapted(TWO)
    lines = [line for line in LINES if line["adapter"] in (None, "__base__")]
    requests = parse_requests(jsonl(lines), "r.jsonl", ["sql", "chat"], tokenizer=False)
    run = generate_requests(model, requests, batch_size=8, max_new_tokens=NEW)
    assert run.mode == MIXED and run.batches == 1
    check_alone(model, lines, run.results)


@needs_lora_routing
def test_mixed_batches_equal_each_request_alone() -> None:
    model = adapted(TWO_LORAS)
    requests = parse_requests(jsonl(LINES), "r.jsonl", ["sql", "chat"], tokenizer=False)
    run = generate_requests(model, requests, batch_size=4, max_new_tokens=NEW)
    assert run.mode == MIXED and run.reason is None and run.batches == 2
    check_alone(model, LINES, run.results)


def test_sampling_is_seeded_and_its_options_are_used() -> None:
    model = adapted("adapter sql { apply lora(r=4) to *.self_attn.<q,v>_proj }")
    lines = [{"adapter": "sql", "input_ids": [5, 6, 7]}, {"adapter": None, "input_ids": [9]}]
    requests = parse_requests(jsonl(lines), "r.jsonl", ["sql"], tokenizer=False)

    def ids(sampling: Sampling) -> list[list[int]]:
        run = generate_requests(model, requests, max_new_tokens=8, sampling=sampling)
        return [r.generated_ids for r in run.results]

    greedy = ids(Sampling())
    hot = Sampling(sample=True, temperature=5.0, seed=3)
    assert ids(hot) == ids(hot)  # seeded: the same run twice
    assert ids(hot) != ids(Sampling(sample=True, temperature=5.0, seed=4))
    assert ids(hot) != greedy
    assert ids(Sampling(sample=True, temperature=5.0, top_k=1, seed=3)) == greedy  # top_k used
    state = torch.random.get_rng_state()
    ids(hot)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched


def test_a_result_ends_at_its_end_of_sequence_token() -> None:
    model = tiny("llama")
    model.generation_config.eos_token_id = None
    request = parse_requests('{"input_ids": [1, 2, 3]}', "r", [], tokenizer=False)
    free = generate_requests(model, request, max_new_tokens=NEW).results[0]
    assert free.finish_reason == "length" and len(free.generated_ids) == NEW
    model.generation_config.eos_token_id = free.generated_ids[1]
    stopped = generate_requests(model, request, max_new_tokens=NEW).results[0]
    assert stopped.generated_ids == free.generated_ids[:2] and stopped.finish_reason == "eos"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a request is a JSON object"),
        ('{"adapter": "sql", "promt": "x"}', "unknown field 'promt'"),
        ('{"adapter": "sqll", "input_ids": [1]}', "adapter 'sqll' is not loaded"),
        ('{"adapter": 3, "input_ids": [1]}', "adapter 3 is not loaded"),
        ('{"input_ids": [1], "prompt": "x"}', "either 'prompt'"),
        ('{"adapter": null}', "either 'prompt'"),
        ('{"input_ids": []}', "non-empty list"),
        ('{"input_ids": [1, -2]}', "non-empty list"),
        ('{"input_ids": [true]}', "non-empty list"),
        ('{"prompt": "hello"}', "needs a tokenizer"),
        ('{"id": 1.5, "input_ids": [1]}', "'id' must be"),
        ('{"id": 1, "input_ids": [1]}', "id 1 is already used on line 1"),
    ],
)
def test_every_request_line_is_checked_and_located(line: str, message: str) -> None:
    text = '{"adapter": "sql", "input_ids": [4]}\n\n' + line + "\n"
    with pytest.raises(RequestError, match=r"^r\.jsonl:3: ") as info:
        parse_requests(text, "r.jsonl", ["sql"], tokenizer=False)
    assert message in str(info.value)


def test_token_ids_outside_the_vocabulary_are_located() -> None:
    requests = parse_requests('{"input_ids": [1]}\n{"input_ids": [256]}', "r", [], tokenizer=False)
    with pytest.raises(RequestError, match=r"^r:2: token id 256 is out of range"):
        generate_requests(tiny("llama"), requests, where="r")


# ---- the command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """tiny-llama saved with a character-level tokenizer (ids < 256), as a model directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({c: i + 4 for i, c in enumerate(string.ascii_lowercase + " .,!?")})
    chars = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    chars.decoder = decoders.Fuse()
    chars.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=chars, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
        unk_token="[UNK]",
    )
    directory = tmp_path_factory.mktemp("model")
    tiny("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_prompts_through_the_model_directory_tokenizer(
    model_dir, tmp_path, capsys, monkeypatch
) -> None:
    from surgery.serve import load_tokenizer

    requests = tmp_path / "requests.jsonl"
    requests.write_text(jsonl([{"id": "a", "prompt": "hello"}, {"prompt": "sql?"}]))
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = cli(
        capsys, "--model", str(model_dir), "--input", str(requests), "--output", str(out),
        "--max-new-tokens", "4", "--batch-size", "1",
    )
    assert code == 0, stderr
    assert stdout == "" and "generate: 2/2 requests" in stderr and "to " + str(out) in stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", 2] and all(r["adapter"] is None for r in results)
    model, tokenizer = load_model_dir(model_dir), load_tokenizer(model_dir)
    for result, prompt in zip(results, ["hello", "sql?"], strict=True):
        ids = tokenizer(prompt)["input_ids"]
        expected = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
        generated = expected[0, len(ids) :].tolist()
        end = generated.index(2) + 1 if 2 in generated else len(generated)
        assert result["generated_ids"] == generated[:end]
        assert result["text"] == tokenizer.decode(generated[:end], skip_special_tokens=True)
    # the same run to standard output, without the progress lines
    code, stdout, stderr = cli(
        capsys, "--model", str(model_dir), "--input", str(requests), "--max-new-tokens", "4",
        "--no-progress",
    )
    assert code == 0 and stdout == out.read_text() and "generate:" not in stderr
    # and with the requests on standard input
    monkeypatch.setattr("sys.stdin", io.StringIO(requests.read_text()))
    code, piped, _ = cli(
        capsys, "--model", str(model_dir), "--input", "-", "--max-new-tokens", "4", "--no-progress"
    )
    assert code == 0 and piped == stdout


def load_model_dir(directory: Path) -> nn.Module:
    from surgery.models import load_model

    return load_model(str(directory))


def test_a_bad_line_fails_before_anything_loads_or_is_written(tmp_path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input_ids": [1]}\n{"adapter": "sql", "input_ids": [1]}\n')
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = cli(
        capsys, "--model", "no-such-model", "--input", str(requests), "--output", str(out)
    )
    assert code == 1 and stdout == "" and not out.exists()
    assert f"{requests}:2: adapter 'sql' is not loaded (adapters: none;" in stderr
    assert "Traceback" not in stderr


def test_usage_and_output_errors(model_dir, tmp_path, capsys) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"input_ids": [1]}\n')
    base = ["--model", "tiny-llama", "--input", str(requests)]
    for argv, message in [
        (["--adapter", "sql"], "NAME=DIR"),
        (["--adapter", "9x=d"], "an adapter name is"),
        (["--adapter", "a=d", "--adapter", "a=e"], "given twice"),
        (["--temperature", "0.5"], "add --sample"),
        (["--batch-size", "0"], "at least 1"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["generate", *base, *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    existing = tmp_path / "out.jsonl"
    existing.write_text("keep")
    for argv, message in [
        (["--output", str(requests), "--force"], "is, or lies inside, the requests file"),
        (["--output", str(existing)], "already exists"),
        (["--output", str(tmp_path)], "is not a regular file"),
        (["--output", str(tmp_path / "no" / "out.jsonl")], "there is no directory"),
        (["--model", str(model_dir), "--output", str(model_dir / "out.jsonl")], "the model"),
    ]:
        code, _, stderr = cli(capsys, *base, *argv)
        assert code == 1 and message in stderr, stderr
    assert existing.read_text() == "keep" and requests.read_text() == '{"input_ids": [1]}\n'


@needs_named_load
def test_generate_with_saved_adapters(tmp_path, capsys) -> None:
    model = adapted(TWO)
    dirs = {}
    for name, rules in zip(["sql", "chat"], TWO.splitlines(), strict=True):
        one = tiny("llama")
        report = rewrite(one, rules)
        one.load_state_dict(model.state_dict(), strict=False)
        write_adapter_dir(one, tmp_path / name, rules_text=rules, plan=report.plan)
        dirs[name] = tmp_path / name
    requests = tmp_path / "requests.jsonl"
    requests.write_text(jsonl(LINES))
    code, stdout, stderr = cli(
        capsys, "--model", "tiny-llama", "--input", str(requests),
        "--adapter", f"sql={dirs['sql']}", "--adapter", f"chat={dirs['chat']}",
        "--max-new-tokens", str(NEW), "--batch-size", "3", "--no-progress",
    )
    assert code == 0, stderr
    results = [json.loads(line) for line in stdout.splitlines()]
    tiny_eos = tiny("llama").generation_config.eos_token_id
    for line, result in zip(LINES, results, strict=True):
        expected = alone(model, line["adapter"], line["input_ids"], eos_token_id=tiny_eos)
        end = expected.index(tiny_eos) + 1 if tiny_eos in expected else len(expected)
        assert result["generated_ids"] == expected[:end]


def test_a_tokenizer_is_untrusted_input(model_dir, tmp_path, capsys) -> None:
    import shutil

    from surgery.errors import ModelLoadError
    from surgery.model_files import IgnoredCodeWarning
    from surgery.serve import load_tokenizer

    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tokenizer / name)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    # its own code next to a built-in class: the built-in class, with a warning
    own_code = {"AutoTokenizer": [None, "tokenization_mine.MineTokenizer"]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config | {"auto_map": own_code}))
    with pytest.warns(IgnoredCodeWarning, match="never runs it"):
        assert load_tokenizer(tokenizer)("ab")["input_ids"] == [1, 4, 5]
    # its own code and no built-in class: refused before transformers reads it
    mine = config | {"auto_map": own_code, "tokenizer_class": "MineTokenizer"}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(mine))
    with pytest.raises(ModelLoadError, match="never runs"):
        load_tokenizer(tokenizer)
    # a file that links out of the directory
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    (tokenizer / "tokenizer.json").unlink()
    (tokenizer / "tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "ab"}\n')
    code, stdout, stderr = cli(
        capsys, "--model", "tiny-llama", "--tokenizer", str(tokenizer), "--input", str(requests)
    )
    assert code == 1 and "a link to a file outside" in stderr and not stdout
    # --tokenizer gives a preset text prompts
    (tokenizer / "tokenizer.json").unlink()
    shutil.copy(model_dir / "tokenizer.json", tokenizer / "tokenizer.json")
    code, stdout, _ = cli(
        capsys, "--model", "tiny-llama", "--tokenizer", str(tokenizer), "--input", str(requests),
        "--max-new-tokens", "2", "--no-progress",
    )
    assert code == 0 and json.loads(stdout)["text"] is not None
