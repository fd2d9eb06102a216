"""Output paths: the one policy every command that writes follows (:class:`OutputSet`).

A command declares its inputs (the model — with every external-data file it references, small tensors
included —, the plan, calibration / validation data, a names file, plugin files) and every path it may write.
Then, **before any work starts** (:meth:`OutputSet.prepare`, or entering the ``with`` block):

* every output path is resolved (symlinks, ``..``) and refused when it is, or aliases (a symlink, a hard link,
  a ``..`` detour), an input file or an external-data file of an input model, lies inside an input folder as an
  existing file or a new ``.npz`` (it would change the data set), or is named by two outputs at once;
* every output's place is checked: a folder in the way of a file (or a file in the way of a folder), a parent
  that is a file, an output that must be new but exists, or a folder that cannot be written (a staging folder is
  created beside each destination: that proves it writable) is refused.

The command writes each output at its staging path (:meth:`OutputSet.path`); :meth:`OutputSet.commit` moves
them all into place, and when one move fails, the ones already moved are rolled back (what was there before is
restored), so a run writes all of its outputs or none. Every refusal is a :class:`UserError` with one line
naming the path (CLI exit 2), and the staging folders (and output folders created for the run) are removed
whatever happens.

Folders written as the run goes (``--dump-after``: diagnostics, kept when a later pass fails) are declared
``in_place``: checked like the rest, not staged.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import onnx

from qcompiler.core.errors import UserError
from qcompiler.ir.facts import _external_info
from qcompiler.ir.load import PROTOBUF_LIMIT
from qcompiler.ir.walk import _external_tensors

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def resolve_path(path: PathLike) -> Path:
    """``path`` absolute, with every symlink and ``..`` resolved (also below a folder that does not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def external_data_files(model_path: PathLike) -> set[Path]:
    """Every file (resolved) the external tensors of the model at ``model_path`` live in — all of them, whatever
    their size. Locations the loader would refuse (absolute, ``..``, leading outside the folder) and files that
    do not exist are left out: nothing there is read, so nothing there is the model's. A file that cannot be
    parsed gives an empty set (the loader reports it)."""
    p = Path(model_path)
    try:
        size = p.stat().st_size if p.is_file() else 0
        if size == 0 or size > PROTOBUF_LIMIT:
            return set()
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm.find(b"location") < 0:  # no external data entry anywhere: no need to parse the model
                return set()
            model = onnx.ModelProto()
            model.ParseFromString(mm[:])
    except Exception:  # not a model: load_model says so, with the reason
        return set()
    base = resolve_path(p.parent)
    out = set()
    for t in _external_tensors(model):
        loc = _external_info(t).get("location", "")
        if not loc or os.path.isabs(loc) or ".." in Path(loc.replace("\\", "/")).parts:
            continue
        try:
            full = resolve_path(base / loc)
            if (full == base or base in full.parents) and full.is_file():
                out.add(full)
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte: the loader says so
            continue
    return out


@dataclass
class _Output:
    shown: Path  # as the user gave it (messages, "wrote ...")
    dest: Path  # where it is placed: resolved parent / name (a symlink at the name itself is replaced)
    target: Path  # fully resolved: what writing there would alias
    role: str
    directory: bool
    in_place: bool
    new: bool
    primary: bool


@dataclass
class _Input:
    shown: Path
    resolved: Path
    what: str
    model: bool


def _stat_key(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(p: Path, folder: Path) -> bool:
    return folder in p.parents


def _the(role: str) -> str:
    return role if role.startswith("the ") else f"the {role}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputSet:
    """Every input a command reads and every path it writes: checked up front, staged, committed together."""

    def __init__(self) -> None:
        self._inputs: list[_Input] = []
        self._outputs: list[_Output] = []
        self._externals: dict[Path, set[Path]] = {}  # model (resolved) -> its external-data files
        self._stages: dict[Path, Path] = {}  # resolved parent folder -> staging folder in it
        self._created: list[Path] = []  # output folders made for this run (removed unless committed)
        self._prepared = False
        self._committed = False

    # ------------------------------------------------------------------------------------------ declare
    def add_input(self, path: PathLike | None, what: str, *, model: bool = False) -> None:
        """An input file or folder (``what``: "model", "plan", "calibration data", ...). ``model``: the
        external-data files it references are inputs too. A path that does not exist holds nothing to lose (its
        reader reports it) and is skipped."""
        if path is None:
            return
        p = Path(path)
        if not p.exists():
            return
        self._inputs.append(_Input(p, resolve_path(p), what, model and p.is_file()))

    def add_output(self, path: PathLike, role: str, *, directory: bool = False, in_place: bool = False,
                   new: bool = False, primary: bool = False) -> Path:
        """Declare a path the run may write; ``role`` names it in messages ("output", "--report", "the
        resolved-plan side file"). ``directory``: a folder (staged whole unless ``in_place``); ``new``: it must
        not exist yet; ``primary``: moved into place last. Declared after :meth:`prepare`, it is checked (and
        its staging folder made) at once. Returns the resolved destination."""
        p = Path(path)
        dest = resolve_path(p.parent) / p.name
        o = _Output(p, dest, resolve_path(p), role, directory, in_place, new, primary)
        for other in self._outputs:
            if other.dest == dest or other.target == o.target:
                raise UserError(f"{p}: {role} and {other.role} would both write this path; nothing written")
        self._outputs.append(o)
        if self._prepared:
            self._check(o)
            self._stage_for(o)
        return dest

    def declared(self, path: PathLike) -> bool:
        dest = resolve_path(Path(path).parent) / Path(path).name
        return any(o.dest == dest for o in self._outputs)

    # ------------------------------------------------------------------------------------------ check
    def prepare(self) -> OutputSet:
        """Check every declared output against the inputs and its place, and create the staging folders.
        Raises :class:`UserError` (nothing left behind) on the first refusal."""
        if self._prepared:
            return self
        try:
            for o in self._outputs:
                self._check(o)
            for o in self._outputs:
                self._stage_for(o)
        except BaseException:
            self.cleanup()
            raise
        self._prepared = True
        return self

    def _model_externals(self, inp: _Input) -> set[Path]:
        if inp.resolved not in self._externals:
            self._externals[inp.resolved] = external_data_files(inp.shown)
        return self._externals[inp.resolved]

    def _check(self, o: _Output) -> None:
        self._check_aliasing(o)
        self._check_place(o)

    def _check_aliasing(self, o: _Output) -> None:
        exists = os.path.lexists(o.dest)
        key = _stat_key(o.dest) if exists else None
        for inp in self._inputs:
            same = o.target == inp.resolved or (key is not None and key == _stat_key(inp.resolved))
            if not same and inp.resolved.is_dir() and _inside(o.target, inp.resolved):
                # into an input folder: over one of its files, or a new .npz (it would join the data set)
                same = exists or o.target.suffix.lower() == ".npz"
            if not same and o.directory and _inside(inp.resolved, o.target):
                same = True  # the folder would be written over an input inside it
            if same:
                raise UserError(f"{o.shown}: {o.role} would overwrite the input {inp.what} '{inp.shown}'; "
                                "nothing written")
            if inp.model and exists and _inside(o.target, inp.resolved.parent):
                # only an existing file can be one of the model's data files: parse the model only then
                for f in sorted(self._model_externals(inp)):
                    if f == o.target or (key is not None and key == _stat_key(f)):
                        raise UserError(f"{o.shown}: {o.role} would overwrite '{f.name}', external data of the "
                                        f"input {inp.what} '{inp.shown}'; nothing written")

    def _check_place(self, o: _Output) -> None:
        d = o.dest
        if o.new and os.path.lexists(d):
            raise UserError(f"{o.shown}: already exists; remove it or choose another path for {_the(o.role)}")
        if o.directory and d.exists() and not d.is_dir():
            raise UserError(f"{o.shown}: is a file, in the way of {_the(o.role)} (a folder); nothing written")
        if not o.directory and d.is_dir():
            raise UserError(f"{o.shown}: is a directory, in the way of {_the(o.role)}; nothing written")
        anc = d.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise UserError(f"{o.shown}: cannot write here: '{anc}' is not a folder; nothing written")
        if o.in_place:
            where = d if d.is_dir() else anc
            if not os.access(where, os.W_OK | os.X_OK):
                raise UserError(f"{o.shown}: cannot write here: '{where}' is not writable; nothing written")

    def _stage_for(self, o: _Output) -> None:
        if o.in_place:
            return
        parent = o.dest.parent
        if parent in self._stages:
            return
        missing = []
        p = parent
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._created.extend(m for m in missing if m not in self._created)
            self._stages[parent] = Path(tempfile.mkdtemp(prefix=".qcompiler-", dir=parent))
        except OSError as e:
            raise UserError(f"{o.shown}: cannot write {_the(o.role)} here: {e.strerror or e}; "
                            "nothing written") from None

    # ------------------------------------------------------------------------------------------ write
    def path(self, path: PathLike) -> Path:
        """Where to write the declared output ``path`` now: its staging path (an ``in_place`` folder: itself)."""
        self.prepare()
        dest = resolve_path(Path(path).parent) / Path(path).name
        for o in self._outputs:
            if o.dest == dest:
                return o.dest if o.in_place else self._stages[o.dest.parent] / o.dest.name
        raise KeyError(f"{path} was not declared as an output")

    def commit(self) -> list[Path]:
        """Move every staged output into place (the primary one last). When a move fails, those already moved
        are rolled back — what was at each destination before is put back — and a :class:`UserError` names the
        path. Returns the outputs written (as given), in declaration order."""
        self.prepare()
        mask = _umask()
        todo = [o for o in self._outputs if not o.in_place and os.path.lexists(self.path(o.shown))]
        done: list[tuple[_Output, Path | None]] = []
        current: _Output | None = None
        try:
            for o in sorted(todo, key=lambda o: o.primary):
                current = o
                staged = self.path(o.shown)
                os.chmod(staged, (0o777 if staged.is_dir() else 0o666) & ~mask)
                if o.directory and os.path.lexists(o.dest):
                    raise FileExistsError(17, "File exists")
                if not o.directory and o.dest.is_dir():
                    raise IsADirectoryError(21, "Is a directory")
                backup = None
                if os.path.lexists(o.dest):
                    keep = Path(tempfile.mkdtemp(prefix=".previous-", dir=self._stages[o.dest.parent]))
                    backup = keep / o.dest.name
                    try:
                        os.link(o.dest, backup, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(o.dest, backup, follow_symlinks=False)
                os.replace(staged, o.dest)
                done.append((o, backup))
        except BaseException as e:  # an interrupt too: never leave half of the outputs in place
            self._rollback(done)
            if not isinstance(e, OSError):
                raise
            assert current is not None
            raise UserError(f"{current.shown}: cannot move {_the(current.role)} into place: {e.strerror or e}; "
                            "nothing written (outputs already moved were restored)") from None
        self._committed = True
        self.cleanup()
        return [o.shown for o in self._outputs if any(o is d for d, _ in done)]

    def _rollback(self, done: list[tuple[_Output, Path | None]]) -> None:
        for o, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, o.dest)
                elif o.directory:
                    shutil.rmtree(o.dest)
                else:
                    o.dest.unlink()
            except OSError as e:  # pragma: no cover - the file system changed under us twice
                log.error("%s: could not restore it: %s", o.shown, e.strerror or e)

    def cleanup(self) -> None:
        """Remove the staging folders (and, unless committed, the output folders created for the run)."""
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()
        if not self._committed:
            for c in self._created:  # deepest first
                with contextlib.suppress(OSError):
                    c.rmdir()
        self._created.clear()
        self._prepared = False

    def __enter__(self) -> OutputSet:
        return self.prepare()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
