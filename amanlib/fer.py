"""The paper's FER+ ResNet-18 trunk as the AMAN authors publish it: where it lives, how to fetch and verify it.

The authors' repository ships it as a plain git blob, so it is identified by its git blob SHA-1 (what
`git hash-object` prints), which can be checked against the repository's tree without downloading anything.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from amanlib.download import CHUNK, DownloadError, download_verified, resolve_dest

log = logging.getLogger(__name__)

FER_FILENAME = "Resnet18_FER+_pytorch.pth.tar"
FER_BLOB_SHA1 = "e687f68c766e4953659de9402be63dafac134f65"
FER_REPO = "https://github.com/weimengting/AMAN"
FER_URL = "https://raw.githubusercontent.com/weimengting/AMAN/HEAD/assets/Resnet18_FER%2B_pytorch.pth.tar"
FER_WHAT = f"the paper's FER+ ResNet-18 checkpoint ({FER_REPO}, assets/{FER_FILENAME})"
FER_ENV = "AMANLIB_FER_CHECKPOINT"


def git_blob_sha1(path: str | Path) -> str:
    """SHA-1 of b'blob <size>\\0' + the file's bytes, read in chunks: the id git gives the file's content."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def default_fer_path() -> Path:
    """$AMANLIB_FER_CHECKPOINT if set, else ~/.cache/amanlib/Resnet18_FER+_pytorch.pth.tar."""
    env = os.environ.get(FER_ENV)
    return Path(env) if env else Path.home() / ".cache" / "amanlib" / FER_FILENAME


def download_fer_checkpoint(
    dest: str | Path | None = None, url: str = FER_URL, blob_sha1: str = FER_BLOB_SHA1, timeout: float = 60, *,
    progress: bool = True,
) -> Path:
    """Fetch the FER+ checkpoint to dest (default_fer_path() when None; a folder gets FER_FILENAME inside),
    verify its git blob SHA-1 and return its path; a file already there with the right hash costs no network."""
    dest = resolve_dest(dest, default_fer_path(), FER_FILENAME)
    return download_verified(url, dest, git_blob_sha1, blob_sha1, FER_WHAT, digest_name="git blob SHA-1",
                             env_var=FER_ENV, timeout=timeout, progress=progress)


def find_fer_checkpoint(download: bool) -> Path | None:
    """The verified FER+ checkpoint at default_fer_path(), downloaded first when absent and `download` allows;
    None when it is absent and cannot be fetched (what backbone='auto' falls back from)."""
    path = resolve_dest(None, default_fer_path(), FER_FILENAME)
    if path.is_file():
        actual = git_blob_sha1(path)
        if actual != FER_BLOB_SHA1:
            raise ValueError(
                f"{path} has git blob SHA-1 {actual}, expected {FER_BLOB_SHA1}: it is not {FER_WHAT}; delete it "
                f"(amanlib.fer.download_fer_checkpoint() then fetches the right file) or set ${FER_ENV} to the "
                "right file")
        return path
    if not download:
        return None
    try:
        return download_fer_checkpoint(path, url=FER_URL, blob_sha1=FER_BLOB_SHA1)
    except DownloadError as e:
        log.warning("FER+ checkpoint unavailable, falling back: %s", e)
        return None
