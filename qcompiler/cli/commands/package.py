"""``qcompiler package`` (compile + validate + write a deployment bundle) and ``qcompiler verify`` (check one).

See :mod:`qcompiler.report.bundle` for the bundle layout.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from qcompiler.api import build_bundle
from qcompiler.cli.options import check_option, min_sqnr_option, slice_axis_option
from qcompiler.cli.terminal import collector_frozen
from qcompiler.plan.checks import parse_check, parse_slice_axes
from qcompiler.report.bundle import verify_bundle


def _db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)


def register(cli: click.Group) -> None:
    @cli.command("package")
    @click.argument("model", type=click.Path(path_type=Path))
    @click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                  help="Bundle folder to create (must not exist).")
    @click.option("--target", default="ort", show_default=True, help="Runtime target (qcompiler targets).")
    @click.option("--calib", required=True, help="Calibration data (folder of .npz or one .npz); also used to "
                                                 "validate unless --validate-data is given.")
    @click.option("--plan", help="Precision plan: a YAML/JSON file or a preset name; without one, the measured "
                                 "default (as compile), 'default' for the plain default plan.")
    @click.option("--pipeline", help="Textual pipeline (default: the target's).")
    @min_sqnr_option("Fail (exit 2, no bundle) when an output's SQNR is below DB: its whole-tensor SQNR or that "
                     "of its worst slice along the channel / feature axis.")
    @check_option(" (repeatable; see `qcompiler compile --help`); a failed check fails like --min-sqnr. The bundle "
                  "records them.", examples="'output0[..., 4:]>=20dB'")
    @slice_axis_option
    @click.option("--zip", "make_zip", is_flag=True, help="Also write BUNDLE.zip.")
    @click.option("--validate-data", type=click.Path(path_type=Path), help="Held-back feeds for validation.")
    @click.option("--calib-samples", type=int, help="Use at most N calibration samples.")
    @click.option("--check-samples", type=int, default=4, show_default=True,
                  help="Validation feeds kept in the bundle for `qcompiler verify` to rerun.")
    @click.option("--external-data", type=int, default=None,
                  help="Store tensors of at least BYTES as external data (model.onnx.data).")
    @click.option("--plugin", "plugins", multiple=True, help="Load passes from module:Class or path/to/file.py.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--compact-names", is_flag=True,
                  help="Shortest internal tensor / node names (smaller model.onnx); the map back is bundled as "
                       "model.names.json.")
    @click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
    def package_cmd(model: Path, output: Path, target: str, calib: str, plan: str | None, pipeline: str | None,
                    min_sqnr: float | None, make_zip: bool, validate_data: Path | None, calib_samples: int | None,
                    check_samples: int, external_data: int | None, plugins: tuple[str, ...], seed: int,
                    compact_names: bool, quiet: bool, checks: tuple[str, ...], slice_axes: tuple[str, ...]) -> None:
        """Compile MODEL, validate it, and write a deployment bundle (model, resolved plan, validation report
        as JSON and HTML, manifest with hashes and versions) at OUTPUT — atomically: nothing is written when
        anything fails; an SQNR below --min-sqnr writes only the report, as OUTPUT.rejected.report.json."""
        parsed_checks, axes = [parse_check(c) for c in checks], parse_slice_axes(slice_axes)
        with collector_frozen():  # as `compile` does
            res = build_bundle(model, output, target=target, calib=calib, plan=plan, pipeline=pipeline,
                               min_sqnr_db=min_sqnr, make_zip=make_zip, validate_data=validate_data,
                               calib_samples=calib_samples, seed=seed, external_data_threshold=external_data,
                               plugins=plugins, check_samples=check_samples, compact_names=compact_names,
                               checks=parsed_checks, slice_axes=axes)
        if quiet:
            return
        v: Any = res.validation
        size = sum(f["bytes"] for f in res.files.values())
        click.echo(f"packaged {model} -> {output}/ ({len(res.files) + 1} files, {size / 2**20:.2f} MB; target "
                   f"{res.manifest['target']})")
        click.echo(f"pipeline: {res.manifest['pipeline']}")
        gate = " (no threshold set)" if min_sqnr is None else f" (gate {min_sqnr:g} dB: PASS)"
        click.echo(f"validation: worst output SQNR {_db(v.worst_output_sqnr())} dB over {v.samples} sample(s){gate}")
        click.echo(f"worst slice SQNR {_db(v.worst_slice_sqnr())} dB" + (
            f"; {len(v.checks)} check(s) met" if v.checks else ""))
        for name in sorted(res.files):
            click.echo(f"  {res.files[name]['sha256'][:12]}  {name}")
        click.echo(f"  {'':12s}  manifest.json")
        if res.zip_path is not None:
            click.echo(f"wrote {res.zip_path}")

    @cli.command("verify")
    @click.argument("bundle", type=click.Path(path_type=Path))
    @click.option("--model", "float_model", type=click.Path(path_type=Path),
                  help="The float model, to rerun the full validation (with --data).")
    @click.option("--data", type=click.Path(path_type=Path), help="Feeds for the full validation (with --model).")
    def verify_cmd(bundle: Path, float_model: Path | None, data: Path | None) -> None:
        """Check a bundle (folder or .zip): every file's sha256 against manifest.json, the model through the
        loader's checks, and validation rerun on the bundled check feeds (exit 2 naming the file on any
        mismatch)."""
        res = verify_bundle(bundle, float_model=float_model, data=data)
        click.echo(f"{bundle}: {res.files} files match manifest.json")
        for name, (got, rec) in sorted(res.check.items()):
            click.echo(f"  output '{name}': SQNR {_db(got)} dB on the check feeds (recorded {_db(rec)} dB)")
        for m in res.messages:
            click.echo(f"  note: versions differ from the bundle's: {m}", err=True)
        if res.full is not None:
            click.echo(res.full.table(max_layers=5))
        sys.stdout.flush()
