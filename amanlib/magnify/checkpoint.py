"""The AMAN authors' learning-based magnification weights: where they live, how to fetch, verify and read them."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from amanlib.cache import file_digest
from amanlib.checkpoints import read_state_dict
from amanlib.download import download_verified, resolve_dest

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
    dest: str | Path | None = None, url: str = MAGNET_URL, sha256: str = MAGNET_SHA256, *,
    timeout: float = 60, progress: bool = True,
) -> Path:
    """Fetch the checkpoint to dest (a file, or a folder to put it in), verify its SHA-256, return its path.

    An existing file with the right digest is kept (no network), a wrong one replaced; a download with the wrong
    digest is deleted, never installed. Transfer failures raise amanlib.download.DownloadError (an OSError).
    """
    dest = resolve_dest(dest, default_checkpoint_path(), MAGNET_FILENAME)
    return download_verified(url, dest, sha256_of, sha256, "the authors' learning-based magnification checkpoint",
                             digest_name="SHA-256", env_var="AMANLIB_MAGNET_CHECKPOINT", timeout=timeout,
                             progress=progress)


def load_magnet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of the authors' MagNet from their legacy .pth.tar, with the DataParallel `module.` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learning-based magnification checkpoint not found at {path}; {WHERE_TO_GET}")
    try:
        return read_state_dict(path, "learning-based magnification checkpoint")
    except ValueError as err:
        raise ValueError(f"{err}; {WHERE_TO_GET}") from err
