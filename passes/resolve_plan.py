"""resolve-plan: decide, for every node, how it is quantized (and which plan rule said so).

Applies the precision plan (``qcompiler.plan``) to the current graph: defaults, then matching rules in
precedence order (op_type < name_regex < name; a later rule wins a tie). Checks the result against the
target's capabilities (refusing an unsupported node with its name and the reason), lets the target apply its own
defaults to nodes no rule decided (``Target.refine``; recorded as a ``note`` in the resolved plan), then fills
``ctx.activation_specs``: the activation tensors to quantize — the float inputs of every quantized node, plus
the outputs the target wants quantized for its integer kernels. The per-node decision is written beside the
output as ``<OUT>.plan.yaml``. The graph itself is not changed.
"""

from __future__ import annotations

import logging
from collections import Counter

from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.plan import QuantSpec

log = logging.getLogger(__name__)


class ResolvePlanPass(Pass):
    """Apply the precision plan to every node; check it against the target; list tensors to calibrate."""

    name = "resolve-plan"
    keeps_function = True  # outputs unchanged up to float rounding (calibration after it runs the float model)
    produces = frozenset({"plan-resolved"})

    def run(self, ctx: CompileContext) -> PassResult:
        resolved = ctx.plan.resolve(ctx.graph)
        resolved.target_options = ctx.target.check_options(ctx.plan.target_options, ctx.plan.source)
        ctx.target.check(resolved)
        stats: Counter[str] = Counter()
        refined = ctx.target.refine(resolved, ctx.graph)
        if refined:
            stats["target_refined"] = refined
        ctx.resolved = resolved
        specs: dict[str, QuantSpec] = {}
        by_name = {n.name: n for n in ctx.graph.nodes}
        for np_ in resolved.nodes.values():
            if not np_.quantized:
                stats["float_nodes"] += 1
                continue
            stats["quantized_nodes"] += 1
            if np_.weight is not None:
                stats[f"weight_{np_.weight.scheme if np_.weight.scheme != 'int' else np_.weight.dtype}"] += 1
            if np_.activation is None:
                continue
            node = by_name[np_.node]
            for i in np_.activation_inputs:
                t = node.inputs[i]
                prev = specs.setdefault(t.name, np_.activation)
                if prev != np_.activation:
                    stats["activation_spec_conflicts"] += 1
                    log.warning("tensor '%s' is read by nodes with different activation specs; using the first",
                                t.name)
        extra = ctx.target.output_tensors(ctx)
        ctx.activation_all_consumers = set(extra)
        for name, spec in extra.items():
            specs.setdefault(name, spec)
        stats["target_output_tensors"] = len(extra)
        stats["activation_tensors"] = len(specs)
        ctx.activation_specs = specs
        stats["unmatched_rules"] = len(resolved.unmatched_rules)
        ctx.side_outputs[".plan.yaml"] = resolved.to_yaml()
        ctx.report["plan"] = {"source": resolved.source, "quantized_nodes": stats["quantized_nodes"],
                              "float_nodes": stats["float_nodes"], "unmatched_rules": resolved.unmatched_rules}
        return PassResult(modified=False, stats=stats)
