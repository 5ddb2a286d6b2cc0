"""The one keyed cache every stage uses: a folder named by the hash of what determines its content.

A key is computed from content (file bytes, weights, settings, upstream keys), never from path strings, so
the same inputs find the same folder from any working directory and changed inputs never find an old one.
Each folder is written under a file lock (one writer at a time; others wait), records its inputs in
`key.json` and is complete only when its stamp `done.json` exists, written last. A folder without a
stamp is either resumed (stages that keep per-item progress) or cleared and rebuilt.
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


class Entry:
    """One cache folder: root/<key[:16]>, its lock root/<key[:16]>.lock, key.json and the stamp done.json."""

    def __init__(self, root: str | Path, inputs: dict, kind: str):
        self.inputs = {"kind": kind, **inputs}
        self.key = key_of(self.inputs)
        self.root = Path(root)
        self.path = self.root / self.key[:KEY_LENGTH]
        self.kind = kind

    @property
    def done(self) -> bool:
        """The folder is complete (stamped) and holds what its key says."""
        if not (self.path / STAMP_FILE).is_file():
            return False
        self._check_key()
        return True

    def _check_key(self) -> None:
        key_file = self.path / KEY_FILE
        found = json.loads(key_file.read_text()).get("key") if key_file.is_file() else None
        if found != self.key:
            raise RuntimeError(f"{self.path} holds a {self.kind} of other inputs (key {found}, expected {self.key}): "
                               f"delete that folder (rm -r {self.path}) and run again")

    def stamp(self) -> dict:
        return json.loads((self.path / STAMP_FILE).read_text())

    def finish(self, summary: dict | None = None) -> None:
        """Write the stamp, last: from now on the folder is complete."""
        atomic_write(self.path / STAMP_FILE, lambda tmp: tmp.write_text(json.dumps(summary or {}, indent=1)))

    def clear(self) -> None:
        """Remove a half-written folder so it can be built again."""
        if self.path.exists():
            log.warning("%s: removing a half-written %s cache folder", self.path, self.kind)
            shutil.rmtree(self.path)

    @contextmanager
    def writing(self, timeout: float = -1, claim: bool = True):
        """Hold the folder's lock (waiting for another writer, with a note); with `claim`, create the folder
        and its key.json (or check the key.json there)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f"{self.key[:KEY_LENGTH]}.lock"))
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
            return
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
