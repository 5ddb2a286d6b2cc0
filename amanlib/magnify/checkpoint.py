"""The AMAN authors' learning-based magnification weights: where they live, how to fetch, verify and read them."""
from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import torch

from amanlib.checkpoints import read_state_dict
from amanlib.cache import file_digest
from amanlib.runtime import atomic_write

MAGNET_FILENAME = "learning_based_mag.pth.tar"
MAGNET_SHA256 = "a259b19b5bbef69d3efea1182369fd179e429c315ace107ebe0ded6792ff60ba"
MAGNET_REPO = "https://github.com/weimengting/AMAN"
MAGNET_URL = f"https://raw.githubusercontent.com/weimengting/AMAN/HEAD/mag_imple/{MAGNET_FILENAME}"
WHERE_TO_GET = (
    f"get it from the AMAN authors' repository {MAGNET_REPO} (file mag_imple/{MAGNET_FILENAME}, "
    f"SHA-256 {MAGNET_SHA256}), e.g. with amanlib.magnify.download_magnet_checkpoint(dest)"
)


def default_checkpoint_path() -> Path:
    """$AMANLIB_MAGNET_CHECKPOINT if set, else ~/.cache/amanlib/learning_based_mag.pth.tar."""
    env = os.environ.get("AMANLIB_MAGNET_CHECKPOINT")
    return Path(env) if env else Path.home() / ".cache" / "amanlib" / MAGNET_FILENAME


def sha256_of(path: str | Path) -> str:
    return file_digest(path, "sha256")


def verify_checkpoint(path: str | Path, sha256: str = MAGNET_SHA256) -> Path:
    """Return path when its SHA-256 matches; a ValueError naming the file and both digests otherwise."""
    path = Path(path)
    actual = sha256_of(path)
    if actual != sha256:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {sha256}: it is not the authors' checkpoint; {WHERE_TO_GET}"
        )
    return path


def download_magnet_checkpoint(
    dest: str | Path | None = None, url: str = MAGNET_URL, sha256: str = MAGNET_SHA256
) -> Path:
    """Fetch the checkpoint to dest (a file, or a folder to put it in), verify its SHA-256, return its path.

    An existing file with the right digest is kept; a download with the wrong digest is deleted, never installed.
    """
    dest = Path(dest) if dest is not None else default_checkpoint_path()
    if dest.is_dir():
        dest = dest / MAGNET_FILENAME
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
        actual = sha256_of(tmp)
        if actual != sha256:
            raise ValueError(
                f"download from {url} has SHA-256 {actual}, expected {sha256}; nothing was written to {dest}"
            )

    return atomic_write(dest, fetch)


def load_magnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of the authors' MagNet from their legacy .pth.tar, with the DataParallel `module.` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learning-based magnification checkpoint not found at {path}; {WHERE_TO_GET}")
    try:
        return read_state_dict(path, "learning-based magnification checkpoint")
    except ValueError as err:
        raise ValueError(f"{err}; {WHERE_TO_GET}") from err
