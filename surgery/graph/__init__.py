"""Sites (fx GraphModules around targeted modules) and the graph edits methods make."""

from surgery.graph.site import EditKey, GraphBuilder, Site, add_edit, drop_edit, wrap

__all__ = ["EditKey", "GraphBuilder", "Site", "add_edit", "drop_edit", "wrap"]
