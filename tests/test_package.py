"""Deployment bundles (issue 6): ``qcompiler package`` then ``qcompiler verify`` — contents of the manifest, the
validation report (JSON + self-contained HTML with the per-layer SQNR chart), the SQNR gate (no bundle below it),
and verify detecting a modified, missing or unexpected file, a doctored record and a hostile zip.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from qcompiler import __version__
from qcompiler.cli import cli
from qcompiler.cli.commands import package as package_cmd_mod
from qcompiler.core import digest
from qcompiler.core.numbers import c_contiguous
from qcompiler.report.bundle import verify_bundle
from qcompiler.report.html import CHART_LAYERS
from qcompiler.runtime_targets import DEFAULT_PIPELINE

MODELS = Path(__file__).resolve().parent.parent / "models"
TB = MODELS / "transformer_block.onnx"
TB_NPZ = MODELS / "transformer_block.npz"


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    res = run("package", TB, "-o", root / "bundle", "--calib", TB_NPZ, "--calib-samples", "16", "--min-sqnr", "15",
              "--zip", "--plan", "w4a16")
    assert res.exit_code == 0, res.stderr
    assert "validation: worst output SQNR" in res.stdout and "(gate 15 dB: PASS)" in res.stdout
    return root / "bundle"


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def test_bundle_contents_and_manifest(bundle: Path) -> None:
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert files == ["check/feeds.npz", "check/reference.npz", "manifest.json", "model.onnx", "model.plan.yaml",
                     "validation.html", "validation.json"]
    m = json.loads((bundle / "manifest.json").read_text())
    for rel, meta in m["files"].items():
        data = (bundle / rel).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert set(m["files"]) == set(files) - {"manifest.json"}
    assert m["versions"] == {"qcompiler": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    assert m["target"] == "ort"
    assert m["pipeline"] == DEFAULT_PIPELINE
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 16, 64]}]
    assert m["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 16, 64]}]
    q = onnx.load(str(bundle / "model.onnx"))
    assert m["opset_imports"] == {imp.domain or "ai.onnx": imp.version for imp in q.opset_import}
    assert m["custom_op_domains"] == ["com.microsoft"]  # MatMulNBits
    assert any(n.op_type == "MatMulNBits" for n in q.graph.node)
    v = json.loads((bundle / "validation.json").read_text())
    assert m["validation"]["worst_output_sqnr_db"] == v["worst_output_sqnr_db"] >= 15
    assert m["validation"]["passed"] is True and m["validation"]["min_sqnr_db"] == 15
    assert m["check"]["samples"] == 4 and m["check"]["sqnr_db"]["y"] >= 15
    assert (bundle.parent / "bundle.zip").is_file()


def test_html_report_is_self_contained_with_one_bar_per_layer(bundle: Path) -> None:
    page = (bundle / "validation.html").read_text()
    v = json.loads((bundle / "validation.json").read_text())
    assert not re.search(r"(src|href)\s*=", page) and "<script" not in page
    svg = page[page.index("<svg"):page.index("</svg>")]
    shown = v["layers"][:CHART_LAYERS]
    assert len(shown) >= 10
    assert svg.count("<rect") == len(shown)
    # the bar labels are the report's SQNRs, in the report's (worst first) order
    labels = re.findall(r'<text x="[\d.]+" y="[\d.]+" fill="#222">([^<]+)</text>', svg)
    want = [f"{float(x['sqnr_db']):.2f}" if x["sqnr_db"] not in ("inf", "-inf", "nan") else x["sqnr_db"]
            for x in shown]
    assert labels == want
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg)]
    finite = [(float(x["sqnr_db"]), w) for x, w in zip(shown, widths) if x["sqnr_db"] not in ("inf", "nan")]
    assert all(a[1] <= b[1] + 1e-6 for a, b in itertools.pairwise(finite))  # longer bar = higher SQNR
    assert "gate 15 dB" in svg and "PASS" in page


def test_verify_passes_on_folder_and_zip(bundle: Path) -> None:
    res = run("verify", bundle)
    assert res.exit_code == 0, res.stderr
    assert "7 files match manifest.json" in res.stdout and "output 'y': SQNR" in res.stdout
    res = run("verify", bundle.parent / "bundle.zip")
    assert res.exit_code == 0, res.stderr
    full = verify_bundle(bundle, float_model=TB, data=TB_NPZ)
    assert full.full is not None and full.full.worst_output_sqnr() >= 15
    m = json.loads((bundle / "manifest.json").read_text())
    got, rec = full.check["y"]
    assert got == pytest.approx(rec, abs=1e-3) and rec == m["check"]["sqnr_db"]["y"]


@pytest.mark.parametrize("change,expected", [
    ("flip-model-byte", "model.onnx: sha256"),
    ("truncate-model", "model.onnx: size"),
    ("edit-plan", "model.plan.yaml: sha256"),
    ("edit-html", "validation.html: sha256"),
    ("delete-feeds", "check/feeds.npz: missing"),
    ("extra-file", "notes.txt: not listed"),
    ("manifest-not-json", "manifest.json: not valid JSON"),
    ("doctored-check-record", "SQNR on the check feeds"),
    ("raised-gate", "is below the bundle's --min-sqnr 90"),
])
def test_verify_detects_changes(bundle: Path, tmp_path: Path, change: str, expected: str) -> None:
    b = copy_of(bundle, tmp_path)
    man = b / "manifest.json"
    m = json.loads(man.read_text())
    if change == "flip-model-byte":
        data = bytearray((b / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0x01
        (b / "model.onnx").write_bytes(bytes(data))
    elif change == "truncate-model":
        (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-10])
    elif change == "edit-plan":
        (b / "model.plan.yaml").write_text((b / "model.plan.yaml").read_text().replace("int4", "int8", 1))
    elif change == "edit-html":
        (b / "validation.html").write_text((b / "validation.html").read_text().replace("PASS", "FAIL"))
    elif change == "delete-feeds":
        (b / "check" / "feeds.npz").unlink()
    elif change == "extra-file":
        (b / "notes.txt").write_text("hi")
    elif change == "manifest-not-json":
        man.write_text("{not json")
    elif change == "doctored-check-record":
        m["check"]["sqnr_db"]["y"] = float(m["check"]["sqnr_db"]["y"]) + 5.0
        man.write_text(json.dumps(m))
    else:
        m["validation"]["min_sqnr_db"] = 90
        man.write_text(json.dumps(m))
    res = run("verify", b)
    assert res.exit_code == 2, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_verify_refuses_a_zip_escaping_its_folder(tmp_path: Path) -> None:
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("bundle/manifest.json", "{}")
        zf.writestr("bundle/../../escaped.txt", "x")
    res = run("verify", z)
    assert res.exit_code == 2 and "escapes the bundle folder" in res.stderr
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_below_threshold_writes_no_bundle(tmp_path: Path) -> None:
    res = run("package", TB, "-o", tmp_path / "new" / "bundle", "--calib", TB_NPZ, "--calib-samples", "8",
              "--min-sqnr", "90", "--zip")
    assert res.exit_code == 2
    assert "below --min-sqnr 90" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # no bundle; the refused compile's report beside where it would have been, named in the error line
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["bundle.rejected.report.json"]
    assert str(tmp_path / "new" / "bundle.rejected.report.json") in res.stderr


def test_package_refuses_existing_bundle_and_synthetic_data(bundle: Path, tmp_path: Path) -> None:
    res = run("package", TB, "-o", bundle, "--calib", TB_NPZ)
    assert res.exit_code == 2 and "already exists" in res.stderr
    res = run("package", TB, "-o", tmp_path / "b", "--calib", "random")
    assert res.exit_code == 2 and "needs real calibration data" in res.stderr
    assert not (tmp_path / "b").exists()


def test_check_feeds_reproduce_the_float_reference(bundle: Path) -> None:
    """The stored reference outputs are the float model's outputs on the stored feeds."""
    import onnxruntime as ort

    with np.load(bundle / "check" / "feeds.npz", allow_pickle=False) as f, \
            np.load(bundle / "check" / "reference.npz", allow_pickle=False) as r:
        assert sorted(f.files) == [f"x/{i:04d}" for i in range(4)]
        sess = ort.InferenceSession(str(TB), providers=["CPUExecutionProvider"])
        for i in range(4):
            y = sess.run(None, {"x": f[f"x/{i:04d}"]})[0]
            assert np.allclose(y, r[f"y/{i:04d}"], rtol=1e-5, atol=1e-6)
            assert math.isfinite(float(np.abs(y).max()))


def test_compact_names_bundle(tmp_path: Path, bundle: Path) -> None:
    """`package --compact-names`: a smaller model.onnx, model.names.json bundled and hashed, the same check SQNRs
    as the plain bundle, and verify's full validation reports layers by their original names."""
    res = run("package", TB, "-o", tmp_path / "b", "--calib", TB_NPZ, "--calib-samples", "16", "--plan", "w4a16",
              "--compact-names", "-q")
    assert res.exit_code == 0, res.stderr
    b = tmp_path / "b"
    m = json.loads((b / "manifest.json").read_text())
    assert "model.names.json" in m["files"]
    assert (b / "model.onnx").stat().st_size < (bundle / "model.onnx").stat().st_size
    plain = json.loads((bundle / "manifest.json").read_text())
    assert m["check"]["sqnr_db"] == plain["check"]["sqnr_db"]
    full = verify_bundle(b, float_model=TB, data=TB_NPZ)
    assert full.full is not None
    originals = set(json.loads((b / "model.names.json").read_text())["tensors"].values())
    assert full.full.layers and all(la.name in originals for la in full.full.layers)
    assert {la.name for la in full.full.layers} == {
        la.name for la in verify_bundle(bundle, float_model=TB, data=TB_NPZ).full.layers}  # type: ignore[union-attr]


def test_package_gives_back_what_it_froze_out_of_the_collector(tmp_path: Path, monkeypatch) -> None:
    """``package`` compiles with the imported modules out of the garbage collector's reach, as ``compile`` does,
    and leaves the collector as it found it."""
    frozen: list[int] = []
    real = package_cmd_mod.build_bundle

    def spy(*args: object, **kwargs: object) -> object:
        frozen.append(gc.get_freeze_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(package_cmd_mod, "build_bundle", spy)
    before = gc.get_freeze_count()
    res = run("package", TB, "-o", tmp_path / "b", "--calib", TB_NPZ, "--calib-samples", "4", "--plan", "default")
    assert res.exit_code == 0, res.output
    assert frozen and frozen[0] > before
    assert gc.get_freeze_count() == before


def test_scalar_inputs_and_non_tensor_outputs_round_trip_through_the_check_data(tmp_path: Path) -> None:
    """The check feeds of a 0-d input were written 1-d (``np.ascontiguousarray`` makes a 0-d array 1-d), so
    ``verify`` fed onnxruntime the wrong rank (ONNX's Einsum ``"->"`` case); and a ZipMap's ``seq(map)`` output
    broke the check's SQNR (onnxruntime's ``logreg_iris.onnx``). Both bundles now build and verify."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Mul", ["v", "s"], ["vs"], name="scale"),
                           helper.make_node("MatMul", ["vs", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    model = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), model)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", v=rng.standard_normal((8, 2, 4)).astype(np.float32),
             s=rng.uniform(0.5, 2.0, 8).astype(np.float32))
    res = CliRunner().invoke(cli, ["package", str(model), "--calib", str(tmp_path / "c.npz"), "--plan", "default",
                                   "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "b" / "check" / "feeds.npz") as z:
        assert all(z[k].shape == () for k in z.files if k.startswith("s/")) and z["v/0000"].shape == (2, 4)
    assert math.isfinite(verify_bundle(tmp_path / "b").check["y"][0])

    iris = Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"
    np.savez(tmp_path / "iris.npz", float_input=rng.uniform(0, 8, (8, 3, 2)).astype(np.float32))
    res = CliRunner().invoke(cli, ["package", str(iris), "--calib", str(tmp_path / "iris.npz"), "-o",
                                   str(tmp_path / "bi")])
    assert res.exit_code == 0, res.output
    assert verify_bundle(tmp_path / "bi").check == {"label": (math.inf, math.inf)}


def test_c_contiguous_keeps_0d_arrays_0d_for_writers_and_digests() -> None:
    """One helper for the three places that wrote / hashed through ``np.ascontiguousarray`` (which returns at least
    1-d): bundle check data, ``qcompiler data``'s .npz writer and array digests (cache keys)."""
    zero_d, one_d = np.array(2.5, np.float32), np.array([2.5], np.float32)
    assert c_contiguous(zero_d).shape == () and c_contiguous(zero_d.reshape(1)[::1]).shape == (1,)
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert c_contiguous(strided).flags.c_contiguous and np.array_equal(c_contiguous(strided), strided)

    def key(a: np.ndarray) -> str:
        h = digest.hasher()
        digest.update_array(h, a)
        return str(h.hexdigest())

    assert key(zero_d) != key(one_d) and key(strided) == key(np.ascontiguousarray(strided))
