"""FER+ checkpoint download against a local HTTP server: verified install, no refetch, nothing half-written."""
import http.server
import logging
import os
import socket
import subprocess
import threading
from urllib.parse import unquote

import pytest

from amanlib import fer
from amanlib.download import DownloadError
from amanlib.fer import (
    FER_FILENAME,
    default_fer_path,
    download_fer_checkpoint,
    find_fer_checkpoint,
    git_blob_sha1,
)

PAYLOAD = os.urandom(300_000)
TRUNCATED_AT = 120_000


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good: the payload; /truncated: a Content-Length of the whole payload, part of it, then a close; else 404."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in ("/good", "/truncated"):
            self.send_error(404, "no such file")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD if self.path == "/good" else PAYLOAD[:TRUNCATED_AT])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def _server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def server(_server):
    """The module's server with its request log emptied; `.url(name)` is the address of /name."""
    _server.requests.clear()
    _server.url = lambda name: f"http://127.0.0.1:{_server.server_address[1]}/{name}"
    return _server


@pytest.fixture(scope="module")
def payload_sha1(tmp_path_factory):
    """The payload's git blob SHA-1 as the git binary computes it."""
    path = tmp_path_factory.mktemp("payload") / "payload.bin"
    path.write_bytes(PAYLOAD)
    return git_hash_object(path)


@pytest.fixture(autouse=True)
def _no_home_cache(monkeypatch, tmp_path):
    """Every test sees its own HOME and no $AMANLIB_FER_CHECKPOINT, so nothing touches the user's cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(fer.FER_ENV, raising=False)


def git_hash_object(path) -> str:
    return subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True,
                          cwd=path.parent).stdout.strip()


def free_port() -> int:
    """A port with nothing listening on it (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the hash

@pytest.mark.parametrize("content", [b"", b"hello\n", PAYLOAD], ids=["empty", "text", "payload"])
def test_git_blob_sha1_equals_git_hash_object(tmp_path, monkeypatch, content):
    path = tmp_path / "f.bin"
    path.write_bytes(content)
    expected = git_hash_object(path)
    assert git_blob_sha1(path) == expected
    monkeypatch.setattr(fer, "CHUNK", 4097)  # many chunks: the streamed hash is the same
    assert git_blob_sha1(path) == expected
    if not content:
        assert expected == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's well-known empty blob


# ---------------------------------------------------------------- download_fer_checkpoint

def test_good_download_is_installed_and_not_fetched_again(server, payload_sha1, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AMANLIB_PROGRESS", "auto")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    got = download_fer_checkpoint(folder, url=server.url("good"), blob_sha1=payload_sha1)
    assert got == folder / FER_FILENAME and got.read_bytes() == PAYLOAD
    assert sorted(p.name for p in folder.iterdir()) == [FER_FILENAME]  # no temporary file left
    assert server.requests == ["/good"]
    assert "100%" in capsys.readouterr().err  # the byte progress bar ran to the end
    again = download_fer_checkpoint(got, url=server.url("good"), blob_sha1=payload_sha1, progress=False)
    assert again == got and server.requests == ["/good"]  # verified on disk, no second request
    assert capsys.readouterr().err == ""


def test_wrong_hash_installs_nothing_and_names_the_expected_hash(server, payload_sha1, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    expected = "0123456789abcdef0123456789abcdef01234567"
    with pytest.raises(ValueError, match=f"git blob SHA-1 {expected}") as info:
        download_fer_checkpoint(folder, url=server.url("good"), blob_sha1=expected, progress=False)
    assert server.url("good") in str(info.value) and f"SHA-1 {payload_sha1}" in str(info.value)
    assert list(folder.iterdir()) == []


def test_truncated_transfer_is_an_error_naming_the_byte_counts(server, payload_sha1, tmp_path):
    dest = tmp_path / "ckpt" / "fer.pth.tar"
    with pytest.raises(DownloadError, match=f"{TRUNCATED_AT} of {len(PAYLOAD)} bytes") as info:
        download_fer_checkpoint(dest, url=server.url("truncated"), blob_sha1=payload_sha1, progress=False)
    assert server.url("truncated") in str(info.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_server_down_says_how_to_do_without_the_network(payload_sha1, tmp_path):
    dest = tmp_path / "fer.pth.tar"
    url = f"http://127.0.0.1:{free_port()}/good"
    with pytest.raises(OSError, match="AMANLIB_FER_CHECKPOINT") as info:
        download_fer_checkpoint(dest, url=url, blob_sha1=payload_sha1, timeout=5, progress=False)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_the_status_and_url(server, payload_sha1, tmp_path):
    with pytest.raises(OSError, match="HTTP 404") as info:
        download_fer_checkpoint(tmp_path, url=server.url("missing"), blob_sha1=payload_sha1, progress=False)
    assert server.url("missing") in str(info.value) and list(tmp_path.iterdir()) == []


def test_existing_wrong_file_is_deleted_and_downloaded_again(server, payload_sha1, tmp_path, caplog):
    dest = tmp_path / FER_FILENAME
    dest.write_bytes(b"an older, different checkpoint")
    with caplog.at_level(logging.WARNING, logger="amanlib.download"):
        got = download_fer_checkpoint(dest, url=server.url("good"), blob_sha1=payload_sha1, progress=False)
    assert got == dest and dest.read_bytes() == PAYLOAD and server.requests == ["/good"]
    assert f"{dest} has git blob SHA-1" in caplog.text and "deleting it" in caplog.text


def test_existing_wrong_file_is_gone_when_the_download_fails(server, payload_sha1, tmp_path):
    dest = tmp_path / FER_FILENAME
    dest.write_bytes(b"an older, different checkpoint")
    with pytest.raises(DownloadError):
        download_fer_checkpoint(dest, url=server.url("truncated"), blob_sha1=payload_sha1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_location_and_env_variable(server, payload_sha1, tmp_path, monkeypatch):
    assert default_fer_path() == tmp_path / "home" / ".cache" / "amanlib" / FER_FILENAME
    target = tmp_path / "elsewhere" / "fer.pth.tar"
    monkeypatch.setenv("AMANLIB_FER_CHECKPOINT", str(target))
    assert default_fer_path() == target
    assert download_fer_checkpoint(url=server.url("good"), blob_sha1=payload_sha1, progress=False) == target
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "home").exists()


# ---------------------------------------------------------------- find_fer_checkpoint

@pytest.fixture
def served_as_fer(server, payload_sha1, monkeypatch, tmp_path):
    """Point the module's URL and hash at the local server's payload; the checkpoint goes under tmp_path."""
    monkeypatch.setattr(fer, "FER_URL", server.url("good"))
    monkeypatch.setattr(fer, "FER_BLOB_SHA1", payload_sha1)
    monkeypatch.setenv("AMANLIB_FER_CHECKPOINT", str(tmp_path / "fer" / FER_FILENAME))
    return tmp_path / "fer" / FER_FILENAME


def test_find_without_download_is_none_when_absent(served_as_fer, server):
    assert find_fer_checkpoint(download=False) is None
    assert server.requests == [] and not served_as_fer.exists()


def test_find_downloads_then_finds_on_disk(served_as_fer, server):
    assert find_fer_checkpoint(download=True) == served_as_fer and served_as_fer.read_bytes() == PAYLOAD
    assert find_fer_checkpoint(download=False) == served_as_fer and server.requests == ["/good"]


def test_find_falls_back_to_none_when_the_network_is_down(served_as_fer, monkeypatch, caplog):
    url = f"http://127.0.0.1:{free_port()}/good"
    monkeypatch.setattr(fer, "FER_URL", url)
    with caplog.at_level(logging.WARNING, logger="amanlib.fer"):
        assert find_fer_checkpoint(download=True) is None
    assert url in caplog.text and "falling back" in caplog.text


def test_find_refuses_a_wrong_file_and_keeps_it(served_as_fer, server):
    served_as_fer.parent.mkdir()
    served_as_fer.write_bytes(b"not the checkpoint")
    with pytest.raises(ValueError, match=f"expected {fer.FER_BLOB_SHA1}") as info:
        find_fer_checkpoint(download=True)
    assert str(served_as_fer) in str(info.value) and "delete it" in str(info.value)
    assert served_as_fer.read_bytes() == b"not the checkpoint" and server.requests == []


def test_find_does_not_hide_a_download_with_the_wrong_hash(served_as_fer, monkeypatch):
    monkeypatch.setattr(fer, "FER_BLOB_SHA1", "f" * 40)
    with pytest.raises(ValueError, match="f" * 40):
        find_fer_checkpoint(download=True)
    assert not served_as_fer.exists()


def test_published_url_names_the_file_with_its_plus_encoded():
    assert fer.FER_URL.startswith("https://raw.githubusercontent.com/weimengting/AMAN/")
    assert "+" not in fer.FER_URL and unquote(fer.FER_URL).endswith(f"/assets/{FER_FILENAME}")
