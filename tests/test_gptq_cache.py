"""GPTQ's process-level Hessian and sweep caches (passes/_gptq_cache.py): a compile served from them writes the
very bytes of one without them; a Hessian over the first samples continued over the rest is bit for bit the
one accumulated from scratch; a row quota (``max_rows``) never merges a prefix; what changes the result (the
samples' content, the options, the weights) misses; the caps (environment, LRU) hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import gptq_chain_model

from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import held_back_indices
from qcompiler.passes import _gptq_cache
from qcompiler.passes import gptq as gptq_mod
from qcompiler.plan import Plan

INT4_PC = {"dtype": "int4", "granularity": "per_channel", "symmetric": True}
INT4_BLOCK = {"dtype": "int4", "granularity": "block", "block_size": 4, "symmetric": False}
LAYERS = 4


@pytest.fixture(autouse=True)
def fresh_caches():
    """Every test starts from empty caches at their default caps (and leaves such caches behind)."""
    _gptq_cache.reset_caches()
    yield
    _gptq_cache.reset_caches()


def chain_model() -> onnx.ModelProto:
    return gptq_chain_model(31)


def plan(weight: dict = INT4_PC, gptq: dict | None = None) -> Plan:
    return Plan.from_dict({"defaults": {"weight": weight, "activation": {"dtype": "uint8"}},
                           "algorithms": {"gptq": gptq or True}}, source="test-plan")


def folder(tmp: Path, n: int, name: str = "calib", seed: int = 5) -> Path:
    """``n`` samples (the first ``n`` of one fixed series: folders of 12 and 16 share their first 12 files)."""
    rng = np.random.default_rng(seed)
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
        np.savez(d / f"{i:03d}.npz", x=x)
    return d


def compile_once(tmp: Path, calib: Path, tag: str, p: Plan | None = None,
                 indices: tuple[int, ...] | None = None) -> tuple[bytes, dict]:
    src = tmp / "m.onnx"
    if not src.exists():
        onnx.save(chain_model(), src)
    out = tmp / f"{tag}.onnx"
    res = compile_model(src, out, CompileOptions(plan=p or plan(), calib=str(calib), validate=False,
                                                 calib_indices=indices))
    assert res.report["gptq"]["layers"] == LAYERS
    return out.read_bytes(), res.report["gptq"]


def hessians() -> dict:
    """The Hessian cache's entries: (layer key, number of samples) -> (H, rows)."""
    return {(k, len(ids)): v[0] for (k, ids), v in _gptq_cache.hessian_cache()._data.items()}


def no_stream(*_a, **_k):
    raise AssertionError("every Hessian and sweep is cached: nothing may be streamed")


@pytest.mark.parametrize("weight", [INT4_PC, INT4_BLOCK], ids=["per_channel", "block4"])
def test_cached_compile_writes_the_same_bytes_as_one_without_the_caches(tmp_path, monkeypatch, weight) -> None:
    calib = folder(tmp_path, 8)
    first, rep_first = compile_once(tmp_path, calib, "first", plan(weight))
    hc, sc = _gptq_cache.hessian_cache(), _gptq_cache.sweep_cache()
    assert (hc.misses, hc.hits, len(hc), sc.misses, sc.hits, len(sc)) == (LAYERS, 0, LAYERS, LAYERS, 0, LAYERS)
    # the same plan on the same samples: every sweep from the cache, no Hessian even looked up, nothing streamed
    monkeypatch.setattr(gptq_mod, "stream", no_stream)
    again, rep_again = compile_once(tmp_path, calib, "again", plan(weight))
    assert (sc.hits, hc.hits + hc.partial_hits + hc.misses) == (LAYERS, LAYERS)
    monkeypatch.undo()
    _gptq_cache.reset_caches(0, 0)
    off, rep_off = compile_once(tmp_path, calib, "off", plan(weight))
    assert first == again == off
    assert rep_first == rep_again == rep_off


def test_other_sweep_options_reuse_the_hessians_and_give_the_uncached_bytes(tmp_path, monkeypatch) -> None:
    """The guard's variants: another grid / option over the same Hessians — each Hessian a hit, each sweep a
    miss, nothing streamed, and the bytes of a compile without caches."""
    calib = folder(tmp_path, 8)
    compile_once(tmp_path, calib, "first")
    monkeypatch.setattr(gptq_mod, "stream", no_stream)
    damped, _ = compile_once(tmp_path, calib, "damped", plan(gptq={"damp": 0.05}))
    hc, sc = _gptq_cache.hessian_cache(), _gptq_cache.sweep_cache()
    assert (hc.hits, hc.partial_hits, sc.hits, sc.misses) == (LAYERS, 0, 0, 2 * LAYERS)
    monkeypatch.undo()
    _gptq_cache.reset_caches(0, 0)
    off, _ = compile_once(tmp_path, calib, "off", plan(gptq={"damp": 0.05}))
    assert damped == off


def test_prefix_then_rest_gives_bit_identical_hessians_and_bytes(tmp_path) -> None:
    """The measured default's candidates on the 12 fit samples of 16 (``calib_indices``: every 4th held back),
    then the confirmation on all 16: GPTQ sums the held-back samples last (``held_back_last``), so the
    16-sample Hessians are the cached 12-sample ones plus the 4 held-back samples — bit for bit those
    accumulated from scratch."""
    full = folder(tmp_path, 16, "full")
    fit = tuple(i for i in range(16) if i not in held_back_indices(16))
    assert len(fit) == 12
    compile_once(tmp_path, full, "short", indices=fit)
    merged, rep_merged = compile_once(tmp_path, full, "merged")
    hc = _gptq_cache.hessian_cache()
    assert (hc.partial_hits, hc.hits) == (LAYERS, 0)
    h_merged = hessians()
    assert {n for _k, n in h_merged} == {16}  # the 12-sample entries replaced: one H per layer in memory
    _gptq_cache.reset_caches()
    scratch, rep_scratch = compile_once(tmp_path, full, "scratch")
    h_scratch = {k: v for k, v in hessians().items() if k[1] == 16}
    assert _gptq_cache.hessian_cache().misses == LAYERS
    assert len(h_merged) == LAYERS and h_merged.keys() == h_scratch.keys()
    for k, (h, rows) in h_merged.items():
        assert h.dtype == np.float64 and rows == h_scratch[k][1] > 0
        assert np.array_equal(h, h_scratch[k][0])  # bit for bit, not close
    assert merged == scratch and rep_merged == rep_scratch
    _gptq_cache.reset_caches(0, 0)
    assert compile_once(tmp_path, full, "off")[0] == merged


def test_a_row_quota_never_merges_a_prefix(tmp_path) -> None:
    """``max_rows > 0``: each sample's quota depends on the number of samples, so the 12-sample Hessians are not
    continued; the same samples again are an exact hit."""
    short, full = folder(tmp_path, 12, "short"), folder(tmp_path, 16, "full")
    p = plan(gptq={"max_rows": 200})
    compile_once(tmp_path, short, "short", p)
    got, _ = compile_once(tmp_path, full, "full", p)
    hc = _gptq_cache.hessian_cache()
    assert (hc.partial_hits, hc.hits, hc.misses) == (0, 0, 2 * LAYERS)
    _gptq_cache.sweep_cache().clear()
    compile_once(tmp_path, full, "again", p)
    assert hc.hits == LAYERS
    _gptq_cache.reset_caches(0, 0)
    assert compile_once(tmp_path, full, "off", p)[0] == got


def test_a_sample_changed_in_place_misses(tmp_path) -> None:
    calib = folder(tmp_path, 8)
    first, _ = compile_once(tmp_path, calib, "first")
    shutil.copy(calib / "000.npz", calib / "007.npz")  # same names, other content
    changed, _ = compile_once(tmp_path, calib, "changed")
    hc, sc = _gptq_cache.hessian_cache(), _gptq_cache.sweep_cache()
    assert sc.hits == hc.hits == hc.partial_hits == 0 and hc.misses == 2 * LAYERS  # 7 of 8 same: not a prefix
    assert changed != first
    _gptq_cache.reset_caches(0, 0)
    assert compile_once(tmp_path, calib, "off")[0] == changed


def test_caps_environment_and_lru(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(_gptq_cache.HESSIAN_ENV, "0")
    monkeypatch.setenv(_gptq_cache.SWEEP_ENV, "0")
    hc, sc = _gptq_cache.reset_caches()
    assert hc.max_bytes == sc.max_bytes == 0
    compile_once(tmp_path, folder(tmp_path, 4), "off")
    assert len(hc) == len(sc) == 0 and hc.misses == sc.misses == 0
    monkeypatch.setenv(_gptq_cache.HESSIAN_ENV, "1.5")
    monkeypatch.delenv(_gptq_cache.SWEEP_ENV)
    hc, sc = _gptq_cache.reset_caches()
    assert hc.max_bytes == int(1.5 * 2**20) and sc.max_bytes == _gptq_cache.DEFAULT_SWEEP_MB * 2**20
    # LRU by bytes: three 0.5 MiB Hessians in a 1.5 MiB cache (each entry counts 256 bytes more) keep two
    h = np.ones((1, 256, 256))
    for i in range(3):
        hc.store(f"layer{i}", ["a"], h * i, 10)
    assert len(hc) == 2 and hc.nbytes <= hc.max_bytes
    assert hc.lookup("layer0", ["a"]) is None
    # over all the samples asked for: the entry itself, lent read-only (no copy), still cached
    full = hc.lookup("layer2", ["a"])
    assert full is not None and full.covered == 1 and np.array_equal(full.h, h * 2) and not full.h.flags.writeable
    with pytest.raises(ValueError):
        full.h += 1
    assert hc.lookup("layer2", ["a"]).h is full.h and hc.hits == 2
    assert hc.lookup("layer2", ["a", "b"], prefix=False) is None
    assert hc.lookup("layer2", ["b"]) is None  # not a prefix
    # over a prefix of them: taken out of the cache, writable (the caller adds the rest and stores the whole)
    got = hc.lookup("layer2", ["a", "b"])
    assert got is not None and got.covered == 1 and got.rows == 10 and np.array_equal(got.h, h * 2)
    assert got.h.flags.writeable and len(hc) == 1 and hc.lookup("layer2", ["a"]) is None
    got.h += 1
    hc.store("layer2", ["a", "b"], got.h, 20)
    assert len(hc) == 2 and np.array_equal(hc.lookup("layer2", ["a", "b"]).h, h * 2 + 1)
    hc.store("big", ["a"], np.ones((1, 512, 512)), 1)  # 2 MiB > cap: not kept, nothing evicted
    assert len(hc) == 2
    # the pass hands its own arrays over (no second copy while it still holds them): kept read-only
    own = np.full((1, 128, 128), 3.0)
    hc.store("owned", ["a"], own, 5)
    assert not own.flags.writeable
    with pytest.raises(ValueError):
        own += 1
    got = hc.lookup("owned", ["a"])
    assert got is not None and got.h is own


def test_a_folder_source_reads_its_files_once_for_its_ids(tmp_path, monkeypatch) -> None:
    """The calibrate and gptq passes of one compile both key their caches on the samples' ids: one digest per
    file per source; a new source (the next compile) reads them again, so a file changed since is seen."""
    from qcompiler.calib import CalibrationSource, input_signatures, sources
    from qcompiler.ir import import_graph

    calib = folder(tmp_path, 3)
    graph, _meta = import_graph(chain_model())
    read: list[str] = []
    real = sources.file_digest
    monkeypatch.setattr(sources, "file_digest", lambda p: read.append(p.name) or real(p))
    src = CalibrationSource.from_arg(str(calib), input_signatures(graph))
    first = src.sample_ids()
    assert src.sample_ids() == first and src.take(2).sample_ids() == first[:2]
    assert read == ["000.npz", "001.npz", "002.npz"]
    shutil.copy(calib / "000.npz", calib / "002.npz")
    again = CalibrationSource.from_arg(str(calib), input_signatures(graph)).sample_ids()
    assert len(read) == 6 and again[:2] == first[:2] and again[2] != first[2]


@pytest.mark.parametrize("plan_name", ["w8a8", "auto"])
def test_guard_and_measured_default_share_gptq_work_and_write_the_uncached_bytes(tmp_path, plan_name) -> None:
    """``--preset w8a8`` (the guard: as written and without percentile on the fit samples, then the final
    compile on all) and the measured default on a fixture (candidates on the fit samples, the confirmation and
    the final compile on all): the caches serve the guard's second compile and the final compile after a
    confirmation — and the file is the one written without them. The held-back samples are spread over the data
    (every k-th) and GPTQ sums them last, so the compile on all N continues the fit samples' Hessians (partial
    hits)."""
    root = Path(__file__).resolve().parents[1] / "models"
    model, calib = root / "conv_bn_relu.onnx", root / "conv_bn_relu.npz"

    def run(tag: str) -> bytes:
        out = tmp_path / f"{tag}.onnx"
        compile_model(model, out, CompileOptions(plan=plan_name, calib=str(calib), validate=False))
        return out.read_bytes()

    cached = run("cached")
    hc, sc = _gptq_cache.hessian_cache(), _gptq_cache.sweep_cache()
    assert hc.misses > 0 and hc.partial_hits > 0  # all N continued the fit samples' H
    assert sc.hits > 0  # w8a8: "without percentile" (GPTQ's very inputs); auto: the final compile after the confirmation
    _gptq_cache.reset_caches(0, 0)
    assert run("off") == cached
