"""The measured default's float runs reused by the compile's validation (issue 15): the float model's outputs on the
held-back samples, computed once to score the candidates (`qv.float_reference`), are handed to `qv.validate`
(`float_outputs`, `qv.known_outputs`) instead of being computed again: fewer float runs, the same report."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import count_float_runs

from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import held_back_indices
from qcompiler.calib.statcache import StatsCache
from qcompiler.report import validate as qv
from qcompiler.report.validate.compare import session_threads, validation_workers

compare = importlib.import_module("qcompiler.report.validate.compare")
MODELS = Path(__file__).resolve().parents[1] / "models"
pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _feeds(name: str) -> list[dict[str, np.ndarray]]:
    data = np.load(MODELS / f"{name}.npz")
    n = len(next(iter(data.values())))
    return [{k: np.asarray(v[i]) for k, v in data.items()} for i in range(n)]


def test_validate_with_known_float_outputs_is_the_same_report(tmp_path: Path, monkeypatch) -> None:
    model = MODELS / "conv_bn_relu.onnx"
    feeds = _feeds("conv_bn_relu")
    quant = tmp_path / "q.onnx"
    compile_model(model, quant, CompileOptions(plan="default", calib=str(MODELS / "conv_bn_relu.npz"),
                                               validate=False))
    held = held_back_indices(len(feeds))
    assert held and 0 not in held  # sample 0 (the first, run before the others) is tried below too
    ref = qv.float_reference(model, [feeds[i] for i in [0, *held]])
    ref.indices = (0, *held)
    known = qv.known_outputs(ref, model, feeds)
    assert sorted(known) == [0, *held]
    runs = count_float_runs(monkeypatch)
    plain = qv.validate(model, quant, feeds, layer_samples=4)
    assert sorted(runs) == list(range(len(feeds)))
    runs.clear()
    reused = qv.validate(model, quant, feeds, layer_samples=4, float_outputs=known)
    assert sorted(runs) == [i for i in range(len(feeds)) if i not in known]
    assert json.dumps(reused.to_json(), sort_keys=True) == json.dumps(plain.to_json(), sort_keys=True)


def test_known_outputs_only_for_the_same_model_feeds_and_session(tmp_path: Path) -> None:
    model = MODELS / "conv_bn_relu.onnx"
    feeds = _feeds("conv_bn_relu")
    ref = qv.float_reference(model, [feeds[3], feeds[7]])
    assert qv.known_outputs(ref, model, feeds) == {}  # places unknown
    ref.indices = (3, 7)
    assert sorted(qv.known_outputs(ref, model, feeds)) == [3, 7]
    handed = ref.handed((3, 7))  # what the recipe hands the compile: no feeds kept, their digests are
    assert handed.feeds == [] and sorted(qv.known_outputs(handed, model, feeds)) == [3, 7]
    assert qv.known_outputs(ref, model, iter(feeds)) == {}  # not a list: no places
    assert qv.known_outputs(ref, tmp_path / "other.onnx", feeds) == {}  # another model file
    assert qv.known_outputs(None, model, feeds) == {}
    changed = [dict(f) for f in feeds]
    changed[7] = {k: v + 1.0 for k, v in changed[7].items()}
    assert sorted(qv.known_outputs(ref, model, changed)) == [3]  # another feed at that place
    cast = [dict(f) for f in feeds]
    cast[3] = {k: v.astype(np.float64) for k, v in cast[3].items()}
    assert sorted(qv.known_outputs(ref, model, cast)) == [7]  # the same values in another dtype
    assert ref.threads == session_threads(min(validation_workers(), 2))
    ref.threads += 1  # run with other intra-op threads than validate's: its values may differ in the last bits
    assert qv.known_outputs(ref, model, feeds) == {}


@pytest.mark.parametrize("name", ["conv_bn_relu", "transformer_block"])
def test_measured_default_validation_reuses_the_held_back_float_runs(tmp_path: Path, name: str,
                                                                       monkeypatch) -> None:
    """The compile's validation runs the float model on the calibration samples the candidates were not scored
    on only; its report is the one of a validation that runs them all (known_outputs turned off). (The candidates'
    calibration outputs, which serve the other samples, are turned off here: tests/test_validation_calib_reuse.py.)"""
    model, npz = MODELS / f"{name}.onnx", str(MODELS / f"{name}.npz")
    n = min(64, len(_feeds(name)))
    held = held_back_indices(len(_feeds(name)))
    monkeypatch.setattr(StatsCache, "sample_outputs", lambda *a, **k: {})
    runs = count_float_runs(monkeypatch)
    reused = compile_model(model, tmp_path / "a.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == [i for i in range(n) if i not in held]
    monkeypatch.setattr(qv, "known_outputs", lambda *a, **k: {})
    runs.clear()
    plain = compile_model(model, tmp_path / "b.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == list(range(n))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert json.dumps(reused.report["validation"], sort_keys=True) == \
        json.dumps(plain.report["validation"], sort_keys=True)


def test_reference_kept_only_within_its_byte_cap(tmp_path: Path, monkeypatch) -> None:
    """Above `recipe.REFERENCE_KEEP_BYTES` (the float outputs of the held-back samples) the recipe keeps nothing
    and validation runs the float model on every sample, as before."""
    import qcompiler.recipe as recipe

    model, npz = MODELS / "conv_bn_relu.onnx", str(MODELS / "conv_bn_relu.npz")
    monkeypatch.setattr(recipe, "REFERENCE_KEEP_BYTES", 0)
    monkeypatch.setattr(StatsCache, "sample_outputs", lambda *a, **k: {})  # the candidates' calibration outputs off
    runs = count_float_runs(monkeypatch)
    compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == list(range(min(64, len(_feeds("conv_bn_relu")))))
