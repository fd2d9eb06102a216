"""Never lose a user's file (issue 16): the output-path policy of every command that writes
(:class:`qcompiler.ir.OutputSet`).

Every path a command may write is resolved (symlinks, ``..``, hard links) and refused — exit 2, one line
``error: PATH: ... would overwrite the input WHAT 'INPUT'`` — when it is an input file or an external-data file
of an input model (small tensors included), before any work starts; a blocked or unwritable output is refused
up front too; and all outputs of a run are moved into place together, a failed move rolling back the ones
already moved. Each test checks the exit code, the message's key parts, and that every file is byte-identical
afterwards (no output, no staging folder left behind).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result

from qcompiler import compile as compile_mod
from qcompiler import ir
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.report.validate.files import load_names

MODELS = Path(__file__).resolve().parent.parent.parent / "models"
GEMM = MODELS / "gemm_head.onnx"
GEMM_NPZ = MODELS / "gemm_head.npz"


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: sha256 of files, 'dir' for folders, 'link:TARGET' for symlinks."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(res: Result, *parts: str) -> str:
    """Exit 2, exactly one line on stderr, starting 'error: ' and holding every part; no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding a copy of the gemm_head model (m.onnx), its calibration data (calib.npz) and a plan."""
    shutil.copy(GEMM, tmp_path / "m.onnx")
    shutil.copy(GEMM_NPZ, tmp_path / "calib.npz")
    (tmp_path / "plan.yaml").write_text("version: 1\ndefaults:\n  weight: {dtype: int8, granularity: per_channel}\n",
                                        encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled gemm_head (q.onnx) beside copies of its float model (f.onnx) and data (d.npz)."""
    d = tmp_path_factory.mktemp("compiled")
    shutil.copy(GEMM, d / "f.onnx")
    shutil.copy(GEMM_NPZ, d / "d.npz")
    res = run("compile", d / "f.onnx", "-o", d / "q.onnx", "--calib", d / "d.npz", "-q")
    assert res.exit_code == 0, res.output
    return d


# ------------------------------------------------------------------------------------ compile --report
@pytest.mark.parametrize("victim,what", [("m.onnx", "model"), ("calib.npz", "calibration data"),
                                         ("plan.yaml", "plan")])
def test_compile_report_may_not_overwrite_an_input(work: Path, victim: str, what: str) -> None:
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "out" / "q.onnx", "--calib", work / "calib.npz",
              "--plan", work / "plan.yaml", "--report", work / victim)
    refused(res, f"{work / victim}: --report would overwrite the input {what} '{work / victim}'")
    assert tree(work) == before  # nothing written, no output folder, no staging leftovers


@pytest.mark.parametrize("name,role", [("q.onnx", "output"), ("q.plan.yaml", "the resolved-plan side file"),
                                       ("q.onnx.data", "the output's external data")])
def test_compile_report_may_not_be_one_of_the_outputs(work: Path, name: str, role: str) -> None:
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "q.onnx", "--calib", "random",
              "--report", work / name)
    refused(res, f"{work / name}: --report and {role} would both write this path")
    assert tree(work) == before


def test_compile_report_through_a_symlink_or_hard_link_to_an_input(work: Path) -> None:
    (work / "link.json").symlink_to(work / "m.onnx")
    os.link(work / "calib.npz", work / "hard.json")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "q.onnx", "--calib", work / "calib.npz",
              "--report", work / "link.json")
    refused(res, "link.json: --report would overwrite the input model")
    res = run("compile", work / "m.onnx", "-o", work / "q.onnx", "--calib", work / "calib.npz",
              "--report", work / "hard.json")
    refused(res, "hard.json: --report would overwrite the input calibration data")
    res = run("compile", work / "m.onnx", "-o", work / "sub" / ".." / "m.onnx", "--calib", "random")
    refused(res, "output would overwrite the input model")
    assert tree(work) == before


# ------------------------------------------------------------------------------------------ validate --json
@pytest.mark.parametrize("victim,what", [("f.onnx", "float model"), ("q.onnx", "quantized model"),
                                         ("d.npz", "validation data")])
def test_validate_json_may_not_overwrite_an_input(compiled: Path, victim: str, what: str) -> None:
    before = tree(compiled)
    res = run("validate", compiled / "f.onnx", compiled / "q.onnx", "--data", compiled / "d.npz",
              "--json", compiled / victim)
    refused(res, f"{compiled / victim}: --json would overwrite the input {what}")
    assert res.stdout == ""  # refused before anything ran
    assert tree(compiled) == before


def test_validate_json_may_not_overwrite_the_names_file(compiled: Path, tmp_path: Path) -> None:
    names = tmp_path / "q.names.json"
    names.write_text("{}", encoding="utf-8")
    res = run("validate", compiled / "f.onnx", compiled / "q.onnx", "--data", compiled / "d.npz",
              "--names", names, "--json", names)
    refused(res, "--json would overwrite the input names file")
    assert names.read_text(encoding="utf-8") == "{}"


def test_validate_json_is_written(compiled: Path, tmp_path: Path) -> None:
    res = run("validate", compiled / "f.onnx", compiled / "q.onnx", "--data", compiled / "d.npz",
              "--json", tmp_path / "new" / "v.json")
    assert res.exit_code == 0, res.output
    assert '"outputs"' in (tmp_path / "new" / "v.json").read_text(encoding="utf-8")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["v.json"]


# ------------------------------------------------------------------------------------------- plan resolve
@pytest.mark.parametrize("victim,what", [("m.onnx", "model"), ("plan.yaml", "plan")])
def test_plan_resolve_output_may_not_overwrite_an_input(work: Path, victim: str, what: str) -> None:
    before = tree(work)
    res = run("plan", "resolve", work / "m.onnx", work / "plan.yaml", "-o", work / victim)
    refused(res, f"{work / victim}: -o would overwrite the input {what}")
    assert tree(work) == before


def test_plan_resolve_output_is_written(work: Path) -> None:
    printed = run("plan", "resolve", work / "m.onnx", work / "plan.yaml")
    res = run("plan", "resolve", work / "m.onnx", work / "plan.yaml", "-o", work / "r.yaml")
    assert printed.exit_code == 0 and res.exit_code == 0, res.output
    assert (work / "r.yaml").read_text(encoding="utf-8") == printed.stdout
    assert res.stdout == f"wrote {work / 'r.yaml'}\n"


# -------------------------------------------------------------------------------------------- side files
def test_compile_side_file_may_not_replace_the_users_plan(work: Path) -> None:
    (work / "plan.yaml").rename(work / "o.plan.yaml")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "o.onnx", "--plan", work / "o.plan.yaml", "--calib", "random")
    refused(res, f"{work / 'o.plan.yaml'}: the resolved-plan side file would overwrite the input plan")
    assert tree(work) == before


def test_compile_dotdot_output_may_not_replace_small_external_data(work: Path) -> None:
    """The model's (small, < 64 KiB) external tensors live in o.plan.yaml; -o ./sub/../o.onnx would write the
    resolved plan over them. The guard used to list only tensors >= 64 KiB."""
    m = onnx.load(str(GEMM))
    folder = work / "ext"
    folder.mkdir()
    onnx.save_model(m, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="o.plan.yaml", size_threshold=0)
    assert ir.external_files(ir.load_model(folder / "m.onnx")) == set()  # all small: read at load
    before = tree(work)
    res = run("compile", folder / "m.onnx", "-o", folder / "sub" / ".." / "o.onnx", "--calib", "random")
    refused(res, "o.plan.yaml", "would overwrite 'o.plan.yaml', external data of the input model")
    assert tree(work) == before
    assert ir.external_data_files(folder / "m.onnx") == {(folder / "o.plan.yaml").resolve()}


def test_compile_dotdot_output_is_written_where_it_resolves(work: Path) -> None:
    res = run("compile", work / "m.onnx", "-o", work / "sub" / ".." / "o.onnx", "--calib", "random", "-q")
    assert res.exit_code == 0, res.output
    assert (work / "o.onnx").is_file() and (work / "o.plan.yaml").is_file()
    assert not (work / "sub").exists()  # the folder '..' climbs out of is not created
    assert not [p for p in work.iterdir() if p.name.startswith(".qcompiler-")]


# ---------------------------------------------------------------------------------- blocked / unwritable
def test_directory_in_the_way_of_a_side_file_is_refused_up_front(work: Path) -> None:
    (work / "a").mkdir()
    (work / "a" / "o.plan.yaml").mkdir()
    (work / "a" / "o.onnx").write_bytes(b"previous build")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "a" / "o.onnx", "--calib", "random")
    refused(res, f"{work / 'a' / 'o.plan.yaml'}: is a directory, in the way of the resolved-plan side file")
    assert tree(work) == before  # a/o.onnx is the previous build, not a new model without its side file


def test_unwritable_report_is_refused_before_any_work(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(compile_mod.Session, "load", no_work)
    (work / "file.txt").write_text("x", encoding="utf-8")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "new" / "o.onnx", "--calib", "random",
              "--report", work / "file.txt" / "r.json")
    refused(res, f"{work / 'file.txt' / 'r.json'}: cannot write here: '{work / 'file.txt'}' is not a folder")
    res = run("compile", work / "m.onnx", "-o", work / "new" / "o.onnx", "--calib", "random",
              "--report", "/proc/qcompiler-report.json")
    refused(res, "/proc/qcompiler-report.json: cannot write the --report here")
    assert tree(work) == before  # no 'new' folder left behind


def test_dump_folder_is_checked_up_front(work: Path) -> None:
    (work / "o.dump").write_text("not a folder", encoding="utf-8")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "o.onnx", "--calib", "random", "--dump-after", "all")
    refused(res, f"{work / 'o.dump'}: is a file, in the way of the --dump-after folder")
    assert tree(work) == before
    (work / "o.dump").unlink()
    (work / "o.dump").mkdir()
    shutil.copy(GEMM_NPZ, work / "o.dump" / "calib.npz")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "o.onnx", "--calib", work / "o.dump" / "calib.npz",
              "--dump-after", "all")
    refused(res, "--dump-after folder would overwrite the input calibration data")
    assert tree(work) == before


def test_output_into_the_calibration_folder(work: Path) -> None:
    (work / "cal").mkdir()
    x = np.load(GEMM_NPZ)
    np.savez(work / "cal" / "s0.npz", **{k: x[k][0] for k in x.files})
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "q.onnx", "--calib", work / "cal",
              "--report", work / "cal" / "extra.npz")
    refused(res, "--report would overwrite the input calibration data")
    assert tree(work) == before


# ------------------------------------------------------------------------------------- commit / rollback
def test_a_failed_move_rolls_back_the_outputs_already_moved(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder appears at the --report path while the compile runs (after the up-front checks): the side
    files already moved are put back as they were, the previous model stays, exit 2 with one line."""
    out = work / "o.onnx"
    out.write_bytes(b"previous model")
    (work / "o.plan.yaml").write_text("previous plan", encoding="utf-8")
    real = compile_mod.cost.compile_cost

    def compile_cost(*a: Any, **k: Any) -> Any:
        (work / "r.json").mkdir()
        return real(*a, **k)

    monkeypatch.setattr(compile_mod.cost, "compile_cost", compile_cost)
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", out, "--calib", "random", "--report", work / "r.json")
    refused(res, f"{work / 'r.json'}: cannot move the --report into place", "restored")
    after = tree(work)
    assert after == {**before, "r.json": "dir"}
    assert (work / "o.plan.yaml").read_text(encoding="utf-8") == "previous plan"


def test_output_set_rolls_back_every_moved_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b.txt").write_text("old b", encoding="utf-8")
    (tmp_path / "c.txt").write_text("old c", encoding="utf-8")
    before = tree(tmp_path)
    outs = ir.OutputSet()
    for name in ("a.txt", "b.txt", "c.txt"):
        outs.add_output(tmp_path / name, name)
    real = os.replace
    calls: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == "c.txt" and Path(src).parent.name.startswith(".qcompiler-"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    with outs:
        for name in ("a.txt", "b.txt", "c.txt"):
            outs.path(tmp_path / name).write_text("new " + name, encoding="utf-8")
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(UserError, match=r"c\.txt: cannot move the c\.txt into place: No space left on device"):
            outs.commit()
    monkeypatch.setattr(os, "replace", real)
    assert calls[:3] == ["a.txt", "b.txt", "c.txt"]
    assert tree(tmp_path) == before  # a.txt removed again, b.txt restored, no staging folder


def test_rerun_overwrites_its_own_outputs_identically(work: Path) -> None:
    args = ["compile", work / "m.onnx", "-o", work / "o.onnx", "--calib", work / "calib.npz", "-q"]
    assert run(*args).exit_code == 0
    first = tree(work)
    assert run(*args).exit_code == 0
    assert tree(work) == first



def test_stale_names_side_file_replaced_only_by_a_successful_compile(work: Path) -> None:
    """A file at OUT.names.json that no command reads (a stale side file of an earlier compile) is an output,
    not an input: a --compact-names compile replaces it with its map; a refused compile leaves it as it was.
    (The fuzz case output-path/alias-side-names held this to "input unchanged" before; the oracle is fixed.)"""
    stale = work / "o.names.json"
    stale.write_text("{}", encoding="utf-8")
    (work / "bad.yaml").write_text("version: 7\n", encoding="utf-8")
    before = tree(work)
    res = run("compile", work / "m.onnx", "-o", work / "o.onnx", "--calib", work / "calib.npz", "--compact-names",
              "--plan", work / "bad.yaml")
    refused(res, "bad.yaml", "unsupported plan version")
    assert tree(work) == before
    res = run("compile", work / "m.onnx", "-o", work / "o.onnx", "--calib", work / "calib.npz", "--compact-names",
              "-q")
    assert res.exit_code == 0, res.output
    names = load_names(stale)
    assert names and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())

# ------------------------------------------------------------------------------ package, plan auto, schema
def test_package_zip_may_not_overwrite_an_input(work: Path) -> None:
    shutil.copy(GEMM_NPZ, work / "b.zip")
    before = tree(work)
    res = run("package", work / "m.onnx", "-o", work / "b", "--calib", work / "b.zip", "--zip")
    refused(res, f"{work / 'b.zip'}: --zip would overwrite the input calibration data")
    assert tree(work) == before


def test_package_bundle_and_zip_are_written_together(work: Path) -> None:
    res = run("package", work / "m.onnx", "-o", work / "b", "--calib", work / "calib.npz", "--zip", "-q")
    assert res.exit_code == 0, res.output
    assert (work / "b" / "manifest.json").is_file() and (work / "b.zip").is_file()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]
    before = tree(work)
    res = run("package", work / "m.onnx", "-o", work / "c", "--calib", work / "calib.npz", "--zip")
    assert res.exit_code == 0
    shutil.rmtree(work / "c")
    (work / "c.zip").unlink()
    (work / "c.zip").mkdir()  # in the way of the zip: refused up front, no bundle folder either
    res = run("package", work / "m.onnx", "-o", work / "c", "--calib", work / "calib.npz", "--zip")
    refused(res, f"{work / 'c.zip'}: already exists")
    assert tree(work) == {**before, "c.zip": "dir"}


@pytest.mark.parametrize("flag,victim,what", [("-o", "m.onnx", "model"), ("-o", "plan.yaml", "plan"),
                                              ("--pareto", "calib.npz", None)])
def test_plan_auto_outputs_may_not_overwrite_an_input(work: Path, flag: str, victim: str, what: str | None) -> None:
    before = tree(work)
    res = run("plan", "auto", work / "m.onnx", "--budget", "50%", "--calib", work / "calib.npz",
              "--plan", work / "plan.yaml", "--measure", "0", flag, work / victim)
    if what is None:  # --pareto must end in .csv: a .npz is refused before it could be written
        refused(res, "must end in .csv")
    else:
        refused(res, f"{work / victim}: -o would overwrite the input {what}")
    assert tree(work) == before


def test_plan_auto_pareto_plot_may_not_overwrite_an_input(work: Path) -> None:
    (work / "plan.yaml").rename(work / "front.svg")
    before = tree(work)
    res = run("plan", "auto", work / "m.onnx", "--budget", "50%", "--calib", work / "calib.npz",
              "--plan", work / "front.svg", "--measure", "0", "--pareto", work / "front.csv")
    refused(res, f"{work / 'front.svg'}: --pareto plot would overwrite the input plan")
    assert tree(work) == before


def test_plan_schema_output_checked_and_atomic(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x", encoding="utf-8")
    res = run("plan-schema", "-o", tmp_path / "f" / "schema.json")
    refused(res, "is not a folder")
    res = run("plan-schema", "-o", tmp_path / "s" / "schema.json")
    assert res.exit_code == 0 and (tmp_path / "s" / "schema.json").read_text(encoding="utf-8").startswith("{")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["schema.json"]
