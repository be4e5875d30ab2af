"""Model-free checks of a program (`surgery check` without a model): includes, the families
they extend, methods and their arguments, fused part names (errors raise), plus warnings about
rules that are legal but probably not meant."""

from __future__ import annotations

from surgery.errors import SurgeryError, did_you_mean
from surgery.families import parent_family
from surgery.fused import check_part_names, layout_spec
from surgery.includes import include_path, parse_included
from surgery.lang import ast
from surgery.methods import REGISTRY, get_method
from surgery.plan.combine import check_combination
from surgery.plan.planner import source_key
from surgery.plan.prepare import bind as bind_prepare


class LintWarning(SurgeryError):
    """Something legal but probably not meant; shown by `surgery check`, never raised."""

    kind = "warning"


def lint(program: ast.Program) -> list[LintWarning]:
    """Model-free checks: includes, methods and their arguments (errors raise), plus warnings."""
    warnings: list[LintWarning] = []
    edit_names: set[str] = set()
    trainability: list[ast.Freeze | ast.Unfreeze] = []

    def visit(prog: ast.Program, including: tuple[str, ...]) -> None:
        for st in prog:
            if isinstance(st, ast.Use):
                if not st.is_path and st.target == "auto":
                    continue  # needs a model to pick the family
                path = include_path(st, prog, including)
                visit(parse_included(st, path, prog.source), (*including, str(path)))
            elif isinstance(st, ast.Apply):
                method = get_method(st.method, st.method_span)
                method.bind(st.arguments, st.method_span)
                edit_names.add(st.name or method.name)
                for earlier in trainability:
                    warnings.append(
                        LintWarning(
                            f"this {type(earlier).__name__.lower()} is overridden by the apply at "
                            f"{st.span.location}: apply freezes every non-adapter parameter",
                            span=earlier.span,
                            hint="move it after the apply",
                        )
                    )
                trainability.clear()
            elif isinstance(st, ast.AdapterBlock):
                edit_names.add(st.name)  # `merge NAME` / `remove NAME` may name the adapter
                visit(ast.Program(st.statements, prog.source), including)
            elif isinstance(st, ast.Combine):
                check_combination(st)
                edit_names.add(st.name)
            elif isinstance(st, ast.Fuse):
                check_part_names(st.parts, layout_spec(st.layout, st.layout_span), st.span)
            elif isinstance(st, ast.Family) and st.extends is not None:
                parent_family(st, prog, (*including, prog.source.name))  # raises on a mistake
            elif isinstance(st, (ast.Freeze, ast.Unfreeze)):
                trainability.append(st)
            elif isinstance(st, ast.Prepare):
                bind_prepare(st)
                warnings.extend(
                    LintWarning(
                        f"this {type(earlier).__name__.lower()} is overridden by the prepare at "
                        f"{st.span.location}: prepare freezes every non-adapter parameter",
                        span=earlier.span,
                        hint="move it after the prepare",
                    )
                    for earlier in trainability
                )
                trainability.clear()
            elif isinstance(st, (ast.Merge, ast.Remove)) and st.target is not None:
                if st.target not in edit_names and st.target not in REGISTRY:
                    warnings.append(
                        LintWarning(
                            f"no earlier apply is named '{st.target}'; "
                            "it must already be in the model",
                            span=st.span,
                            hint=did_you_mean(st.target, edit_names | set(REGISTRY)),
                        )
                    )

    visit(program, (source_key(program),))
    return warnings
