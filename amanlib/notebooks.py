"""Headless execution of the numbered notebooks with papermill, parameters checked against amanlib.params."""
from __future__ import annotations

import errno
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import papermill as pm
import yaml
from filelock import FileLock, Timeout
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from . import params as schema
from . import timing

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
LOCK_NAME = ".amanlib.lock"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as text; this loader reads it as the number it looks like (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _load_yaml(text: str, where: str):
    """YAML text; a ValueError naming `where` and the line and column of the problem when it is malformed."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{where}: invalid YAML{at}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None


def parse_params(params_file: str | None = None, pairs=()) -> dict:
    """Parameters from a YAML file, then NAME VALUE pairs (VALUE read as YAML) on top.

    Malformed YAML, a missing file or a file that is not a mapping of names is a ValueError or
    FileNotFoundError naming the file (and the line); other OSErrors carry the file name."""
    params = {}
    if params_file:
        path = Path(params_file)
        if not path.exists():
            raise FileNotFoundError(f"params file {params_file} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{params_file}: not a UTF-8 text file (byte {e.start})") from None
        loaded = _load_yaml(text, str(params_file))
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"{params_file}: expected a mapping of parameter names to values")
        names = [k for k in loaded if not isinstance(k, str)]
        if names:
            raise ValueError(f"{params_file}: parameter names must be text, got {names[0]!r}")
        params.update(loaded)
    for name, value in pairs:
        params[name] = _load_yaml(value, f"-p {name} {value!r}")
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


def _results_folder(given, results_dir) -> str | os.PathLike:
    """The results folder: the `results_dir` parameter or the `results_dir` argument (not two different ones)."""
    if given is None:
        return results_dir if results_dir is not None else "results"
    if results_dir is not None and isinstance(given, (str, os.PathLike)) \
            and os.path.abspath(Path(given).expanduser()) != os.path.abspath(Path(results_dir).expanduser()):
        raise ValueError(f"results_dir: two results folders given, {str(given)!r} as a parameter and "
                         f"{str(results_dir)!r} (--results); give one")
    return given


def _check_parameters_cells(books: list[Path]) -> None:
    """The notebooks of the schema must declare exactly its parameters, or what is passed would be ignored."""
    for book in books:
        if book.stem in schema.NOTEBOOKS:
            cell, known = set(pm.inspect_notebook(str(book))), set(schema.declared(book.stem))
            if cell != known:
                extra, lacking = sorted(cell - known), sorted(known - cell)
                raise RuntimeError(
                    f"{book}: its parameters cell and amanlib/params.py disagree"
                    + (f"; only the cell declares {', '.join(extra)}" if extra else "")
                    + (f"; only amanlib/params.py declares {', '.join(lacking)}" if lacking else ""))


def _writable_folder(folder: Path) -> Path:
    """Create the results folder; a ValueError naming it when that fails or it is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"results folder {folder} cannot be created: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"results folder {folder} is not writable; choose another (--results)")
    return folder


LOCK_HELD_ENV = "AMANLIB_RESULTS_LOCKED"
"""Set by run-notebooks for its kernels to the results folder it holds the lock of, so their cells do not claim it."""


def _acquire(lock: FileLock, folder: Path) -> None:
    """Take the results-folder lock now, or stop with one line naming the folder and what to do."""
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"another run is using the results folder {folder} (it holds {folder / LOCK_NAME}); "
                           "wait for it to finish or choose another results folder (--results, or the "
                           "results_dir parameter)") from None
    except OSError as e:
        raise ValueError(f"results folder {folder}: cannot create the lock file {LOCK_NAME}: "
                         f"{e.strerror or e}") from None


@contextmanager
def _locked(folder: Path):
    """Hold folder/.amanlib.lock for the whole run; a second run into the same folder fails at once."""
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    _acquire(lock, folder)
    previous = os.environ.get(LOCK_HELD_ENV)
    os.environ[LOCK_HELD_ENV] = str(folder.resolve())  # the kernels started meanwhile inherit it
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_HELD_ENV, None)
        else:
            os.environ[LOCK_HELD_ENV] = previous
        lock.release()


_CLAIM: dict = {}  # this kernel's claimed results folder: its lock and IPython hooks


def claim_results_folder(folder: str | Path, shell=None) -> None:
    """Hold the results-folder lock while each cell of this kernel runs (JupyterLab, papermill without
    run-notebooks), so such a notebook and a run-notebooks run into the same folder never interleave: whichever
    comes second stops with one error. Every later cell claims it again before its code runs (an IPython input
    transformer; a hook could not stop the cell) and frees it when it ends, so idle kernels block nobody. Nothing
    outside IPython, or in the kernels of run-notebooks (whose process holds the lock for the whole run)."""
    folder = Path(folder).resolve()
    shell = shell if shell is not None else _ipython()
    if shell is None or os.environ.get(LOCK_HELD_ENV) == str(folder):
        return
    if _CLAIM.get("folder") != folder:
        _release_claim(shell)
        lock = FileLock(str(folder / LOCK_NAME), timeout=0)
        transform = lambda lines: ["__import__('amanlib.notebooks').notebooks._hold_claim()\n", *lines]  # noqa: E731
        free = lambda *_: lock.release(force=True) if lock.is_locked else None  # noqa: E731
        _CLAIM.update(folder=folder, lock=lock, transform=transform, free=free)
        shell.input_transformers_post.append(transform)
        shell.events.register("post_run_cell", free)
    _hold_claim()  # the cell running now


def _hold_claim() -> None:
    if _CLAIM and not _CLAIM["lock"].is_locked:
        _acquire(_CLAIM["lock"], _CLAIM["folder"])


def _release_claim(shell) -> None:
    """Forget an earlier claim of this kernel (its results_dir changed)."""
    if not _CLAIM:
        return
    shell.input_transformers_post.remove(_CLAIM["transform"])
    shell.events.unregister("post_run_cell", _CLAIM["free"])
    _CLAIM["free"]()
    _CLAIM.clear()


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def run_notebooks(params: dict | None = None, only: str | None = None, results_dir: str | Path | None = None,
                  notebooks_dir: str | Path | None = None, cell_timeout: float | None = None,
                  echo: bool = True, log=print) -> list[Path]:
    """Execute the notebooks in order into results_dir/notebooks; stop at the first failing cell.

    Every parameter is checked (amanlib.params.validate) before the first notebook starts; a parameter only
    notebooks left out by `only` read is dropped with a note to `log`. `results_dir` (default "results", or
    the `results_dir` parameter) is passed to every notebook as an absolute path, as are all path parameters,
    so figures and metrics land beside them; it must be writable and is locked for the run
    (results_dir/.amanlib.lock): a second run into it fails at once. Headless, so `show_widgets` defaults
    to False. `cell_timeout` (seconds) turns a cell that never finishes into an error naming the notebook and
    cell; `echo` streams the kernels' output (progress included) to this process's stdout/stderr as it comes.
    Seconds per notebook and stage (amanlib.timing) end the run and go to results_dir/timing.json.
    Notebooks outside amanlib.params (a notebooks folder of one's own) take the parameters their cells declare.
    """
    params = dict(params or {})
    params["results_dir"] = _results_folder(params.get("results_dir"), results_dir)
    books = notebook_list(notebooks_dir, only)
    custom = {b.stem: set(pm.inspect_notebook(str(b))) for b in books if b.stem not in schema.NOTEBOOKS}
    values = schema.validate(params, [b.stem for b in books], custom=custom, log=log)
    _check_parameters_cells(books)
    results_dir = Path(values.get("results_dir") or os.path.abspath(params["results_dir"]))
    reads = {b: custom[b.stem] if b.stem in custom else set(schema.declared(b.stem)) for b in books}
    out_dir = _writable_folder(results_dir) / "notebooks"
    done, stages = [], {}
    with _locked(results_dir):
        out_dir.mkdir(exist_ok=True)
        for book in books:
            mine = {k: v for k, v in values.items() if k in reads[book]}
            if "show_widgets" in reads[book]:
                mine.setdefault("show_widgets", False)
            log(f"running {book.name} with {mine}")
            start = time.perf_counter()
            _execute(book, out_dir, mine, cell_timeout, echo)
            seconds = time.perf_counter() - start
            stages[book.stem] = timing.notebook_stages(out_dir / book.name, seconds)
            log(f"finished {book.name} in {seconds:.0f} s")
            done.append(out_dir / book.name)
        timing.record(results_dir, stages, values.get("device", "auto"))
    log(timing.table(stages))
    return done


def _execute(book: Path, out_dir: Path, parameters: dict, cell_timeout: float | None, echo: bool) -> None:
    out = out_dir / book.name
    partial = out.with_name(f"{book.stem}.partial.ipynb")  # papermill writes as cells run; only whole files become out
    try:
        with _headless_env():
            pm.execute_notebook(str(book), str(partial), parameters=parameters, cwd=str(book.parent),
                                progress_bar=False, kernel_name="python3", start_timeout=120,
                                execution_timeout=cell_timeout, stdout_file=sys.stdout if echo else None,
                                stderr_file=sys.stderr if echo else None)
    except (pm.PapermillExecutionError, CellTimeoutError, DeadKernelError, OSError) as e:
        kept = (f"executed notebook kept at {out}" if _publish(partial, out) else
                "the executed notebook could not be written whole (disk full?) and is not kept")
        kept += f"; completed notebooks before it are in {out_dir}"
        if isinstance(e, pm.PapermillExecutionError):
            raise RuntimeError(f"{book.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} ({kept})") from None
        if isinstance(e, CellTimeoutError):
            cell = " ".join(str(e).split("preview of the cell contents:")[-1].split())[:200]
            raise RuntimeError(f"{book.name}: a cell ran longer than cell_timeout={cell_timeout} s and was "
                               f"stopped: {cell} ({kept})") from None
        if isinstance(e, DeadKernelError):
            raise RuntimeError(f"{book.name}: the kernel died ({e}); out of memory? ({kept})") from None
        if e.filename or not e.strerror:  # disk full, permissions...: the error names its file
            raise
        raise OSError(e.errno, e.strerror, str(out)) from e
    if not _publish(partial, out):
        raise OSError(errno.EIO, "the executed notebook could not be written whole (disk full?)", str(out))


def _publish(partial: Path, out: Path) -> bool:
    """Move an executed notebook into place when it is whole; remove a cut one (and the older `out` it replaces)."""
    try:
        nbformat.read(partial, as_version=4)
    except Exception:  # missing, cut mid-JSON, ...
        partial.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        return False
    os.replace(partial, out)
    return True