"""Sites are transparent in the state dict.

A site holds the module it wraps as its child `base`, so nn.Module would key that module's
tensors `q_proj.base.weight`: a Trainer or `save_pretrained` checkpoint of a rewritten model
would then not load into the plain architecture (transformers re-initializes the weights it
misses at random and only says so in its load report). `TransparentStateDict` keys them as the
plain model does (`q_proj.weight`), with each edit's tensors beside them (`q_proj.lora.A`), and
reads such keys back. `named_parameters()` and `named_modules()` keep the real tree: module-
replacing tools and `get_submodule` need it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

BASE = "base"  # the site's submodule that is the wrapped module (and the fx call target)


class TransparentStateDict(nn.Module):
    """What a site (`Site`, `ParamSite`) does with state dicts and attribute reads; a site
    registers `report_logical_keys` as its load post-hook. Its edits' names (`_surgery_edits`)
    are never names of the wrapped module's tensors or children (the planner refuses them), so
    the keys cannot collide."""

    _surgery_edits: tuple[Any, ...]

    def __getattr__(self, name: str) -> Any:
        # Code outside the site (HF modules, user code) may read `q_proj.weight`,
        # `q_proj.in_features` or an experts module's `num_experts`: fall through to the wrapped
        # module. Private names (`_lineno_map`, `_in_spec`, `_initialize_hook`, ...) are
        # questions about the site itself, asked by fx, dynamo and nn.Module machinery: answering
        # them from the base would describe the wrong object (dynamo read a Linear's missing
        # `_lineno_map` and failed on every site).
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get(BASE)
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        """The wrapped module's entries under their own keys (`q_proj.weight`, not
        `q_proj.base.weight`), each edit's beside them (`q_proj.lora.A`): the keys of the plain
        model plus the adapters', so a Trainer or `save_pretrained` checkpoint loads into the
        plain architecture. nn.Module builds the entries; only their keys change here."""
        if args:  # nn.Module's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (*args, destination, prefix, keep_vars)[:3]
        own = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()  # type: ignore[attr-defined]
        hop = f"{prefix}{BASE}."
        for key, value in own.items():
            logical = prefix + key[len(hop) :] if key.startswith(hop) else key
            if logical in destination:
                raise RuntimeError(f"state dict key {logical} of a site is taken twice")
            destination[logical] = value
        if hasattr(destination, "_metadata"):
            # the wrapped module's metadata (its `version`) under its logical path, where a
            # plain model looks for it; the physical entries stay for a load into a site
            for path, meta in own._metadata.items():  # type: ignore[attr-defined]
                destination._metadata[path] = meta
                if path == hop[:-1]:
                    destination._metadata[prefix[:-1]] = meta
                elif path.startswith(hop):
                    destination._metadata[prefix + path[len(hop) :]] = meta
        return destination

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Read keys as `state_dict` writes them: every key below the site that is not an edit's
        goes to the wrapped module. nn.Module loads this site's children from the same dict
        right after (which is why it is renamed in place); `report_logical_keys` then names
        what they report missing, unexpected or mismatched by the keys the caller gave."""
        hop = f"{prefix}{BASE}."
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if not self._is_edit_key(rest):
                state_dict[hop + rest] = state_dict.pop(key)
        self.__dict__["_surgery_loading"] = (
            prefix,
            [(found, len(found)) for found in (missing_keys, unexpected_keys, error_msgs)],
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _is_edit_key(self, rest: str) -> bool:
        """Whether a key below the site (`lora.A`) is an edit's rather than the wrapped
        module's."""
        return rest.partition(".")[0] in {e.name for e in self._surgery_edits}

    @staticmethod
    def report_logical_keys(site: nn.Module, incompatible: Any) -> None:
        """Load post-hook of every site (it runs once the wrapped module has loaded): the keys its
        subtree reported (`q_proj.base.weight` missing, a size mismatch) named as the caller's
        state dict names them (`q_proj.weight`)."""
        loading = site.__dict__.pop("_surgery_loading", None)
        if loading is None:
            return
        prefix, reported = loading
        hop = f"{prefix}{BASE}."
        for found, start in reported:
            found[start:] = [entry.replace(hop, prefix) for entry in found[start:]]
