"""Calibration sources shared by the compiles nested in one top-level compile (qcompiler.calib.shared, issue 15):
a guarded preset's candidates, the recipe's read of the held-back samples and the final compile check and
digest the calibration folder once — with the same bytes written as when every compile reads it anew — and a
later compile (or a changed file) reads it again."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.calib.shared import shared_source, sharing_sources
from qcompiler.calib.sources import _FolderSource

compile_module = importlib.import_module("qcompiler.compile")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "conv_bn_relu.onnx"

pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _folder(tmp: Path, n: int = 8, seed: int = 0) -> Path:
    data = np.load(ROOT / "models" / "conv_bn_relu.npz")["input"]
    rng = np.random.default_rng(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = data[i % len(data)] + 0.05 * rng.standard_normal(data.shape[1:]).astype(np.float32)
        np.savez(tmp / f"{i:03d}.npz", input=x.astype(np.float32))
    return tmp


def _sigs():
    graph, _meta = ir.import_graph(ir.load_model(MODEL))
    return input_signatures(graph)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class _Counter:
    """Counts the folder sources built (their up-front check of every file)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folders = 0
        real = _FolderSource.__init__
        counter = self

        def init(self_, *a, **k):  # type: ignore[no-untyped-def]
            counter.folders += 1
            real(self_, *a, **k)

        monkeypatch.setattr(_FolderSource, "__init__", init)


def test_scope_gives_one_source_per_argument_and_limit(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "calib")
    other = _folder(tmp_path / "other", seed=1)
    sigs = _sigs()
    # outside a scope: a new source every time (what the compile did before)
    assert shared_source(str(folder), sigs) is not shared_source(str(folder), sigs)
    with sharing_sources():
        a = shared_source(str(folder), sigs)
        assert shared_source(folder, sigs) is a  # str or Path: one argument
        with sharing_sources():  # nested (a candidate's compile): the outer scope holds
            assert shared_source(str(folder), sigs, seed=7) is a  # the seed only matters for random data
        assert shared_source(str(folder), sigs, limit=4) is not a
        assert len(shared_source(str(folder), sigs, limit=4)) == 4
        assert shared_source(str(other), sigs) is not a
        assert shared_source("random", sigs) is not shared_source("random", sigs)  # random: never shared
        assert a.sample_ids() == CalibrationSource.from_arg(str(folder), sigs).sample_ids()
    with sharing_sources():  # a new scope: read again
        assert shared_source(str(folder), sigs) is not a


def test_guarded_preset_reads_the_folder_once_with_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    folder = _folder(tmp_path / "calib")
    opts = CompileOptions(preset="w8a8", calib=str(folder), validate=True, report=str(tmp_path / "r.json"))
    count = _Counter(monkeypatch)
    res = compile_model(MODEL, tmp_path / "shared.onnx", opts)
    assert res.report["recipe"]["mode"] == "guard" and len(res.report["recipe"]["candidates"]) >= 3
    # the recipe's held-back read, every candidate and the final compile (with its validation): one check
    assert count.folders == 1
    shared = _sha(tmp_path / "shared.onnx")

    # every compile building its own source, as before: the same file, the same report numbers
    monkeypatch.setattr(compile_module, "sharing_sources", contextlib.nullcontext)
    from qcompiler.calib import reset_stats_cache
    reset_stats_cache()
    count.folders = 0
    res2 = compile_model(MODEL, tmp_path / "own.onnx",
                         CompileOptions(preset="w8a8", calib=str(folder), validate=True))
    assert count.folders >= 1 + len(res.report["recipe"]["candidates"])
    assert _sha(tmp_path / "own.onnx") == shared
    def measured(r):  # the candidates' measurements (not their seconds)
        return [{k: v for k, v in c.items() if k != "seconds"} for c in r.report["recipe"]["candidates"]]

    assert measured(res2) == measured(res)
    assert res2.report["validation"] == res.report["validation"]


def test_a_later_compile_reads_changed_data_again(tmp_path: Path, monkeypatch) -> None:
    folder = _folder(tmp_path / "calib")
    count = _Counter(monkeypatch)
    compile_model(MODEL, tmp_path / "a.onnx", CompileOptions(plan="default", calib=str(folder), validate=False))
    assert count.folders == 1
    # the same files rewritten in place with other data (same names, same sizes): the next compile's source is
    # built anew and digests the new bytes, so neither statistics nor files of the first compile are reused
    _folder(folder, seed=5)
    compile_model(MODEL, tmp_path / "b.onnx", CompileOptions(plan="default", calib=str(folder), validate=False))
    assert count.folders == 2
    from qcompiler.calib import reset_stats_cache
    reset_stats_cache()
    compile_model(MODEL, tmp_path / "c.onnx", CompileOptions(plan="default", calib=str(folder), validate=False))
    assert _sha(tmp_path / "b.onnx") == _sha(tmp_path / "c.onnx")  # what a fresh process would write
    assert _sha(tmp_path / "a.onnx") != _sha(tmp_path / "b.onnx")  # the new data did count
