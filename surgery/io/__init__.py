"""Reading and writing surgery's outputs (adapter weights, rules, plans)."""

from surgery.io.adapters import adapter_state_dict, write_adapter_dir
from surgery.io.safe import atomic_directory

__all__ = ["adapter_state_dict", "atomic_directory", "write_adapter_dir"]
