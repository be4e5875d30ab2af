"""Reading and writing surgery's outputs (adapter weights, rules, plans)."""

from surgery.io.adapters import adapter_state_dict, write_adapter_dir
from surgery.io.safe import atomic_directory
from surgery.io.several import load_adapters

__all__ = ["adapter_state_dict", "atomic_directory", "load_adapters", "write_adapter_dir"]
