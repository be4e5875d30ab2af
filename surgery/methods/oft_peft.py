"""OFT in PEFT 0.21's adapter format (peft_type "OFT"), both ways.

PEFT stores one tensor per module, `<path>.oft_R.weight` [blocks or 1, b(b-1)/2], which is
exactly our `Q`; its config holds one `r` or `oft_block_size` (the other is derived per module
from in_features) and one `block_share`, `use_cayley_neumann`, `num_cayley_neumann_terms` for
the whole adapter. On import the block size is read off each tensor (what PEFT computed, even
where it silently adjusted an `oft_block_size` that did not divide in_features); the options
this package does not implement (`module_dropout` > 0, a trained bias) are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from typing import Any

import torch

from surgery.edit import Edit, tensor_key
from surgery.methods.codec import register_codec

PREFIX = "base_model.model."
SUFFIX = ".oft_R.weight"
# A module path as nn.Module names it: the imported rules quote these paths, so anything else
# (a newline, a quote, `;`) could smuggle in statements.
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# PEFT options that change what the adapter computes and that OFT here does not implement:
# (field, the value that is fine)
UNSUPPORTED = (
    ("module_dropout", 0.0),
    ("bias", "none"),
    ("layer_replication", None),
    ("trainable_token_indices", None),
)


def _error(message: str, hint: str | None = None) -> Exception:
    from surgery.io.peft_config import PeftFormatError  # io imports the methods: import late

    return PeftFormatError(message, hint=hint)


def _one(edits: list[Edit], option: str) -> Any:
    """The value of `option` shared by every edit (PEFT has one per adapter)."""
    values = {e.key().option(option) for e in edits}
    if len(values) > 1:
        raise _error(
            f"PEFT's OFT config has one {option} per adapter; these edits use "
            f"{sorted(values)}",
            hint="export edits that agree on it, or keep them in surgery's format",
        )
    return values.pop()


def block_size_of(n_elements: int) -> int | None:
    """b with b(b-1)/2 = n_elements (b >= 2), or None."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b >= 2 and b * (b - 1) // 2 == n_elements else None


class OFTCodec:
    method = "oft"
    peft_type = "OFT"

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        share, terms = _one(edits, "share"), _one(edits, "terms")
        coft_eps = _one(edits, "coft_eps")  # None: plain OFT
        sizes = {e.key().option("block_size") for e in edits}
        counts = {e.key().option("blocks") for e in edits}
        if len(sizes) == 1:
            r, block_size = 0, sizes.pop()
        elif len(counts) == 1:
            r, block_size = counts.pop(), 0
        else:
            raise _error(
                "PEFT's OFT config has one r or one oft_block_size per adapter; these edits use "
                f"block sizes {sorted(sizes)} and block counts {sorted(counts)}",
                hint="export edits with one block_size (or one r)",
            )
        paths = sorted(e.path for e in edits)
        for path in paths:  # PEFT's list entries also match a module whose name ends `.path`
            clash = next((n for n in module_names if n.endswith("." + path)), None)
            if clash is not None:
                raise _error(f"PEFT would also apply OFT to {clash} (its name ends in {path})")
        weights = {
            f"{PREFIX}{e.path}{SUFFIX}": tensors[tensor_key(e.path, e.name, "Q")].contiguous()
            for e in edits
        }
        config = {
            "peft_type": self.peft_type,
            "r": r,
            "oft_block_size": block_size,
            "target_modules": paths,
            "module_dropout": 0.0,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
            "coft": coft_eps is not None,
            "eps": 6e-5 if coft_eps is None else coft_eps,
            "block_share": share,
            "use_cayley_neumann": terms != 0,
            "num_cayley_neumann_terms": terms or 5,
            "layers_to_transform": None,
            "layers_pattern": None,
            "exclude_modules": None,
            # the Cayley-Neumann series as PEFT >= 0.18 computes it (older PEFT warns)
            "peft_version": "0.21.0",
        }
        return config, weights

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        for name, fine in UNSUPPORTED:
            value = config.get(name, fine)
            if value != fine and not (fine is None and value in ([], {})):
                raise _error(
                    f"cannot import this PEFT OFT adapter: {name}={value!r} is not supported",
                    hint="supported: OFT on Linear layers with any r or oft_block_size, "
                    "block_share, coft and either Cayley transform",
                )
        arguments = self._arguments(config)
        groups: dict[int, list[str]] = defaultdict(list)
        weights: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            path = key[len(PREFIX) : -len(SUFFIX)]
            if not (key.startswith(PREFIX) and key.endswith(SUFFIX)) or not _MODULE_PATH.fullmatch(
                path
            ):
                raise _error(
                    f"cannot import tensor {json.dumps(key)}: not {PREFIX}<module path>{SUFFIX}"
                )
            b = block_size_of(tensor.shape[-1]) if tensor.dim() == 2 else None
            if b is None or (config.get("block_share") and tensor.shape[0] != 1):
                raise _error(
                    f"{path}: oft_R is {list(tensor.shape)}, not [blocks, b(b-1)/2] "
                    "([1, b(b-1)/2] with block_share)"
                )
            groups[b].append(path)
            weights[tensor_key(path, self.method, "Q")] = tensor
        from surgery.io.peft_format import selectors

        statements = []
        for b, paths in sorted(groups.items()):
            where = ",\n    ".join(selectors(sorted(paths)))
            statements.append(
                f"apply oft(block_size={b}{arguments}) to\n    {where}\n    expect {len(paths)}"
            )
        return "\n\n".join(statements), weights

    @staticmethod
    def _arguments(config: dict[str, Any]) -> str:
        """The arguments beyond block_size that reproduce the config's options."""
        out = ""
        if config.get("block_share", False):
            out += ", share=true"
        if config.get("coft", False):
            eps = config.get("eps", 6e-5)
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
                raise _error(f"cannot import this PEFT OFT adapter: eps={eps!r} with coft")
            out += f", coft=true, eps={float(eps)!r}"
        if not config.get("use_cayley_neumann", True):
            return out + ", cayley=exact"
        terms = config.get("num_cayley_neumann_terms", 5)
        if not isinstance(terms, int) or isinstance(terms, bool) or terms < 2:
            raise _error(
                f"cannot import this PEFT OFT adapter: num_cayley_neumann_terms={terms!r} "
                "(fewer than 2 terms make every rotation the identity)"
            )
        return out + (f", terms={terms}" if terms != 5 else "")


register_codec(OFTCodec())
