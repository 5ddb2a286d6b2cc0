"""Headless execution of the numbered notebooks with papermill, parameters checked against each notebook."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import papermill as pm
import yaml
from nbclient.exceptions import CellTimeoutError, DeadKernelError

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def parse_params(params_file: str | None = None, pairs=()) -> dict:
    """Parameters from a YAML file, then NAME VALUE pairs (VALUE read as YAML) on top."""
    params = {}
    if params_file:
        loaded = yaml.safe_load(Path(params_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{params_file}: expected a mapping of parameter names to values")
        params.update(loaded)
    for name, value in pairs:
        params[name] = yaml.safe_load(value)
    return params


def notebook_list(notebooks_dir: str | Path | None = None, only: str | None = None) -> list[Path]:
    folder = Path(notebooks_dir) if notebooks_dir else NOTEBOOKS_DIR
    books = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    if only:
        wanted = {w.strip().zfill(2) for w in only.split(",") if w.strip()}
        unknown = wanted - {b.name[:2] for b in books}
        if unknown:
            raise ValueError(f"--only {only}: no notebook numbered {sorted(unknown)} in {folder}")
        books = [b for b in books if b.name[:2] in wanted]
    return books


@contextmanager
def _headless_env():
    """Kernels started inside inherit AMANLIB_PROGRESS=text (unless the user chose otherwise): plain-text
    progress bars that stream to this terminal instead of widgets nobody sees."""
    before = os.environ.get("AMANLIB_PROGRESS")
    os.environ.setdefault("AMANLIB_PROGRESS", "text")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("AMANLIB_PROGRESS", None)


def run_notebooks(params: dict | None = None, only: str | None = None, results_dir: str | Path = "results",
                  notebooks_dir: str | Path | None = None, cell_timeout: float | None = None,
                  echo: bool = True, log=print) -> list[Path]:
    """Execute the notebooks in order into results_dir/notebooks; stop at the first failing cell.

    `results_dir` is passed to every notebook (as an absolute path) so figures and metrics land beside them.
    Headless, so `show_widgets` defaults to False. `cell_timeout` (seconds) turns a cell that never
    finishes into an error naming the notebook and cell; `echo` streams the kernels' output (progress
    included) to this process's stdout/stderr as it comes.
    """
    params = dict(params or {})
    results_dir = Path(results_dir).resolve()
    params.setdefault("results_dir", str(results_dir))
    books = notebook_list(notebooks_dir, only)
    declared = {b: set(pm.inspect_notebook(str(b))) for b in books}
    unknown = set(params) - set().union(*declared.values())
    if unknown:
        raise ValueError(f"parameters {sorted(unknown)} are not defined by any of "
                         f"{[b.name for b in books]}; see their 'parameters' cells")
    params.setdefault("show_widgets", False)
    out_dir = results_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for book in books:
        mine = {k: v for k, v in params.items() if k in declared[book]}
        log(f"running {book.name} with {mine}")
        start = time.perf_counter()
        kept = f"executed notebook kept at {out_dir / book.name}; completed notebooks before it are in {out_dir}"
        try:
            with _headless_env():
                pm.execute_notebook(str(book), str(out_dir / book.name), parameters=mine, cwd=str(book.parent),
                                    progress_bar=False, kernel_name="python3", start_timeout=120,
                                    execution_timeout=cell_timeout, stdout_file=sys.stdout if echo else None,
                                    stderr_file=sys.stderr if echo else None)
        except pm.PapermillExecutionError as e:
            raise RuntimeError(f"{book.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} ({kept})") from None
        except CellTimeoutError as e:
            cell = " ".join(str(e).split("preview of the cell contents:")[-1].split())[:200]
            raise RuntimeError(f"{book.name}: a cell ran longer than cell_timeout={cell_timeout} s and was "
                               f"stopped: {cell} ({kept})") from None
        except DeadKernelError as e:
            raise RuntimeError(f"{book.name}: the kernel died ({e}); out of memory? ({kept})") from None
        log(f"finished {book.name} in {time.perf_counter() - start:.0f} s")
        done.append(out_dir / book.name)
    return done
