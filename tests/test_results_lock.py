"""One writer per results folder whichever way a notebook runs (issue 22): a notebook executed in JupyterLab or by
papermill claims the folder's lock while each of its cells runs, the lock run-notebooks holds for a whole run."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import papermill as pm
import pytest
from filelock import FileLock, Timeout

from amanlib import notebooks
from amanlib.notebooks import LOCK_HELD_ENV, LOCK_NAME, claim_results_folder

NOTEBOOK_01 = Path(__file__).resolve().parents[1] / "notebooks" / "01_dataset_prep.ipynb"


@pytest.fixture
def other_process(tmp_path):
    """Hold folder/.amanlib.lock from another process, as a run-notebooks run does, until the test ends."""
    procs = []

    def hold(folder: Path):
        code = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
                "print('held', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


class FakeShell:
    """What claim_results_folder uses of an IPython shell."""

    def __init__(self):
        self.input_transformers_post, self.hooks = [], {}
        self.events = SimpleNamespace(register=lambda name, fn: self.hooks.setdefault(name, []).append(fn),
                                      unregister=lambda name, fn: self.hooks[name].remove(fn))

    def run_cell(self, lines):
        """Transform a cell as IPython does, run it (exec) and fire post_run_cell."""
        for transform in self.input_transformers_post:
            lines = transform(lines)
        try:
            exec("".join(lines), {})
        finally:
            for fn in self.hooks.get("post_run_cell", []):
                fn(None)


def _free(folder: Path) -> bool:
    """Whether another lock object (as another process would) can take the folder's lock now."""
    lock = FileLock(str(folder / LOCK_NAME), timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        return False
    lock.release()
    return True


def test_a_kernel_holds_the_folder_while_a_cell_runs_and_frees_it_between_cells(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCK_HELD_ENV, raising=False)
    monkeypatch.setattr(notebooks, "_CLAIM", {})
    shell = FakeShell()
    claim_results_folder(tmp_path, shell)
    assert notebooks._CLAIM["lock"].is_locked  # the first cell, which claims, holds it
    shell.hooks["post_run_cell"][0](None)
    assert not notebooks._CLAIM["lock"].is_locked and _free(tmp_path)  # an idle kernel blocks nobody
    shell.run_cell(["import amanlib.notebooks as n\n", "assert n._CLAIM['lock'].is_locked\n"])  # held in every cell
    assert not notebooks._CLAIM["lock"].is_locked
    claim_results_folder(tmp_path / "other", shell)  # results_dir changed: the old claim is dropped
    assert len(shell.input_transformers_post) == 1 and notebooks._CLAIM["folder"] == (tmp_path / "other").resolve()
    shell.hooks["post_run_cell"][0](None)


def test_a_cell_stops_when_another_run_holds_the_folder(tmp_path, monkeypatch, other_process):
    monkeypatch.delenv(LOCK_HELD_ENV, raising=False)
    monkeypatch.setattr(notebooks, "_CLAIM", {})
    shell = FakeShell()
    claim_results_folder(tmp_path, shell)
    shell.hooks["post_run_cell"][0](None)
    proc = other_process(tmp_path)  # a run-notebooks run starts between two cells
    with pytest.raises(RuntimeError, match=f"another run is using the results folder {tmp_path}"):
        shell.run_cell(["raise AssertionError('the cell must not run')\n"])
    proc.kill()
    proc.wait()
    monkeypatch.setenv(LOCK_HELD_ENV, str((tmp_path / "mine").resolve()))  # run-notebooks' own kernels: no claim
    monkeypatch.setattr(notebooks, "_CLAIM", {})
    claim_results_folder(tmp_path / "mine", shell)
    assert not notebooks._CLAIM


@pytest.mark.slow
def test_a_notebook_run_by_papermill_stops_while_run_notebooks_holds_its_folder(tmp_path, monkeypatch,
                                                                               other_process):
    """The issue's case: a CLI run holds the folder and notebook 04 (here 01) is executed directly into it."""
    monkeypatch.delenv(LOCK_HELD_ENV, raising=False)
    results = tmp_path / "results"
    results.mkdir()
    other_process(results)
    with pytest.raises(pm.PapermillExecutionError, match="another run is using the results folder"):
        pm.execute_notebook(str(NOTEBOOK_01), str(tmp_path / "out.ipynb"), cwd=str(NOTEBOOK_01.parent),
                            parameters={"results_dir": str(results), "data_dir": str(tmp_path / "data")},
                            progress_bar=False, kernel_name="python3")
    assert not (results / "clips.csv").exists() and not list(results.glob("*.json"))
