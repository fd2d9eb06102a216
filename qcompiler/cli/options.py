"""Command-line options several commands share (``compile``, ``validate``, ``package``)."""

from __future__ import annotations

import click

#: ``--slice-axis OUTPUT=AXIS``: the axis along which an output's worst slice is measured
slice_axis_option = click.option(
    "--slice-axis", "slice_axes", multiple=True, metavar="OUTPUT=AXIS",
    help="Measure OUTPUT's worst slice along AXIS (default: 1, or the last axis of [N, F] / [N, A, C]).")
