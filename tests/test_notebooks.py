"""The notebooks: committed clean, and executed end to end by papermill on tiny parameters."""
import io
import json
import os
import re
import shlex
from pathlib import Path

import nbformat
import pytest

from amanlib import results as results_lib, stats
from amanlib.cli import main
from amanlib.notebooks import notebook_list, parse_params, run_notebooks
from conftest import REFERENCE
from test_results import check_oracle_and_by_motion

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_dataset_prep", "02_magnification", "03_feature_extraction", "04_training", "05_confusion_analysis"]


def test_committed_notebooks_are_clean_and_parameterised():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert not any(c.outputs or c.execution_count for c in code), f"{path.name} carries outputs"
        tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        assert "results_dir" in tagged[0].source


def test_params_and_selection(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("epochs: 3\nfactors: [2, 4]\n")
    assert parse_params(str(f), [("epochs", "5"), ("fer_checkpoint", "null")]) == {
        "epochs": 5, "factors": [2, 4], "fer_checkpoint": None}
    assert [p.name[:2] for p in notebook_list(only="4,03")] == ["03", "04"]
    with pytest.raises(ValueError, match="09"):
        notebook_list(only="09")
    with pytest.raises(ValueError, match="epoch_count"):
        run_notebooks({"epoch_count": 3}, results_dir=tmp_path)


def _one_cell_notebooks(folder: Path, name: str, source: str) -> Path:
    """A folder holding one numbered notebook: a parameters cell, then `source`."""
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("results_dir = '.'")
    params.metadata["tags"] = ["parameters"]
    book.cells = [params, nbformat.v4.new_code_cell(source)]
    folder.mkdir()
    nbformat.write(book, folder / name)
    return folder


def test_a_failing_cell_names_notebook_and_error(tmp_path):
    books = _one_cell_notebooks(tmp_path / "nb", "01_fails.ipynb", "raise KeyError('no such clip sub99/EP01')")
    with pytest.raises(RuntimeError, match=r"01_fails.ipynb failed in cell .*KeyError.*sub99/EP01"):
        run_notebooks({}, results_dir=tmp_path / "out", notebooks_dir=books)
    assert (tmp_path / "out" / "notebooks" / "01_fails.ipynb").exists()


def test_a_cell_that_never_finishes_is_stopped_with_a_clear_error(tmp_path):
    books = _one_cell_notebooks(tmp_path / "nb", "01_hangs.ipynb", "import time\ntime.sleep(600)")
    with pytest.raises(RuntimeError, match=r"01_hangs.ipynb: a cell ran longer than cell_timeout=3 s "
                                           r"and was stopped: .*time.sleep\(600\)"):
        run_notebooks({}, results_dir=tmp_path / "out", notebooks_dir=books, cell_timeout=3)


def test_progress_bars_follow_amanlib_progress(monkeypatch):
    from tqdm.std import tqdm as text_bar
    from amanlib.runtime import progress_bar
    monkeypatch.setenv("AMANLIB_PROGRESS", "text")
    out = io.StringIO()
    bar = progress_bar(range(3), desc="folds", file=out)
    assert isinstance(bar, text_bar) and bar.mininterval == 5.0
    for _ in bar:
        bar.set_postfix(uf1=0.5)  # no line of its own: the next timed refresh shows it
    assert out.getvalue().count("folds:") == 2 and "100%" in out.getvalue()  # the start and the end
    assert progress_bar(range(3), leave=False, file=out).disable  # nested, transient bars stay out of logs
    monkeypatch.setenv("AMANLIB_PROGRESS", "off")
    assert progress_bar(range(3)).disable
    monkeypatch.setenv("AMANLIB_PROGRESS", "widgets")
    with pytest.raises(ValueError, match="AMANLIB_PROGRESS='widgets'"):
        progress_bar(range(3))


def test_a_text_progress_line_shows_the_time_left(monkeypatch):
    """A long stage says early how long it will take: after a few units the log line holds tqdm's estimate."""
    import time
    from amanlib.runtime import progress_bar
    monkeypatch.setenv("AMANLIB_PROGRESS", "text")
    out = io.StringIO()
    bar = progress_bar(total=100, desc="pre-training", file=out, mininterval=0)
    for _ in range(3):
        time.sleep(0.01)
        bar.update()
    lines = [line for line in re.split(r"[\r\n]", out.getvalue()) if line.strip()]
    assert "<?" in lines[0] and re.search(r"3/100 \[\d\d:\d\d<\d\d:\d\d", lines[-1]), lines


@pytest.mark.slow
def test_notebooks_run_end_to_end_on_tiny_parameters(tmp_path, monkeypatch, capsys):
    magnet = REFERENCE / "magnet" / "learning_based_mag.pth.tar"
    learning = magnet.exists()  # CI has it; elsewhere the classic magnifiers stand in (said in the test name below)
    if learning:
        monkeypatch.setenv("AMANLIB_MAGNET_CHECKPOINT", str(magnet))
    logs = REFERENCE / "megc_logs"
    params = {
        "data_dir": str(tmp_path / "data"), "synthetic_subjects": 3, "synthetic_clips_per_subject": 3,
        "methods": ["learning", "eulerian", "phase"] if learning else ["eulerian", "phase"], "factors": [2, 4],
        "sweep_factors": [1, 4],
        "magnifier": "learning" if learning else "eulerian", "download_magnet": False, "n_frames": 2,
        "backbone": "random", "fidelity": "authors", "epochs": 2, "other_logs": str(logs) if logs.exists() else None,
    }
    monkeypatch.chdir(tmp_path)
    argv = readme_batch_command(seed=0, rule="fixed") + ["--cell-timeout", "600"]
    for name, value in params.items():
        argv += ["-p", name, json.dumps(value)]
    assert main(argv) == 0  # the README's own batch example, on tiny parameters
    results = tmp_path / "runs" / "fixed-0"
    done = sorted((results / "notebooks").glob("*.ipynb"))
    assert [p.stem for p in done] == EXPECTED
    for path in done:
        book = nbformat.read(path, as_version=4)
        outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert not widgets, f"{path.name}: a headless run made widgets (progress bars or interact)"
    streamed = capsys.readouterr()
    assert "training (variants x seeds x folds)" in streamed.err  # text progress streamed from the kernels
    assert "04_training" in streamed.out and "total" in streamed.out.splitlines()[-1]  # seconds per notebook
    timing = json.loads((results / "timing.json").read_text())  # and per stage, read back from the notebooks
    assert list(timing["notebooks"]) == EXPECTED
    assert {"pre-training", "magnification + features", "training", "statistics", "figures"} <= \
        set(timing["notebooks"]["03_feature_extraction"]) | set(timing["notebooks"]["04_training"])
    assert "pre-training" in streamed.out and "magnification + features" in streamed.out
    figures = {p.name for p in (results / "figures").glob("*.png")}
    for name in ["01_dataset_overview.png", "01_onset_apex_offset.png", "02_magnification.png",
                 "04_learning_curves.png", "04_ablations.png", "05_confusion.png", "05_alpha_by_class.png",
                 "05_beta_by_class.png", "05_protocol_gap.png", "04_comparisons.png", "05_mechanism.png",
                 "05_accuracy_by_motion.png", "05_oracle_vs_preferred.png"]:
        assert name in figures and (results / "figures" / name).stat().st_size > 5000, name
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["dataset"] == "synthetic" and metrics["clips"] == 9
    assert metrics["label_protocol"] == "megc2019_3class" and metrics["epoch_selection"] == "fixed"
    assert metrics["model"] == "AMAN, frozen layer4" and metrics["backbone"] == "random"
    assert metrics["fidelity"] == {"name": "authors", "trunk_bn": "frame_batch", "layer4_bn": "per_slice",
                                   "layer4_init": "random"}
    assert metrics["factors"] == [1.0, 2.0, 4.0]
    assert (results / metrics["run_dir"] / "predictions.csv").exists()
    assert not Path(metrics["run_dir"]).is_absolute()  # the results folder can be moved or committed
    for key in ("uf1", "uar", "accuracy"):
        assert 0 <= metrics[key] <= 1
    assert set(metrics["ablations"]) == {"AMAN", "magnification attention only", "frame attention only",
                                         "no magnification", "single factor 2", "single factor 4",
                                         "oracle factor (truth)"}  # the positive control, on synthetic data
    assert metrics["ablations"]["AMAN"]["uf1"] == pytest.approx(metrics["uf1"])
    again = stats.bootstrap_scores(results_lib.sweep_predictions(results, metrics))  # from the runs it names
    assert {v: again.loc[v, "uf1"] for v in again.index} == pytest.approx(
        {v: a["uf1"] for v, a in metrics["ablations"].items()}, abs=1e-12)
    assert metrics["seeds"] == [0, 1, 2, 3, 4] and len(metrics["run_dirs"]) == 5  # notebook 04's default
    assert len(metrics["comparisons"]) == 2 * 6 and metrics["mechanism"]["n"] == 9
    check_oracle_and_by_motion(metrics)
    lo, hi = metrics["uf1_ci"]
    assert lo <= metrics["uf1"] <= hi
    assert metrics["protocol_gap"]["best epoch on test subject (optimistic)"]["accuracy"] >= metrics["accuracy"]
    if logs.exists():
        assert (results / "figures" / "05_confusion_ststnet_log.png").exists()
    rerun_as_in_jupyterlab(results, params)


def readme_batch_command(seed: int, rule: str) -> list[str]:
    """The run-notebooks arguments of README's batch example for one seed and epoch rule."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"for seed in .*?done; done", readme, re.S).group(0)
    line = next(line for line in block.replace("\\\n", " ").splitlines() if "run-notebooks" in line)
    args = shlex.split(line.replace("$seed", str(seed)).replace("$rule", rule))
    return args[args.index("run-notebooks"):]


def _cache_folders(results: Path) -> set:
    return {p.relative_to(results) for p in (results / "work").glob("*/*") if p.is_dir()}


def rerun_as_in_jupyterlab(results: Path, params: dict) -> None:
    """Run 01..05 again as JupyterLab does after `make reproduce`: from notebooks/, the results folder given
    relative to it. Every cache must be found again (no new folder) and the numbers must be the same."""
    import papermill as pm

    from amanlib.notebooks import NOTEBOOKS_DIR
    before, metrics = _cache_folders(results), json.loads((results / "metrics.json").read_text())
    (results / "jupyterlab").mkdir()
    relative = {**params, "results_dir": os.path.relpath(results, NOTEBOOKS_DIR), "show_widgets": False,
                "data_dir": os.path.relpath(params["data_dir"], NOTEBOOKS_DIR)}
    for book in notebook_list():
        mine = {k: v for k, v in relative.items() if k in pm.inspect_notebook(str(book))}
        pm.execute_notebook(str(book), str(results / "jupyterlab" / book.name), parameters=mine, cwd=str(NOTEBOOKS_DIR),
                            progress_bar=False, kernel_name="python3", execution_timeout=600)
    assert _cache_folders(results) == before
    again = json.loads((results / "metrics.json").read_text())
    assert {k: again[k] for k in ("uf1", "uar", "run_dir")} == {k: metrics[k] for k in ("uf1", "uar", "run_dir")}


def test_jupyterlab_saves_widget_state_in_the_project_venv():
    """A notebook saved in JupyterLab keeps its widgets' state, so reopening it shows no 'Error displaying widget'."""
    import sys
    venv = Path(__file__).resolve().parents[1] / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip(f"not running in the project's .venv ({sys.prefix}); `make setup` writes the setting there")
    overrides = json.loads((venv / "share" / "jupyter" / "lab" / "settings" / "overrides.json").read_text())
    assert overrides["@jupyter-widgets/jupyterlab-manager:plugin"]["saveState"] is True
