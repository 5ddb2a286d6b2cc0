"""Shared fixtures: the reference material lives outside the repo (../shared/reference by default)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("AMANLIB_REFERENCE", REPO.parent / "shared" / "reference"))


def reference_path(*parts: str) -> Path:
    """Path inside the reference folder; skips the test, naming what is missing, when it is absent."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (set AMANLIB_REFERENCE to the shared/reference folder)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs on CI) for every test that needs one: starting Ray takes 5-20 s."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    from amanlib.executors import make_executor
    executor = make_executor("ray")
    yield executor
    executor.close()
    assert not ray.is_initialized(), "close() must stop the Ray instance the executor started"


@pytest.fixture
def reference():
    return reference_path


def count_calls(monkeypatch, module, name: str, real, crash_on: int | None = None) -> list:
    """Replace module.name by a wrapper of `real` that records each call; call number `crash_on` raises
    KeyboardInterrupt, standing in for a Ctrl-C in the middle of a long run. Returns the list of calls."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_on:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls
