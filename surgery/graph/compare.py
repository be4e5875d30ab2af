"""Structural comparison of fx graphs, via networkx graph isomorphism.

Used to prove that erasing an edit from a site graph leaves exactly the graph that the remaining
edits build on their own (no dangling node, no wrong rewiring).
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx


def _label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(
        node.target, "__name__", repr(node.target))
    constants = [repr(a) for a in node.args if not isinstance(a, fx.Node)]
    return f"{node.op}:{target}:{','.join(constants)}"


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The data flow of `graph`: one vertex per node (labelled op:target:constants), argument
    edges labelled with their position."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, label=_label(node))
        for position, arg in enumerate(node.args):
            if isinstance(arg, fx.Node):
                g.add_edge(arg.name, node.name, position=position)
    return g


def same_structure(a: fx.Graph, b: fx.Graph) -> bool:
    """True when the two graphs compute the same thing node for node (up to node names)."""
    return nx.is_isomorphic(
        to_networkx(a), to_networkx(b),
        node_match=lambda x, y: x["label"] == y["label"],
        edge_match=lambda x, y: x["position"] == y["position"],
    )
