"""Every user mistake is a `SurgeryError` that points at the rule text and leaves the model alone.

Each error is checked for: the `file:line:col` header, the offending source line, a caret line
under the right columns, a message in plain words (no Lark terminal names), a did-you-mean hint
where one fits, and (for anything raised while planning) a model that is bit-identical to the one
before the call: same tensors, same module classes, no sites, same `requires_grad` flags.
The `llama` and `falcon` fixtures (tests/conftest.py) are the seeded tiny models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery import (
    PlanError,
    ResolveError,
    Site,
    SurgeryError,
    SurgerySyntaxError,
    parse,
    rewrite,
)

SEMANTIC = (PlanError, ResolveError)

# Lark's own vocabulary must never reach the user.
LARK_WORDS = re.compile(
    r"__ANON|\$END|\b(?:SEGMENT|SIGNED_INT|SIGNED_FLOAT|NAME|STRING|ANCHOR|LPAR|RPAR|LSQB|RSQB"
    r"|COMMA|DOT|COLON|EQUAL|VBAR|CIRCUMFLEX|STAR|LESSTHAN|MORETHAN|TO|AS|EXPECT|APPLY|USE|LET"
    r"|MERGE|REMOVE|FREEZE|UNFREEZE|TRUE|FALSE)\b|Token\(|Tree\("
)
HEADER = re.compile(
    r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<kind>error|syntax error): (?P<message>.+)$"
)


# ---- helpers ------------------------------------------------------------------------------


@dataclass
class Rendered:
    file: str
    line: int
    column: int
    message: str
    source_line: str
    caret_start: int  # 0-based column in the source line
    caret_length: int
    hint: str | None

    @property
    def under_caret(self) -> str:
        return self.source_line[self.caret_start : self.caret_start + self.caret_length]


def render(error: SurgeryError) -> Rendered:
    """Parse `str(error)` back into its parts, checking the layout on the way."""
    text = str(error)
    lines = text.split("\n")
    header = HEADER.match(lines[0])
    assert header, f"no file:line:col header in:\n{text}"
    number = header["line"]
    width = len(number)
    assert lines[1] == " " * (width + 1) + "|", text
    prefix = f"{number} | "
    assert lines[2].startswith(prefix), f"source line missing or misnumbered:\n{text}"
    source_line = lines[2][len(prefix) :]
    caret_prefix = " " * (width + 1) + "| "
    assert lines[3].startswith(caret_prefix), text
    carets = lines[3][len(caret_prefix) :]
    assert set(carets.strip()) == {"^"}, f"caret line is not carets:\n{text}"
    start = len(carets) - len(carets.lstrip(" "))
    length = len(carets.strip())
    assert start + 1 == int(header["col"]), f"caret does not start at the header column:\n{text}"
    hint = None
    if len(lines) > 4:
        assert lines[4].startswith("  hint: "), text
        hint = lines[4].removeprefix("  hint: ")
    return Rendered(
        header["file"],
        int(number),
        int(header["col"]),
        header["message"],
        source_line,
        start,
        length,
        hint,
    )


def assert_plain_words(error: SurgeryError) -> None:
    found = LARK_WORDS.search(str(error))
    assert found is None, f"parser jargon {found.group(0)!r} in:\n{error}"


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    grads: dict[str, bool]
    classes: list[tuple[str, type]]
    params: list[tuple[str, int]]
    sites: int


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        [(name, type(m)) for name, m in model.named_modules()],
        [(k, id(p)) for k, p in model.named_parameters()],
        sum(isinstance(m, Site) for m in model.modules()),
    )


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    sites = sum(isinstance(m, Site) for m in model.modules())
    assert sites == before.sites, f"{sites - before.sites} site(s) left behind"
    assert [(n, type(m)) for n, m in model.named_modules()] == before.classes
    assert [(k, id(p)) for k, p in model.named_parameters()] == before.params
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before.grads
    state = model.state_dict()
    assert state.keys() == before.state.keys()
    for key, value in before.state.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), f"{key} changed"


def fails(model: nn.Module, rules: str | Path, cls=SurgeryError) -> SurgeryError:
    """Run `rewrite` and return its error, checking that the model did not change."""
    before = snapshot(model)
    with pytest.raises(SurgeryError) as info:
        rewrite(model, rules)
    error = info.value
    assert isinstance(error, cls), f"{type(error).__name__} is not a {cls}: {error}"
    assert_unchanged(model, before)
    assert_plain_words(error)
    return error


# ---- the table: (rules, error class, line, text under the caret, message parts, hint part) --

CASES = {
    # syntax
    "missing-to": (
        "apply lora *.q_proj",
        SurgerySyntaxError,
        1,
        "*",
        ["unexpected '*'", "'to'"],
        "apply METHOD",
    ),
    "unclosed-paren": (
        "apply lora(r=8 to *.q_proj",
        SurgerySyntaxError,
        1,
        "to",
        ["unexpected 'to'", "')'"],
        None,
    ),
    "unclosed-paren-at-end": (
        "apply lora(r=8, alpha=16",
        SurgerySyntaxError,
        1,
        "",
        ["end of input", "')'"],
        None,
    ),
    "bad-character": (
        "apply lora to *.q_proj $",
        SurgerySyntaxError,
        1,
        "$",
        ["'$'"],
        None,
    ),
    "bad-character-in-selector": (
        "apply lora to *.q_proj, *.v-proj",
        SurgerySyntaxError,
        1,
        "-",
        ["'-'"],
        None,
    ),
    "empty-after-to": (
        "apply lora to",
        SurgerySyntaxError,
        1,
        "",
        ["end of input", "module name"],
        None,
    ),
    "empty-after-to-trailing-newline": (
        "use llama\napply lora to\n",
        SurgerySyntaxError,
        2,
        "",
        ["end of input"],
        None,
    ),
    "misspelt-keyword": (
        "apply lora to *.q_proj\nfrz **",
        SurgerySyntaxError,
        2,
        "frz",
        ["unexpected 'frz'", "statement"],
        "did you mean 'freeze'",
    ),
    "globstar-inside-name": (
        "apply lora to *.self_attn.q**",
        SurgerySyntaxError,
        1,
        "**",
        ["'**'", "whole segment"],
        None,
    ),
    "empty-alternation": (
        "apply lora to *.<>_proj",
        SurgerySyntaxError,
        1,
        "<>",
        ["empty option"],
        "<q,k,v>",
    ),
    "empty-alternation-option": (
        "apply lora to *.<q,>_proj",
        SurgerySyntaxError,
        1,
        "<q,>",
        ["empty option"],
        None,
    ),
    "duplicate-parameter": (
        "apply lora(r=8, alpha=16, r=4) to *.q_proj",
        SurgerySyntaxError,
        1,
        "r=4",
        ["'r'", "twice"],
        None,
    ),
    "zero-slice-step": (
        "apply lora to model.layers[::0].self_attn.q_proj",
        SurgerySyntaxError,
        1,
        "::0",
        ["step", "zero"],
        None,
    ),
    "statement-over-lines": (
        "use llama\n\napply lora(r=8)\n   *.q_proj",
        SurgerySyntaxError,
        4,
        "*",
        ["'to'"],
        None,
    ),
    # methods and their parameters
    "unknown-method": (
        "apply lroa(r=8) to *.q_proj",
        SEMANTIC,
        1,
        "lroa",
        ["unknown method 'lroa'"],
        "did you mean 'lora'",
    ),
    "unknown-parameter": (
        "apply lora(r=8, aplha=16) to *.q_proj",
        SEMANTIC,
        1,
        "aplha=16",
        ["no parameter 'aplha'"],
        "did you mean 'alpha'",
    ),
    "unknown-parameter-lists-known": (
        "apply lora(rank=4) to *.q_proj",
        SEMANTIC,
        1,
        "rank=4",
        ["no parameter 'rank'"],
        "alpha",
    ),
    "r-not-integer": (
        "apply lora(r=1.5) to *.q_proj",
        PlanError,
        1,
        "r=1.5",
        ["'r'", "integer", "1.5"],
        None,
    ),
    "r-bool": (
        "apply lora(r=true) to *.q_proj",
        PlanError,
        1,
        "r=true",
        ["'r'", "integer"],
        None,
    ),
    "rslora-not-bool": (
        "apply lora(rslora=3) to *.q_proj",
        PlanError,
        1,
        "rslora=3",
        ["'rslora'", "true or false"],
        None,
    ),
    "init-choice": (
        "apply lora(init=gausian) to *.q_proj",
        PlanError,
        1,
        "init=gausian",
        ["'init'", "kaiming", "gaussian"],
        "did you mean 'gaussian'",
    ),
    "r-zero": (
        "apply lora(r=0) to *.q_proj",
        PlanError,
        1,
        "r=0",
        ["'r'", "at least 1"],
        None,
    ),
    "dropout-one": (
        "apply lora(dropout=1.0) to *.q_proj",
        PlanError,
        1,
        "dropout=1.0",
        ["'dropout'", "[0, 1)"],
        None,
    ),
    "dropout-negative": (
        "apply lora(dropout=-0.1) to *.q_proj",
        PlanError,
        1,
        "dropout=-0.1",
        ["'dropout'", "[0, 1)"],
        None,
    ),
    "alpha-zero": (
        "apply lora(alpha=0) to *.q_proj",
        PlanError,
        1,
        "alpha=0",
        ["'alpha'", "greater than 0"],
        None,
    ),
    "r-over-rank-limit": (
        "apply lora(alpha=16, r=100) to *.q_proj",
        PlanError,
        1,
        "r=100",
        ["r=100", "min(in, out) = 64", "q_proj"],
        None,
    ),
    "r-over-rank-limit-of-some-targets": (
        # q_proj is 64 -> 64 (r=40 fits), v_proj is 64 -> 32 (it does not)
        "apply lora(r=40) to *.self_attn.<q,v>_proj",
        PlanError,
        1,
        "r=40",
        ["v_proj", "= 32"],
        None,
    ),
    # targets
    "lora-on-norm": (
        "apply lora to *.input_layernorm",
        PlanError,
        1,
        "*.input_layernorm",
        ["LlamaRMSNorm", "Linear", "input_layernorm"],
        ": Linear",
    ),
    "lora-on-globstar": (
        "apply lora to **",
        PlanError,
        1,
        "**",
        ["Linear"],
        ": Linear",
    ),
    "same-method-twice": (
        "apply lora to *.q_proj\napply lora(r=4) to *.self_attn.q_proj",
        PlanError,
        2,
        "apply lora(r=4) to *.self_attn.q_proj",
        ["q_proj", "already has an edit named 'lora'"],
        "as lora2",
    ),
    # selectors
    "misspelt-segment": (
        "apply lora to *.self_atn.q_proj",
        ResolveError,
        1,
        "self_atn",
        ["`*.self_atn.q_proj`", "matches nothing"],
        "did you mean `*.self_attn.q_proj`",
    ),
    "misspelt-segment-with-alternation": (
        "apply lora(r=8) to *.self_atn.<q,v>_proj",
        ResolveError,
        1,
        "self_atn",
        ["`*.self_atn.<q,v>_proj`", "matches nothing"],
        "did you mean `*.self_attn.<q,v>_proj`",
    ),
    "misspelt-segment-in-freeze": (
        "freeze *.mlp.down_prj",
        ResolveError,
        1,
        "down_prj",
        ["`*.mlp.down_prj`", "matches nothing"],
        "did you mean `*.mlp.down_proj`",
    ),
    "second-selector-matches-nothing": (
        "apply lora to *.self_attn.<q,v>_proj, *.mlp.nope",
        ResolveError,
        1,
        "nope",
        ["`*.mlp.nope`", "matches nothing"],
        "nope",
    ),
    "alternation-option-unused": (
        "apply lora to *.self_attn.<q,x>_proj",
        ResolveError,
        1,
        "<q,x>_proj",
        ["option 'x'", "matches nothing"],
        "q_proj",
    ),
    "index-out-of-range": (
        "apply lora to model.layers[7].self_attn.q_proj",
        ResolveError,
        1,
        "layers[7]",
        ["7", "out of range", "4 entries"],
        None,
    ),
    "negative-index-out-of-range": (
        "apply lora to model.layers[-5].self_attn.q_proj",
        ResolveError,
        1,
        "layers[-5]",
        ["-5", "out of range", "4 entries"],
        None,
    ),
    "slice-out-of-range": (
        "apply lora to model.layers[2:9].self_attn.q_proj",
        ResolveError,
        1,
        "layers[2:9]",
        ["[2:9]", "4 entries"],
        None,
    ),
    "empty-slice": (
        "apply lora to model.layers[3:1].self_attn.q_proj",
        ResolveError,
        1,
        "layers[3:1]",
        ["[3:1]", "empty"],
        None,
    ),
    "index-non-list": (
        "apply lora to model.norm[0]",
        ResolveError,
        1,
        "norm[0]",
        ["model.norm", "cannot be indexed"],
        None,
    ),
    "type-filter-unknown-type": (
        "apply lora to *.self_attn.* : Linaer",
        ResolveError,
        1,
        "*.self_attn.* : Linaer",
        ["Linaer"],
        "did you mean 'Linear'",
    ),
    "expect-mismatch": (
        "apply lora to *.q_proj expect 3",
        PlanError,
        1,
        "apply lora to *.q_proj expect 3",
        ["4 module(s)", "expects 3"],
        "model.layers.0.self_attn.q_proj",
    ),
    # merge / remove
    "merge-nothing": ("merge", PlanError, 1, "merge", ["nothing to merge"], None),
    "remove-nothing": ("remove", PlanError, 1, "remove", ["nothing to remove"], None),
    "merge-twice": (
        "apply lora to *.q_proj\nmerge\nmerge",
        PlanError,
        3,
        "merge",
        ["nothing to merge"],
        None,
    ),
    "merge-unknown-name": (
        "merge foo",
        PlanError,
        1,
        "merge foo",
        ["nothing to merge", "'foo'"],
        None,
    ),
    "merge-misspelt-edit": (
        "apply lora to *.q_proj as qlora\nmerge qlroa",
        PlanError,
        2,
        "merge qlroa",
        ["nothing to merge", "'qlroa'"],
        "did you mean 'qlora'",
    ),
    "remove-misspelt-method": (
        "apply lora to *.q_proj\nremove lroa",
        PlanError,
        2,
        "remove lroa",
        ["nothing to remove", "'lroa'"],
        "did you mean 'lora'",
    ),
    # families, includes, aliases
    "unknown-family": (
        "use lama\napply lora to attn.q",
        ResolveError,
        1,
        "use lama",
        ["unknown model family 'lama'"],
        "did you mean 'llama'",
    ),
    "missing-include": (
        'use "no_such_rules.surg"',
        ResolveError,
        1,
        'use "no_such_rules.surg"',
        ["no_such_rules.surg", "does not exist"],
        None,
    ),
    "self-referencing-alias": (
        "let a = a.q_proj\napply lora to a",
        ResolveError,
        1,
        "let a = a.q_proj",
        ["'a'", "itself"],
        None,
    ),
    "alias-cycle": (
        "let a = b.q_proj\nlet b = a\napply lora to a",
        ResolveError,
        None,  # either definition may be named
        None,
        ["itself"],
        None,
    ),
}


@pytest.mark.parametrize(
    ("rules", "cls", "line", "caret", "parts", "hint"), CASES.values(), ids=CASES.keys()
)
def test_error(llama, rules, cls, line, caret, parts, hint) -> None:
    error = fails(llama, rules, cls)
    shown = render(error)
    assert shown.file == "<string>"
    source_lines = rules.splitlines()
    if line is not None:
        assert shown.line == line, str(error)
    assert shown.source_line == source_lines[shown.line - 1], str(error)
    if caret is not None:
        if caret == "":  # end of input: one caret just past the last character
            assert shown.caret_start == len(shown.source_line), str(error)
            assert shown.caret_length == 1, str(error)
        else:
            assert shown.under_caret == caret, str(error)
    for part in parts:
        assert part in shown.message, f"{part!r} not in the message:\n{error}"
    if hint is not None:
        assert shown.hint is not None and hint in shown.hint, f"hint should say {hint!r}:\n{error}"


def test_every_error_class_is_a_surgery_error() -> None:
    for cls in (SurgerySyntaxError, PlanError, ResolveError):
        assert issubclass(cls, SurgeryError)


def test_syntax_error_from_parse_alone_has_file_name() -> None:
    with pytest.raises(SurgerySyntaxError) as info:
        parse("use llama\napply lora(r=8 *.q_proj", "rules.surg")
    shown = render(info.value)
    assert shown.file == "rules.surg"
    assert (shown.line, shown.under_caret) == (2, "*")
    assert_plain_words(info.value)


def test_expected_tokens_are_only_those_that_can_follow() -> None:
    """After `r=8` inside `lora(...)` only `,` or `)` can come: a `]` there is not a way out."""
    for rules in ("apply lora(r=8 to *.q_proj", "apply lora(r=8", "apply lora(r=1e) to *.q_proj"):
        with pytest.raises(SurgerySyntaxError) as info:
            parse(rules)
        message = info.value.message
        assert "')'" in message, message
        assert "']'" not in message, f"{rules!r}: a ']' cannot follow here, yet: {message}"


def test_caret_lines_up_under_tab_indented_source(llama) -> None:
    """A terminal expands the tab in the source line; the caret line must expand the same way."""
    error = fails(llama, "\tapply lora to *.self_atn.q_proj", ResolveError)
    lines = str(error).split("\n")
    source, carets = lines[2].expandtabs(), lines[3].expandtabs()
    start = carets.index("^")
    assert source[start:].startswith("self_atn"), f"caret misplaced:\n{source}\n{carets}"


# ---- Falcon ---------------------------------------------------------------------------------


def test_falcon_misspelt_fused_projection(falcon) -> None:
    error = fails(falcon, "apply lora to *.self_attention.query_key_valu", ResolveError)
    shown = render(error)
    assert shown.under_caret == "query_key_valu"
    assert "did you mean `*.self_attention.query_key_value`" in (shown.hint or "")


def test_falcon_llama_names_do_not_resolve(falcon) -> None:
    error = fails(falcon, "apply lora to *.self_attn.q_proj", ResolveError)
    shown = render(error)
    assert shown.under_caret == "self_attn"
    assert "self_attention" in (shown.hint or "")


def test_falcon_rank_limit_of_fused_qkv(falcon) -> None:
    # query_key_value is 64 -> 96 (4 query heads of 16 plus one shared k and v head)
    error = fails(falcon, "apply lora(r=65) to *.query_key_value", PlanError)
    shown = render(error)
    assert shown.under_caret == "r=65"
    assert "min(in, out) = 64" in shown.message
    assert "query_key_value" in shown.message


def test_falcon_alias_with_unknown_tail(falcon) -> None:
    error = fails(falcon, "use falcon\napply lora to attn.qkv, mlp.upp", ResolveError)
    shown = render(error)
    assert shown.line == 2
    assert shown.under_caret == "upp"  # the segment that found nothing, in the user's text
    assert "mlp.upp" in shown.message
    assert "did you mean the alias 'mlp.up'" in (shown.hint or "")


# ---- state across calls -------------------------------------------------------------------


def test_same_method_twice_across_two_calls(llama) -> None:
    rewrite(llama, "apply lora(r=4) to *.self_attn.<q,v>_proj")
    error = fails(llama, "apply lora(r=2) to *.self_attn.q_proj", PlanError)
    shown = render(error)
    assert "already has an edit named 'lora'" in shown.message
    assert "model.layers.0.self_attn.q_proj" in shown.message
    assert "as lora2" in (shown.hint or "")
    # the model still has exactly one LoRA per site, and a second, named one is accepted
    sites = [m for m in llama.modules() if isinstance(m, Site)]
    assert len(sites) == 8
    assert all([e.name for e in s.edits] == ["lora"] for s in sites)
    rewrite(llama, "apply lora(r=2) to *.self_attn.q_proj as lora2")


def test_error_after_earlier_statements_rolls_nothing_in(llama) -> None:
    """A later statement's error leaves the earlier (valid) ones unapplied too."""
    error = fails(
        llama,
        "apply lora to *.q_proj\nfreeze *.v_proj\nunfreeze *.embed_tokens\napply lora to *.nope",
        ResolveError,
    )
    assert render(error).line == 4


def test_plan_error_on_a_model_that_already_has_sites(llama) -> None:
    """Sites, adapters and flags from an earlier call survive a failing later call untouched."""
    rewrite(llama, "apply lora(r=4) to *.q_proj\nunfreeze *.input_layernorm")
    error = fails(llama, "apply lora to *.v_proj\nmerge\nfreeze *.act_fn", PlanError)
    assert render(error).line == 3
    assert "without parameters" in error.message
    assert sum(isinstance(m, Site) for m in llama.modules()) == 4


def test_merge_hint_does_not_suggest_what_was_written(llama) -> None:
    """`merge lora` on a model without LoRA: 'did you mean lora?' would be no help."""
    error = fails(llama, "merge lora", PlanError)
    shown = render(error)
    assert "nothing to merge" in shown.message
    assert "lora" in shown.message
    assert "did you mean 'lora'" not in (shown.hint or "")


# ---- include files ------------------------------------------------------------------------


def test_missing_include_relative_to_the_including_file(llama, tmp_path) -> None:
    main = tmp_path / "main.surg"
    main.write_text('# uses a file next to it\nuse "parts/missing.surg"\n')
    error = fails(llama, main, ResolveError)
    shown = render(error)
    assert shown.file == str(main)
    assert shown.line == 2
    assert "parts/missing.surg" in shown.message
    assert str(tmp_path / "parts" / "missing.surg") in shown.message


def test_self_including_file(llama, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("loop.surg").write_text('# includes itself\nuse "loop.surg"\napply lora to *.q_proj\n')
    error = fails(llama, Path("loop.surg"), ResolveError)
    shown = render(error)
    assert Path(shown.file).name == "loop.surg"
    assert shown.line == 2
    assert shown.source_line == 'use "loop.surg"'
    assert "itself" in shown.message


def test_include_cycle_is_reported_where_it_closes(llama, tmp_path, monkeypatch) -> None:
    """a.surg uses b.surg, which uses a.surg: the error is at b.surg's `use "a.surg"`."""
    monkeypatch.chdir(tmp_path)
    Path("a.surg").write_text('use "b.surg"\n')
    Path("b.surg").write_text('use "a.surg"\n')
    error = fails(llama, Path("a.surg"), ResolveError)
    shown = render(error)
    assert Path(shown.file).name == "b.surg", str(error)
    assert shown.source_line == 'use "a.surg"', str(error)
    assert "'a.surg'" in shown.message, str(error)


def test_one_line_rules_mentioning_a_surg_file_are_rules_not_a_path(llama) -> None:
    """`rewrite(model, text)` must not open the text as a file because it ends in `.surg`."""
    report = rewrite(llama, "apply lora(r=4) to *.q_proj  # same as in base.surg")
    assert report.trainable == 4 * 4 * (64 + 64)


def test_unreadable_rule_file(llama, tmp_path) -> None:
    error = fails(llama, tmp_path / "absent.surg")
    assert "absent.surg" in str(error)


# ---- aliases from family files ------------------------------------------------------------


def test_index_error_through_an_alias_points_at_the_users_text(llama) -> None:
    """`layers[9]` is the user's mistake; the caret belongs in their rule, not in llama.surg."""
    error = fails(llama, "use llama\napply lora to layers[9].self_attn.q_proj", ResolveError)
    shown = render(error)
    assert shown.file == "<string>", str(error)
    assert shown.line == 2, str(error)
    assert "layers[9]" in shown.under_caret, str(error)
    assert "out of range" in shown.message


def test_alias_selector_that_matches_nothing_names_the_alias(llama) -> None:
    error = fails(llama, "use llama\napply lora to attn.x", ResolveError)
    shown = render(error)
    assert shown.line == 2
    assert shown.under_caret == "x"  # `attn` resolved; the caret is on the part that did not
    assert "attn.x" in shown.message and "matches nothing" in shown.message


def test_expect_through_alias(llama) -> None:
    error = fails(llama, "use llama\napply lora to attn.q expect 5", PlanError)
    assert "expects 5" in render(error).message


# ---- nothing but SurgeryError escapes -----------------------------------------------------


@pytest.mark.parametrize(
    "rules",
    [
        "",
        "# only a comment",
        "apply",
        "apply lora(",
        "apply lora(r=)",
        "apply lora to x[1:2:3:4]",
        "apply lora to ^",
        "apply lora to *.<q,<v>>_proj",
        "apply lora to x\x00",
        "use 3",
        "let = x",
        "apply lora to **[0]",
        "apply lora to *.<q,q>_proj",
        "apply lora to é",
        "merge lora lora",
    ],
)
def test_parser_is_total(llama, rules) -> None:
    before = snapshot(llama)
    try:
        rewrite(llama, rules)
    except SurgeryError as error:
        assert_plain_words(error)
        if error.span is not None:
            render(error)
        assert_unchanged(llama, before)
    else:
        assert rules.strip() in ("", "# only a comment")


def test_errors_render_with_os_independent_newlines(llama) -> None:
    error = fails(llama, "apply lora to *.q_proj\r\napply lora to *.self_atn.q_proj\r\n")
    shown = render(error)
    assert shown.line == 2
    assert shown.under_caret == "self_atn"
    assert "\r" not in str(error)
