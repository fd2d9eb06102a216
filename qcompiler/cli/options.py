"""Command-line options several commands share (``compile``, ``validate``, ``package``)."""

from __future__ import annotations

from typing import Any

import click

#: the examples of ``--check``'s help
CHECK_EXAMPLES = ("'output0[..., 4:]>=20dB', 'probs cos>=0.999', 'output0 maxerr<=0.05', "
                  "'probs top1>=99%', 'map iou@0.3>=0.9'")

#: ``--slice-axis OUTPUT=AXIS``: the axis along which an output's worst slice is measured
slice_axis_option = click.option(
    "--slice-axis", "slice_axes", multiple=True, metavar="OUTPUT=AXIS",
    help="Measure OUTPUT's worst slice along AXIS (default: 1, or the last axis of [N, F] / [N, A, C]).")


#: ``--stream IN=OUT``: validation feeds each model its own previous output OUT as input IN (recurrent state)
stream_option = click.option(
    "--stream", "streams", multiple=True, metavar="IN=OUT",
    help="Validate the samples as one stream, in order: from the second on, input IN of each model is its own "
         "output OUT of the sample before (a recurrent state; repeatable), not the data's. In compile, the "
         "measured default and the presets' guard score their candidates so too.")


def min_sqnr_option(help_text: str) -> Any:
    """``--min-sqnr DB``: the gate on every output's whole-tensor and worst-slice SQNR; ``help_text`` says what
    a failure does in this command."""
    return click.option("--min-sqnr", type=float, help=help_text)


def check_option(outcome: str, examples: str = CHECK_EXAMPLES) -> Any:
    """``--check CHECK`` (repeatable): a threshold on an output or a slice of it; ``outcome`` ends the help
    with what a failed check does in this command."""
    return click.option("--check", "checks", multiple=True, metavar="CHECK",
                        help=f"A threshold on an output or a slice of it, e.g. {examples}{outcome}")
