"""Fetch a published file over HTTP(S) and install it only once its digest matches the expected one."""
from __future__ import annotations

import http.client
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from amanlib.runtime import atomic_write, progress_bar

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TRANSPORT_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class DownloadError(ConnectionError):
    """The file could not be transferred: server unreachable, HTTP error, timeout or a body cut short."""


def resolve_dest(dest: str | Path | None, default: Path, filename: str) -> Path:
    """The file a download goes to: `default` when dest is None, dest/filename when dest is a folder."""
    path = Path(dest) if dest is not None else Path(default)
    return path / filename if path.is_dir() else path


def download_verified(
    url: str,
    dest: str | Path,
    digest_fn: Callable[[Path], str],
    expected: str,
    what: str,
    *,
    digest_name: str = "SHA-256",
    env_var: str | None = None,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Make dest hold the file from url whose digest_fn is `expected`, and return dest.

    A matching file at dest is kept (no network); a wrong one is deleted and downloaded again. The bytes go to a
    temporary file next to dest, renamed into place only when complete and matching, so dest is never wrong.
    """
    dest = Path(dest)
    if dest.is_file():
        actual = digest_fn(dest)
        if actual == expected:
            return dest
        log.warning("%s has %s %s, expected %s: it is not %s; deleting it and downloading again from %s",
                    dest, digest_name, actual, expected, what, url)
        dest.unlink()
    manual = (f"instead, put the file ({digest_name} {expected}) at {dest} yourself"
              + (f", or set ${env_var} to where it is" if env_var else ""))

    def fetch(tmp: Path) -> None:
        _transfer(url, tmp, timeout, progress, failure=f"could not download {what} from {url}", hint=manual)
        actual = digest_fn(tmp)
        if actual != expected:
            raise ValueError(f"download from {url} has {digest_name} {actual}, expected {digest_name} {expected}: "
                             f"it is not {what}; nothing was written to {dest}")

    log.info("downloading %s from %s to %s", what, url, dest)
    return atomic_write(dest, fetch)


def _transfer(url: str, path: Path, timeout: float, progress: bool, failure: str, hint: str) -> None:
    """Copy the body at url to path in chunks, checking it against Content-Length; a DownloadError otherwise."""
    received, length = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as fh:
            length = _content_length(response)
            with progress_bar(total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                              disable=not progress or length is None) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
    except http.client.IncompleteRead as e:
        received += len(e.partial)
        raise DownloadError(f"{failure}: the transfer ended early, {received} of {length} bytes received; "
                            f"{hint}") from e
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{failure}: HTTP {e.code} {e.reason}; {hint}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"{failure}: {e.reason}; {hint}") from e
    except TRANSPORT_ERRORS as e:
        raise DownloadError(f"{failure}: {type(e).__name__}: {e} after {received} bytes; {hint}") from e
    if length is not None and received < length:
        raise DownloadError(f"{failure}: the transfer ended early, {received} of {length} bytes received; {hint}")


def _content_length(response) -> int | None:
    """The announced body size in bytes, or None when the server does not say (chunked transfer)."""
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None
