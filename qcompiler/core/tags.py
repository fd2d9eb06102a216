"""Who made a node, and whose output a pass changed on purpose: the node-metadata conventions.

A pass marks every node it creates with its name (:meth:`~qcompiler.core.pass_base.Pass.tag`); the IR layer
writes the mark as node ``metadata_props`` (key :data:`TAG_KEY`) when it exports the graph, and reads it back
with :func:`tag_of`. The mark lives on the graphsurgeon node as a plain attribute, so the core needs no protobuf.

A pass that rewrites the input model so that an intermediate tensor keeps its name but holds other values by design
(``fold-batchnorm`` scaling a Conv whose bias Add follows it, ``equalize`` scaling a layer's output channels,
``smooth`` dividing a LayerNorm's output by the smoothing factors) marks that tensor with :func:`mark_rescaled`:
the float model's tensor of the same name is then another quantity, and per-layer validation must not compare the
two. Export writes the mark on the tensor's producer as node metadata (key :data:`RESCALED_KEY`, the pass name as
value); :func:`qcompiler.ir.rescaled_tensors` reads it back from a model.
"""

from __future__ import annotations

from typing import Any

#: the node metadata key of the mark in an exported model
TAG_KEY = "qcompiler.pass"
#: the attribute that holds the mark on a graphsurgeon node
TAG_ATTR = "_qcompiler_pass"
#: the node metadata key of the "output rescaled on purpose" mark
RESCALED_KEY = "qcompiler.rescaled"
#: the attribute that holds that mark on a graphsurgeon node
RESCALED_ATTR = "_qcompiler_rescaled"


def tag(node: Any, pass_name: str) -> Any:
    """Mark ``node`` as created by ``pass_name``; returns the node."""
    setattr(node, TAG_ATTR, pass_name)
    return node


def tag_of(node: Any) -> str | None:
    """The pass that created ``node`` (``None``: it came from the input model)."""
    return getattr(node, TAG_ATTR, None)


def mark_rescaled(tensor: Any, pass_name: str) -> Any:
    """Mark graphsurgeon ``tensor`` as holding other values than the input model's same-named tensor, by design
    of ``pass_name`` (the first pass to do so keeps the mark); returns the tensor."""
    if getattr(tensor, RESCALED_ATTR, None) is None:
        setattr(tensor, RESCALED_ATTR, pass_name)
    return tensor


def rescaled_by(tensor: Any) -> str | None:
    """The pass that rescaled ``tensor`` (``None``: its values are the input model's, up to quantization)."""
    return getattr(tensor, RESCALED_ATTR, None)
