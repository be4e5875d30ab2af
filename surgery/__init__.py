"""surgery: a declarative model-surgery language and graph rewriter for PyTorch models.

from surgery import rewrite
report = rewrite(model, "apply lora(r=8) to *.self_attn.<q,v>_proj")
"""

from surgery.adapters import units as _units
from surgery.adapters.combine import combine_adapters as _combine_adapters
from surgery.adapters.lifecycle import HotSwapError, delete_adapter, hot_swap, merge_adapter
from surgery.adapters.router import RoutingError
from surgery.api import load_rules, plan, prepare_kbit, rewrite
from surgery.arguments import checked
from surgery.errors import (
    ExecutionError,
    ModelLoadError,
    OutputError,
    PlanError,
    ResolveError,
    SurgeryError,
    SurgerySyntaxError,
)
from surgery.execute import Report
from surgery.graph.site import Site
from surgery.io.load import load_adapter
from surgery.io.several import load_adapters as _load_adapters
from surgery.lang import parse as _parse
from surgery.lang import parse_file as _parse_file
from surgery.losses import (
    MultipleChoiceBatch,
    TFewLosses,
    choice_scores,
    multiple_choice_batch,
    t_few_losses,
)
from surgery.methods import REGISTRY as METHODS
from surgery.plan import Plan
from surgery.soft_prompts import Neighbour, VirtualToken, nearest_tokens
from surgery.train import param_groups

# The parser's entry points, with their arguments' types checked (as `rewrite`'s are); inside
# the package, `surgery.lang.parse` is called with text it has already read.
parse = checked(_parse)
parse_file = checked(_parse_file)
# The adapters' switches, checked in the same way (inside the package they are called directly).
set_active = checked(_units.set_active)
active_adapters = checked(_units.active_adapters)
adapter_names = checked(_units.adapter_names)
disabled = checked(_units.disabled)
combine_adapters = checked(_combine_adapters)
load_adapters = checked(_load_adapters)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ExecutionError",
    "HotSwapError",
    "ModelLoadError",
    "MultipleChoiceBatch",
    "Neighbour",
    "OutputError",
    "Plan",
    "PlanError",
    "Report",
    "ResolveError",
    "RoutingError",
    "Site",
    "SurgeryError",
    "SurgerySyntaxError",
    "TFewLosses",
    "VirtualToken",
    "active_adapters",
    "adapter_names",
    "choice_scores",
    "combine_adapters",
    "delete_adapter",
    "disabled",
    "hot_swap",
    "load_adapter",
    "load_adapters",
    "load_rules",
    "merge_adapter",
    "multiple_choice_batch",
    "nearest_tokens",
    "param_groups",
    "parse",
    "parse_file",
    "plan",
    "prepare_kbit",
    "rewrite",
    "set_active",
    "t_few_losses",
]
