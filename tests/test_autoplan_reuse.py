"""Issue 14 ("it must stay cheap"): what the planner's searches repeat is done once per run — probe compiles shared
by the searches (:class:`qcompiler.autoplan.probes.ProbeMemo`), the float model run once on the held-back
samples and the quantized model once per measured plan (:func:`qcompiler.autoplan.probes.held_scores`), rule
YAML written once (``plans._flow``) — with the same numbers and the same plan text as without."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from qcompiler import autoplan
from qcompiler.api import CompileOptions, compile_model
from qcompiler.autoplan import Budget, parse_candidates, plans, probes
from qcompiler.report import validate as qv

MODELS = Path(__file__).resolve().parents[1] / "models"
CONV = MODELS / "conv_bn_relu.onnx"
CONV_DATA = MODELS / "conv_bn_relu.npz"

pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _feeds(n: int, offset: int = 0) -> list[dict[str, np.ndarray]]:
    with np.load(CONV_DATA) as z:
        return [{k: z[k][offset + i] for k in z.files} for i in range(n)]


def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def wrapped(*a: object, **kw: object) -> object:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("workers", [None, 64])
def test_held_scores_are_validates_numbers_with_one_float_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             workers: int | None) -> None:
    """The worst-slice SQNR on all held-back samples and on each half equals `validate` on those samples, bit for
    bit; the float model runs once for two plans. With more validation runs side by side than samples
    (``workers=64``), each part is validated as before (same numbers)."""
    if workers is not None:
        monkeypatch.setattr(probes, "validation_workers", lambda: workers)
    feeds = _feeds(8)
    outs = []
    for k, plan in enumerate(("default", "w4a8")):
        out = tmp_path / f"q{k}.onnx"
        compile_model(CONV, out, CompileOptions(plan=plan, calib=str(CONV_DATA), validate=False))
        outs.append(out)
    refs: dict[str, qv.Reference] = {}
    float_runs = _counting(monkeypatch, probes, "float_reference")
    for out in outs:
        whole, halves, _ = probes.held_scores(CONV, out, feeds, refs)
        assert whole == qv.validate(CONV, out, feeds, per_layer=False).worst_slice_sqnr()
        assert halves == tuple(qv.validate(CONV, out, part, per_layer=False).worst_slice_sqnr()
                               for part in (feeds[0::2], feeds[1::2]))
        assert len(halves) == 2 and np.isfinite(whole)
    assert len(float_runs) == (1 if workers is None else 0)
    # fewer than 4 samples: no halves
    assert probes.held_scores(CONV, outs[0], feeds[:3], {})[1] == ()


def test_compare_outputs_is_validate_against(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    compile_model(CONV, out, CompileOptions(plan="default", calib=str(CONV_DATA), validate=False))
    ref = qv.float_reference(CONV, _feeds(6))
    kept: list[dict[str, np.ndarray]] = []
    a = qv.validate_against(ref, out, keep=kept)
    b = qv.compare_outputs(ref, kept, label=str(out))
    assert a.to_json() == b.to_json() and len(kept) == 6


def _search(memo: probes.ProbeMemo | None) -> autoplan.AutoPlanResult:
    opts = autoplan.PlanOptions(budget=Budget.parse("40%"), candidates=parse_candidates("fp32,int8,int4"))
    return autoplan.search_plan(CONV, CONV_DATA, opts, memo=memo)


def test_searches_sharing_a_memo_compile_each_probe_once_with_the_same_plan(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    """A second search of the same model, base plan and data with the first one's memo compiles nothing (its
    probes and its verification were compiled by the first); its cost tables, plan text and verified bytes
    are those of a search without the memo."""
    alone = _search(None)
    compiles = _counting(monkeypatch, probes, "compile_plan")
    memo = probes.ProbeMemo()
    first = _search(memo)
    n_first = len(compiles)
    assert n_first >= 3  # float probe, int8 and int4 probes (and the verification)
    second = _search(memo)
    assert len(compiles) == n_first and memo.hits >= n_first
    for r in (first, second):
        assert r.text == alone.text and r.verified == alone.verified
        for unit in ("bytes", "bitops", "bits"):
            np.testing.assert_array_equal(r.cost_table[unit], alone.cost_table[unit])
        assert [la.macs for la in r.layers] == [la.macs for la in alone.layers]


def test_probe_memo_keys_on_the_calibration_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe of the same plan text on another calibration sample (or other shapes) is compiled again."""
    compiles = _counting(monkeypatch, probes, "compile_plan")
    memo = probes.ProbeMemo()
    text = yaml.safe_dump({"version": 1})
    shapes = {k: list(v.shape) for k, v in _feeds(1)[0].items()}
    works = [probes.ProbeWorkdir(f, memo) for f in (_feeds(1)[0], _feeds(1)[0], _feeds(1, offset=1)[0])]
    try:
        for w in works:
            w.compile_text(CONV, text, "ort", shapes=shapes, want_shapes=False)
        assert len(compiles) == 2 and memo.hits == 1
        works[0].compile_text(CONV, text, "ort", shapes=shapes, want_shapes=True)
        assert len(compiles) == 3
    finally:
        for w in works:
            w.close()


@pytest.mark.parametrize("d", [
    {"match": {"name": "conv1"}, "skip": True},
    {"match": {"name": "conv1"}, "skip": "True"},
    {"match": {"name": "conv1"}, "weight": {"dtype": "int4", "granularity": "block", "block_size": 32,
                                            "symmetric": True, "scale_dtype": None}},
    {"weight": {"dtype": "int8", "symmetric": 1}},
    {"weight": {"dtype": "int8", "symmetric": 1.0, "x": [1, 2.5, "a"], "y": -0.0}},
])
def test_rule_yaml_is_safe_dump_whatever_was_written_before(d: dict[str, object]) -> None:
    """``plans._flow`` keeps its texts by the repr of what was dumped: a bool, its string, an int and a float of
    the same value each get their own YAML, called in any order."""
    for _ in range(2):
        assert plans._flow(d) == yaml.safe_dump(d, default_flow_style=True, width=100000, sort_keys=False).strip()
