"""Writing an export safely: the one place quantkit replaces or deletes files.

The rule for destructive operations: OUTPUT_DIR may never be, contain or lie inside the source
model folder, and may never be or contain the current folder. An existing OUTPUT_DIR is replaced
only with ``--force``, and only if it is an empty folder or an earlier quantkit export (a folder
whose quantkit.json manifest lists every file in it). The export is assembled in a temporary
folder beside it (``.NAME.partial``, created exclusively, locked against a second run by
``.NAME.lock``) and renamed at the end; on ``--resume`` only the files the resume state lists,
with the size and SHA-256 recorded when each was written, are trusted, everything else there is
deleted. Files are created afresh (``O_EXCL | O_NOFOLLOW``), so no symbolic link is written through.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from quantkit.errors import QuantkitError, error_line, read_json

MANIFEST = "quantkit.json"
RESUME = "resume.json"
# what an export written before manifests listed their files may hold
_LEGACY_EXPORT = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|README\.md|quantkit\.json|"
    r"generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|tokenizer\.model|"
    r"vocab\.json|merges\.txt|added_tokens\.json|chat_template\.jinja"
)


def temporary_dir(output: Path) -> Path:
    """Where an export of ``output`` is assembled (beside it, so the final rename is atomic)."""
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.partial"


def _write_failed(path: Path, e: Exception) -> QuantkitError:
    if isinstance(e, OSError):
        return QuantkitError(f"writing {path} failed: {error_line(e)}")
    return QuantkitError(f"writing {path} failed ({str(e).strip().splitlines()[0]}): free disk space "
                         "(or raise ulimit -f) and retry")


@contextmanager
def _writing(path: Path, undo: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Run the block; an OSError in it becomes one QuantkitError about ``path``, after ``undo()``."""
    try:
        yield
    except OSError as e:
        undo()
        raise _write_failed(path, e) from None


def _fresh(path: Path) -> int:
    """A new file at ``path`` opened for writing: whatever was there (a symbolic link too) is
    removed first, and the creation is exclusive and follows no link."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a fresh file beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, lambda: tmp.unlink(missing_ok=True)):
        with os.fdopen(_fresh(tmp), "wb") as fh:
            fh.write(data)
        tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors ``save_file`` into a fresh file; write errors (disk full, ulimit -f) as QuantkitError."""
    try:
        os.close(_fresh(path))
        save_file(tensors, str(path), metadata=metadata)
    except (OSError, SafetensorError) as e:
        path.unlink(missing_ok=True)
        raise _write_failed(path, e) from None


def write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``path`` atomically (written beside it, then renamed)."""
    tmp = path.with_suffix(".tmp")
    _save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, {"format": "pt"})
    tmp.replace(path)


def file_record(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of a regular file (a link is not followed)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while chunk := fh.read(2**22):
            digest.update(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


class ShardWriter:
    """Writes tensors to safetensors shards of at most ``max_shard_bytes`` as they arrive.

    Shards are named model-0000i-of-0000n.safetensors at ``close`` (a single shard becomes
    model.safetensors) and an index maps every tensor to its shard."""

    def __init__(self, folder: Path, max_shard_bytes: int = 4 * 2**30, metadata: dict | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        _save(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", self.metadata)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, name the shards and write the index; returns the shard file names."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, (tensor_names, name) in enumerate(zip(self.shards, names)):
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / name)
            weight_map.update({t: name for t in tensor_names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / "model.safetensors.index.json", index)
        return names


def _not_replaceable(folder: Path) -> str | None:
    """Why ``--force`` may not delete ``folder`` (None: it is empty or an earlier quantkit export)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    if not (folder / MANIFEST).is_file():
        return f"holds '{entries[0].name}' and no {MANIFEST} (it is not a quantkit export)"
    try:
        manifest = read_json(folder / MANIFEST, "the manifest", "")
    except QuantkitError:
        return f"has a damaged {MANIFEST}"
    listed = manifest.get("files")
    if "quantkit_version" not in manifest or not (listed is None or isinstance(listed, list)):
        return f"has a {MANIFEST} that quantkit did not write"
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            return f"holds '{entry.name}', which is not a plain file"
        known = entry.name == MANIFEST or (entry.name in listed if listed is not None else _LEGACY_EXPORT.fullmatch(entry.name))
        if not known:
            return f"holds '{entry.name}', which its {MANIFEST} does not list"
    return None


def check_output(output: Path, source: Path | None, force: bool) -> None:
    """Enforce the rule for destructive operations (see the module docstring) on OUTPUT_DIR, with
    ``source`` the local model folder (None for a hub id). Changes nothing."""
    if output.is_symlink():
        raise QuantkitError(f"output '{output}' is a symbolic link: pass the real folder path")
    real = Path(os.path.abspath(output)).resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or cwd.is_relative_to(real):
        raise QuantkitError(f"output '{output}' is the current folder or a parent of it: choose a new folder for the export")
    if source is not None:
        src = source.resolve()
        if real == src or src.is_relative_to(real) or real.is_relative_to(src):
            raise QuantkitError(f"output '{output}' is, contains or lies inside the source model folder '{source}': "
                                "choose a folder outside it")
    for parent in real.parents:
        if parent.exists() and not parent.is_dir():
            raise QuantkitError(f"output '{output}' cannot be created: '{parent}' is a file, not a folder")
    if not output.exists():
        return
    if not output.is_dir():
        raise QuantkitError(f"output '{output}' is a file: choose a folder path")
    if not force:
        raise QuantkitError(f"output folder '{output}' exists: choose another path or pass --force to replace it")
    why = _not_replaceable(output)
    if why is not None:
        raise QuantkitError(f"--force replaces only an empty folder or an earlier quantkit export, and '{output}' {why}: "
                            "move its files away or choose another path")


@dataclass
class ResumeState:
    """What an interrupted run had finished, kept in its temporary folder as resume.json:
    ``files`` {name: {"size", "sha256"}} are the files written so far, the only ones trusted."""

    folder: Path
    recipe: dict
    source: str
    tokens_sha256: str
    layers_done: int = 0
    files: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> "ResumeState | None":
        path = folder / RESUME
        if not path.is_file() or path.is_symlink():
            return None
        fix = "pass --restart to discard it and start over"
        data = read_json(path, "the resume state", fix)
        types = {"recipe": (dict, "an object"), "source": (str, "a string"), "tokens_sha256": (str, "a string"),
                 "layers_done": (int, "an integer"), "files": (dict, "an object")}
        for key, (kind, called) in types.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise QuantkitError(f"the resume state {path} is damaged ('{key}' is not {called}): {fix}")
        state = cls(folder, data["recipe"], data["source"], data["tokens_sha256"], data["layers_done"], data["files"])
        if state.layers_done > len(state.files) or not all(  # a part per layer (MoE layers: and their experts')
            isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
            for r in state.files.values()
        ):
            raise QuantkitError(f"the resume state {path} is damaged (its file list is shorter than layers_done): {fix}")
        return state

    def save(self) -> None:
        data = {"recipe": self.recipe, "source": self.source, "tokens_sha256": self.tokens_sha256,
                "layers_done": self.layers_done, "files": self.files}
        write_json(self.folder / RESUME, data)

    def check(self, recipe: dict, source: str, tokens_sha256: str) -> None:
        """Refuse to resume a run of another recipe, model or calibration text."""
        if self.recipe != recipe:
            changed = sorted(k for k, v in recipe.items() if self.recipe.get(k) != v)
            raise QuantkitError(
                f"--resume with a different recipe ({', '.join(changed)} changed): rerun with the interrupted run's "
                "flags, or pass --restart instead to start over"
            )
        if self.source != source or self.tokens_sha256 != tokens_sha256:
            raise QuantkitError("--resume with a different model or calibration text: use the interrupted run's, or pass --restart instead")

    def record(self, path: Path) -> None:
        """Trust ``path`` (just written into the folder) on resume: keep its size and checksum."""
        self.files[path.name] = file_record(path)

    def trust_only_listed(self) -> None:
        """Check every listed file against its record and delete everything else in the folder."""
        for entry in self.folder.iterdir():
            if entry.name == RESUME or entry.name in self.files:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for name, record in self.files.items():
            path = self.folder / name
            try:
                ok = stat.S_ISREG(path.lstat().st_mode) and file_record(path) == record
            except OSError:
                ok = False
            if not ok:
                raise QuantkitError(f"{path} is missing or changed since it was written: the interrupted run cannot be "
                                    "trusted; pass --restart instead to start over")


class ExportFolder:
    """OUTPUT_DIR's temporary folder, held under a lock from ``open`` until ``close``."""

    def __init__(self, output: Path, source: Path | None) -> None:
        self.output = output
        self.source = source
        self.tmp = temporary_dir(output)
        self.lock_path = self.tmp.with_name(self.tmp.name[: -len(".partial")] + ".lock")
        self._lock: int | None = None

    def check(self, force: bool, resume: bool, restart: bool = False) -> None:
        """What can be checked before any work: the rule, and that a saved partial run is resumed
        (``resume``) or discarded (``restart``) only when asked."""
        check_output(self.output, self.source, force)
        if self.tmp.is_symlink() or (self.tmp.exists() and not self.tmp.is_dir()):
            raise QuantkitError(f"'{self.tmp}' is not quantkit's temporary folder (a link or a file): remove it and retry")
        saved = None if restart else ResumeState.load(self.tmp)  # with --restart whatever is there is discarded
        if resume and saved is None:
            raise QuantkitError(f"nothing to resume: {self.tmp} holds no interrupted run of '{self.output}'")
        if saved is not None and not resume and not restart:
            raise QuantkitError(f"'{self.tmp}' holds an interrupted run of '{self.output}' ({saved.layers_done} layers "
                                "done): pass --resume to continue it or --restart to discard it")

    def open(self, force: bool, resume: bool, restart: bool = False) -> ResumeState | None:
        """Check (a refused OUTPUT_DIR gets nothing created beside it, not even the lock), lock,
        check again under the lock, and create the temporary folder exclusively (or, with ``resume``,
        keep the trusted files of the interrupted run); returns the interrupted run's state, if resumed."""
        self.check(force, resume, restart)
        self._acquire()
        try:
            with _writing(self.tmp):
                self.check(force, resume, restart)  # another process may have changed it until we held the lock
                if resume:
                    state = ResumeState.load(self.tmp)
                    state.trust_only_listed()
                    return state
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)  # an earlier run's leftovers: no run holds the lock
                self.tmp.mkdir()
        except BaseException:
            self.close()
            raise
        return None

    def _acquire(self) -> None:
        while True:
            with _writing(self.lock_path):
                self.lock_path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise QuantkitError(f"another quantize is writing '{self.output}' (it holds {self.lock_path}): "
                                    "wait for it to finish, or choose another output folder") from None
            try:  # the lock file may have been unlinked by its last holder before we locked it
                same = os.fstat(fd).st_ino == os.stat(self.lock_path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock = fd
                return
            os.close(fd)

    def finalize(self, force: bool) -> None:
        """Replace OUTPUT_DIR by the finished temporary folder (re-checking the rule first)."""
        check_output(self.output, self.source, force)
        with _writing(self.output):
            if self.output.exists():
                shutil.rmtree(self.output)
            self.tmp.rename(self.output)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> None:
        """Release the lock (its file is removed while still held, so no one else locks a stale one)."""
        if self._lock is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None
