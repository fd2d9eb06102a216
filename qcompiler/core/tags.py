"""Who made a node: the ``qcompiler.pass`` node-metadata convention.

A pass marks every node it creates with its name (:meth:`~qcompiler.core.pass_base.Pass.tag`); the IR layer
writes the mark as node ``metadata_props`` (key :data:`TAG_KEY`) when it exports the graph, and reads it back
with :func:`tag_of`. The mark lives on the graphsurgeon node as a plain attribute, so the core needs no protobuf.
"""

from __future__ import annotations

from typing import Any

#: the node metadata key of the mark in an exported model
TAG_KEY = "qcompiler.pass"
#: the attribute that holds the mark on a graphsurgeon node
TAG_ATTR = "_qcompiler_pass"


def tag(node: Any, pass_name: str) -> Any:
    """Mark ``node`` as created by ``pass_name``; returns the node."""
    setattr(node, TAG_ATTR, pass_name)
    return node


def tag_of(node: Any) -> str | None:
    """The pass that created ``node`` (``None``: it came from the input model)."""
    return getattr(node, TAG_ATTR, None)
