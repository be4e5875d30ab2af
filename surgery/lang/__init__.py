"""The .surg language: syntax tree (`ast`) and parser (`parser`)."""

from surgery.lang.parser import parse, parse_file

__all__ = ["parse", "parse_file"]
