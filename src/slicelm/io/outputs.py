"""Output safety, in one place: slicelm never deletes or overwrites what it did not create.

Every folder slicelm writes (a sliced or fine-tuned model, a plain export, a sweep) goes through an
:class:`OutputClaim`:

* **Claim first.** Before any expensive work the target is checked and claimed with an exclusive
  lock file beside it (``.NAME.slicelm-lock``, holding host and pid), so two runs aimed at one
  folder cannot both proceed; the second fails at once with one line. An unwritable parent fails
  here too, before slicing, not after it.
* **Replace only our own.** ``--overwrite`` replaces a folder only if it is empty or is itself a
  slicelm output: it carries the manifest :data:`MANIFEST` and holds nothing but the files that
  manifest lists. Never the source model, a folder that contains the source, the current
  directory or one of its ancestors, a symlink, or a folder holding anything else.
* **Publish atomically.** Work is written into a hidden temporary folder beside the target
  (``.NAME.slicelm-tmp-HOST-PID-XXXX``) and renamed into place; a replaced output is moved aside
  first and removed only after the new one is in place. If the target appears meanwhile, the
  finished result is kept under a visible name and the error says where.
* **Clean up after crashes.** Temporary, old and lock entries carry host and pid; a later claim on
  the same target removes those whose process is gone (a SIGKILL leaves them behind).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from slicelm.errors import SlicelmError
from slicelm.version import __version__

MANIFEST = "slicelm_output.json"
_TAG = "slicelm"
# Kinds of model folder: --overwrite may replace one kind by another (re-slicing with another layout).
MODEL_KINDS = ("sliced-model", "plain-model", "finetuned-model", "decilm-model")


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (permission errors mean it does)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_is_gone(host: str, pid: str) -> bool:
    """A temp entry of ``host``/``pid`` may be removed: it is ours (this host) and its process ended."""
    return host == _host() and pid.isdigit() and not pid_alive(int(pid))


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove ``PREFIX-HOST-PID-*`` entries in ``parent`` whose process is gone; returns what was removed.

    Only names of exactly that shape are considered, so nothing a user made can match by accident.
    """
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix + "-"):
            continue
        parts = entry.name[len(prefix) + 1 :].split("-")
        if len(parts) < 3:
            continue
        host, pid = "-".join(parts[:-2]), parts[-2]
        if _owner_is_gone(host, pid):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def temp_name(prefix: str) -> str:
    """A name prefix carrying host and pid, for :func:`tempfile.mkdtemp` (which appends a random part)."""
    return f"{prefix}-{_host()}-{os.getpid()}-"


def write_manifest(folder: Path, kind: str, extra: dict[str, Any] | None = None) -> None:
    """Record that slicelm wrote ``folder`` and which entries it holds (call when it is complete)."""
    entries = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    manifest = {"created_by": _TAG, "version": __version__, "kind": kind, "entries": entries, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("created_by") == _TAG else None


# Folders written by slicelm 0.1.0 had no manifest: a sliced model with exactly these kinds of file.
_LEGACY_REQUIRED = ("config.json", "modeling_slicelm.py", "slicing_plan.json")
_LEGACY_NAMES = (
    "config.json",
    "generation_config.json",
    "modeling_slicelm.py",
    "slicing_plan.json",
    "slicelm_report.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def foreign_entries(folder: Path, kinds: Iterable[str] | None = None) -> list[str] | None:
    """Entries of ``folder`` that slicelm did not write, or None if it is not a slicelm output at all.

    kinds: the manifest kinds accepted (None: any).
    """
    present = {p.name for p in folder.iterdir()}
    manifest = read_manifest(folder)
    if manifest is not None:
        if kinds is not None and manifest.get("kind") not in set(kinds):
            return None
        return sorted(present - set(manifest.get("entries", [])) - {MANIFEST})
    if all(name in present for name in _LEGACY_REQUIRED):
        config = _read_json(folder / "config.json")
        if isinstance(config, dict) and "slicelm" in config:
            legacy = set(_LEGACY_NAMES)
            return sorted(n for n in present if n not in legacy and not _is_shard(n))
    return None


def _is_shard(name: str) -> bool:
    return name.startswith("model-") and name.endswith(".safetensors")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (both resolved)."""
    return path == folder or folder in path.parents


# The manifest kinds of folders that are not models, in words (for refusals).
_KIND_WORDS = {
    "sweep": "a sweep folder (points, tables and plots of `slicelm sweep`)",
    "finetune-work": "a fine-tuning work folder (the checkpoint of an interrupted `slicelm finetune`)",
}


def refuse_replacing(out: Path, kinds: Iterable[str] | None = None) -> None:
    """Raise unless the existing folder ``out`` may be replaced (empty, or wholly a slicelm output)."""
    if out.is_symlink():
        raise SlicelmError(f"{out} is a symbolic link; slicelm does not replace links, choose another --out")
    if not out.is_dir():
        raise SlicelmError(f"output path {out} exists and is not a folder; remove it or choose another --out")
    if not any(out.iterdir()):
        return
    foreign = foreign_entries(out, kinds)
    if foreign is None:
        manifest = read_manifest(out)
        if manifest is not None:  # ours, but of another kind: a sweep or a fine-tuning work folder
            kind = str(manifest.get("kind"))
            what = _KIND_WORDS.get(kind, f"a slicelm {kind} folder")
            raise SlicelmError(
                f"{out} is {what}, written by slicelm; --overwrite here only replaces a model folder, "
                "so choose another --out (or delete that folder yourself)"
            )
        raise SlicelmError(
            f"--overwrite only replaces folders slicelm wrote, and {out} is not one; choose another --out"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise SlicelmError(f"{out} holds files slicelm did not write ({shown}); move them or choose another --out")


class OutputClaim:
    """An exclusive claim on one output folder, from the check before any work to its publication.

    ``protect``: paths that must survive (the source model): the output may be neither one of them
    nor a folder containing one. Use as a context manager, or call :meth:`release`.
    """

    def __init__(
        self,
        out: str | Path,
        overwrite: bool,
        *,
        kind: str = "model",
        protect: Iterable[str | Path] = (),
        replace_kinds: Iterable[str] | None = None,
    ) -> None:
        self.out = Path(os.path.abspath(Path(out).expanduser()))
        self.overwrite = overwrite
        self.kind = kind
        if replace_kinds is None:
            replace_kinds = MODEL_KINDS if kind in MODEL_KINDS else (kind,)
        self.replace_kinds = tuple(replace_kinds)
        self._created_parents: list[Path] = []
        self._lock: Path | None = None
        self.published = False
        self._check(protect)
        self._acquire()

    # -- checks -------------------------------------------------------------------------------
    def _check(self, protect: Iterable[str | Path]) -> None:
        out = self.out
        if not out.name or out == Path(out.anchor):
            raise SlicelmError(f"{out} cannot be an output folder; give a new folder for --out")
        resolved = out.resolve()
        cwd = Path.cwd().resolve()
        if _is_within(cwd, resolved):
            raise SlicelmError(
                f"--out {out} is the current directory or contains it; slicelm will not replace it, give a new folder"
            )
        for item in protect:
            if item is None:
                continue
            source = Path(os.path.abspath(Path(item).expanduser()))
            if source.exists() and _is_within(source.resolve(), resolved):
                raise SlicelmError(f"--out {out} is the source model or contains it ({source}); choose another --out")
        if out.exists() or out.is_symlink():
            if not self.overwrite:
                raise SlicelmError(f"output folder {out} already exists; choose another --out or pass --overwrite")
            refuse_replacing(out, self.replace_kinds)
        parent = out.parent
        if parent.exists() and not parent.is_dir():
            raise SlicelmError(f"{parent} is not a folder; choose another --out")

    def _acquire(self) -> None:
        parent = self.out.parent
        missing = []
        probe = parent
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
                self._created_parents.append(folder)
            self._take_lock(parent / f".{self.out.name}.{_TAG}-lock")
        except OSError as exc:
            self._remove_created_parents()
            reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
            raise SlicelmError(f"cannot write to {parent} ({reason}); choose another --out") from None
        for prefix in (f".{self.out.name}.{_TAG}-tmp", f".{self.out.name}.{_TAG}-old"):
            remove_stale(parent, prefix)

    def _take_lock(self, lock: Path) -> None:
        me = f"{_host()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock.read_text().split() if lock.is_file() else []
                if len(owner) == 2 and _owner_is_gone(owner[0], owner[1]):
                    lock.unlink(missing_ok=True)  # left by a killed run
                    continue
                who = f"pid {owner[1]} on {owner[0]}" if len(owner) == 2 else "another run"
                self._remove_created_parents()
                raise SlicelmError(
                    f"another slicelm run ({who}) is writing {self.out}; wait for it, or delete {lock} "
                    "if no run is active"
                ) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me + "\n")
            self._lock = lock
            return
        raise SlicelmError(f"cannot claim {self.out}: {lock} keeps reappearing")

    # -- staging and publishing ------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, manifest: dict[str, Any] | None = None, kind: str | None = None) -> Iterator[Path]:
        """Yield an empty temporary folder beside the target; on success it becomes the target.

        manifest: extra fields for the manifest written into the folder before it is published;
        kind: what the folder holds, when it is not the claim's kind (another model layout).
        """
        if self._lock is None:
            raise RuntimeError("the output claim was released")
        parent = self.out.parent
        tmp = Path(tempfile.mkdtemp(prefix=temp_name(f".{self.out.name}.{_TAG}-tmp"), dir=parent))
        try:
            yield tmp
            write_manifest(tmp, kind or self.kind, manifest)
            _chmod_like_mkdir(tmp)
            self._publish(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path) -> None:
        out = self.out
        if out.exists() or out.is_symlink():
            try:
                if not self.overwrite:
                    raise SlicelmError(f"output folder {out} appeared while slicelm was working")
                refuse_replacing(out, self.replace_kinds)  # check again: it may have changed meanwhile
            except SlicelmError as exc:
                kept = self._keep_visible(tmp)
                raise SlicelmError(f"{exc}; the finished result is kept in {kept}") from None
            if not any(out.iterdir()):
                out.rmdir()
                tmp.rename(out)
            else:
                old = Path(tempfile.mkdtemp(prefix=temp_name(f".{out.name}.{_TAG}-old"), dir=out.parent))
                old.rmdir()
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(out)
            except OSError:  # created by someone else between the check and the rename
                kept = self._keep_visible(tmp)
                raise SlicelmError(f"{out} appeared while slicelm was working; the result is kept in {kept}") from None
        self.published = True

    def _keep_visible(self, tmp: Path) -> Path:
        kept = Path(tempfile.mkdtemp(prefix=f"{self.out.name}.slicelm-result-", dir=self.out.parent))
        kept.rmdir()
        tmp.rename(kept)
        return kept

    # -- release -------------------------------------------------------------------------------
    def release(self) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
        if not self.published:
            self._remove_created_parents()

    def _remove_created_parents(self) -> None:
        for folder in reversed(self._created_parents):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        self._created_parents = []

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a claim dropped without release must not keep its lock
        with contextlib.suppress(Exception):
            self.release()


def _chmod_like_mkdir(folder: Path) -> None:
    """mkdtemp makes 0700 folders; published outputs get the permissions ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


@contextlib.contextmanager
def staged_output(
    out: str | Path | OutputClaim,
    overwrite: bool = False,
    *,
    kind: str = "model",
    protect: Iterable[str | Path] = (),
    manifest: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Stage a folder for ``out`` (a path, claimed here and released after, or an existing claim)."""
    if isinstance(out, OutputClaim):
        with out.stage(manifest, kind) as tmp:
            yield tmp
        return
    with OutputClaim(out, overwrite, kind=kind, protect=protect) as claim, claim.stage(manifest) as tmp:
        yield tmp


def check_output_file(path: str | Path, overwrite: bool, what: str = "--output") -> Path:
    """Fail early if a result file cannot be written: its folder is not writable, or it exists and
    may not be replaced (a file is replaced only with ``overwrite`` and only if slicelm wrote it)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_dir():
        raise SlicelmError(f"{what} {path} is a folder; give a file name")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SlicelmError(f"{what} {path}: {probe} is a file, not a folder; give another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SlicelmError(f"{what} {path}: cannot write to {probe} (permission denied); give another path")
    if path.exists():
        data = _read_json(path)
        ours = isinstance(data, dict) and data.get("created_by") == _TAG
        if not overwrite or not ours:
            hint = "pass --overwrite" if ours else "slicelm only replaces files it wrote"
            raise SlicelmError(f"{what} {path} already exists; choose another path or {hint}")
    return path


def write_result_file(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON result atomically (tmp + rename), marked as slicelm's so a rerun may replace it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_TAG}-tmp-{_host()}-{os.getpid()}-0")
    tmp.write_text(to_json({"created_by": _TAG, **data}) + "\n")
    tmp.replace(path)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(data: Any, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity: they become null); unknown objects become their ``str``."""
    return json.dumps(finite_or_none(data), indent=indent, allow_nan=False, default=str)


def write_new_file(path: Path, text: str, replace: bool = False) -> None:
    """Write ``text`` to ``path`` whole or not at all: through a temporary file in the same folder,
    published with an exclusive link (a file that appeared meanwhile is never overwritten) unless
    ``replace`` (the caller checked that slicelm wrote what is there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SlicelmError(f"{path} appeared while slicelm was writing it; nothing was replaced") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
