"""The one keyed cache every stage uses: a folder named by the hash of what determines its content.

A key is computed from content (file bytes, weights, settings, upstream keys), never from path strings, so
the same inputs find the same folder from any working directory and changed inputs never find an old one.
Each folder is written under a file lock (one writer at a time; others wait), records its inputs in
`key.json` and is complete only when its stamp `done.json` exists, written last. A folder without a
stamp is either resumed (stages that keep per-item progress) or cleared and rebuilt.

The stamp records, besides the stage's summary, the size and SHA-1 of every file the folder held when it was
finished (under "files"; SHA-1 measured fastest here: 1.5 GB/s, BLAKE2b 0.85 GB/s). A stamped folder is served
only once that record checks out: a damaged one (a file missing, cut, overwritten, an unreadable key.json or
stamp) is removed under its lock with one warning naming it, and the stage builds it anew. A stamp without
that record (written before amanlib checked its caches) is treated the same way: such folders are rebuilt
once. Files added after the stamp (features' backbone.json) are not part of the record.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from .runtime import atomic_write

log = logging.getLogger(__name__)

KEY_FILE = "key.json"
STAMP_FILE = "done.json"
FILES = "files"  # the stamp's reserved field: relative path -> {"size", "sha1"} of each file the folder holds
DIGEST = "sha1"
KEY_LENGTH = 16  # hex characters of the key that name the folder
WAIT_NOTE_SECONDS = 2.0


def _canonical(value):
    """JSON-ready form with one spelling per value: tuples as lists, numpy scalars as Python, floats exact."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return _canonical(value.item())
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot key a non-finite number ({value})")
        return int(value) if value.is_integer() else value
    if isinstance(value, Path):
        raise TypeError(f"a path ({value}) cannot enter a cache key: key the file's content (file_digest)")
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(f"cannot key a {type(value).__name__}")


def key_of(inputs: dict) -> str:
    """SHA-256 (hex) of the inputs' canonical JSON."""
    text = json.dumps(_canonical(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes (SHA-1 unless another hashlib algorithm is named)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor] | torch.Tensor | np.ndarray) -> str:
    """SHA-1 over tensors' names, dtypes, shapes and bytes (a state dict, a single tensor or an array)."""
    items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
    digest = hashlib.sha1()
    for name, t in items:
        array = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        flat = array.reshape(-1).view(np.uint8) if array.size else array.reshape(-1)
        for start in range(0, flat.size, 1 << 26):  # memmaps are read in blocks, never whole
            digest.update(flat[start:start + (1 << 26)].tobytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    """A JSON object file's content, or None when it is missing, cut or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _contents(folder: Path) -> dict[str, dict]:
    """Size and digest of every file under folder but its key, stamp and lock files (relative POSIX paths)."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, DIGEST: file_digest(path, DIGEST)}
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in (KEY_FILE, STAMP_FILE) and path.suffix != ".lock"}


def damage(folder: str | Path) -> str | None:
    """What is wrong with a stamped folder (the first problem found), or None when its key.json reads and every
    file its stamp records is there with the recorded size and digest (sizes are checked before any digest)."""
    folder = Path(folder)
    if not isinstance((_read_json(folder / KEY_FILE) or {}).get("key"), str):
        return f"{KEY_FILE} is missing or unreadable"
    stamp = _read_json(folder / STAMP_FILE)
    if stamp is None:
        return f"its stamp {STAMP_FILE} is unreadable"
    files = stamp.get(FILES)
    if files is None:
        return f"its stamp {STAMP_FILE} records no content digests (written before amanlib checked its caches)"
    if not (isinstance(files, dict) and all(isinstance(r, dict) and isinstance(r.get("size"), int)
                                            and isinstance(r.get(DIGEST), str) for r in files.values())):
        return f"its stamp {STAMP_FILE} is unreadable"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} has {path.stat().st_size} bytes, {record['size']} were written"
    for name, record in files.items():
        if file_digest(folder / name, DIGEST) != record[DIGEST]:
            return f"{name} differs from what was written (its {DIGEST} does not match)"
    return None


class Entry:
    """One cache folder: root/<key[:16]>, its lock root/<key[:16]>.lock, key.json and the stamp done.json."""

    def __init__(self, root: str | Path, inputs: dict, kind: str):
        self.inputs = {"kind": kind, **inputs}
        self.key = key_of(self.inputs)
        self.root = Path(root)
        self.path = self.root / self.key[:KEY_LENGTH]
        self.kind = kind
        self._lock = None  # one FileLock per entry: re-entered, never a second instance on the same file
        self._verified = False

    @property
    def done(self) -> bool:
        """The folder is stamped, holds what its key says and what its stamp records (checked once per entry).
        A damaged folder is removed (under the lock, with a warning) and False returned: the caller rebuilds."""
        if self._verified or not self._stamped():
            return self._verified
        self._check_key()
        if damage(self.path) is None:
            self._verified = True
            return True
        with self.writing(claim=False):  # another run may be rebuilding it: judge and remove only under the lock
            if self._stamped():
                problem = damage(self.path)
                if problem is None:
                    self._verified = True
                    return True
                log.warning("%s: %s; removing this %s cache folder to build it again", self.path, problem, self.kind)
                shutil.rmtree(self.path)
        return False

    def _stamped(self) -> bool:
        return (self.path / STAMP_FILE).is_file()

    def _check_key(self) -> None:
        """Raise when key.json names other inputs (an unreadable key.json is damage, judged by `damage`)."""
        found = (_read_json(self.path / KEY_FILE) or {}).get("key")
        if found is not None and found != self.key:
            raise RuntimeError(f"{self.path} holds a {self.kind} of other inputs (key {found}, expected {self.key}): "
                               f"delete that folder (rm -r {self.path}) and run again")

    def stamp(self) -> dict:
        """The summary the stage finished the folder with."""
        return {k: v for k, v in json.loads((self.path / STAMP_FILE).read_text()).items() if k != FILES}

    def finish(self, summary: dict | None = None) -> None:
        """Write the stamp, last, with the digest of every file: from now on the folder is complete."""
        summary = dict(summary or {})
        if FILES in summary:
            raise ValueError(f"a stamp's summary cannot hold '{FILES}': that field records the folder's files")
        summary[FILES] = _contents(self.path)
        atomic_write(self.path / STAMP_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        self._verified = True

    def clear(self) -> None:
        """Remove a half-written folder so it can be built again."""
        self._verified = False
        if self.path.exists():
            log.warning("%s: removing a half-written %s cache folder", self.path, self.kind)
            shutil.rmtree(self.path)

    @contextmanager
    def writing(self, timeout: float = -1, claim: bool = True):
        """Hold the folder's lock (waiting for another writer, with a note); with `claim`, create the folder
        and its key.json (or check the key.json there)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self._lock = self._lock or FileLock(str(self.root / f"{self.key[:KEY_LENGTH]}.lock"))
        try:
            lock.acquire(timeout=WAIT_NOTE_SECONDS)
        except Timeout:
            log.warning("%s is being written by another run: waiting for it", self.path)
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise RuntimeError(f"{self.path} is locked by another run (lock file {lock.lock_file}); wait for it "
                                   "to finish") from None
        try:
            if claim:
                self._claim()
            yield self
        finally:
            lock.release()

    def _claim(self) -> None:
        key_file = self.path / KEY_FILE
        if key_file.is_file():
            self._check_key()
            if _read_json(key_file) is not None:
                return
            log.warning("%s: its %s is unreadable; removing this %s cache folder to build it again", self.path,
                        KEY_FILE, self.kind)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"key": self.key, "inputs": _canonical(self.inputs)}
        atomic_write(key_file, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def build_once(root: str | Path, inputs: dict, kind: str, build) -> Entry:
    """The complete folder for these inputs: reused when stamped, else (re)built by build(folder) -> summary."""
    entry = Entry(root, inputs, kind)
    if entry.done:
        return entry
    with entry.writing(claim=False):
        if not entry.done:  # another run may have finished it while we waited
            entry.clear()
            entry._claim()
            entry.finish(build(entry.path))
    return entry
