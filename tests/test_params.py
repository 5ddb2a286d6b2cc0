"""The notebook parameters: checked before any notebook runs, every user error one line and exit code 2."""
import ast
import errno
import inspect
import math
import os
import shutil
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from filelock import FileLock

from amanlib import cli, params
from amanlib.notebooks import LOCK_NAME, parse_params, run_notebooks

REPO_NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _notebooks_folder(folder: Path, names=params.NOTEBOOKS) -> Path:
    """Notebooks named like the real ones whose parameters cells declare the schema's defaults, nothing else."""
    folder.mkdir()
    for name in names:
        book = nbformat.v4.new_notebook()
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.declared(name).items()))
        cell.metadata["tags"] = ["parameters"]
        book.cells = [cell]
        nbformat.write(book, folder / f"{name}.ipynb")
    return folder


@pytest.fixture
def books(tmp_path):
    return _notebooks_folder(tmp_path / "nb")


@pytest.fixture
def executed(monkeypatch):
    """papermill's execute replaced by a recorder: (notebook name, parameters) of each call; nothing runs (the
    notebook is copied as it is, as papermill writes its output)."""
    calls = []

    def record(src, out, parameters=None, **kw):
        calls.append((Path(src).stem, dict(parameters)))
        shutil.copyfile(src, out)

    monkeypatch.setattr(pm, "execute_notebook", record)
    return calls


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def _one_error(capsys, *argv) -> str:
    """Run the command line; assert it failed with exactly one line "amanlib <command>: error: ..."."""
    code, err = _cli(capsys, *argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"amanlib {argv[0]}: error: "), err
    return err[0]


# --- the schema -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("notebook", params.NOTEBOOKS)
def test_schema_matches_the_notebooks_parameters_cells(notebook):
    cell = pm.inspect_notebook(str(REPO_NOTEBOOKS / f"{notebook}.ipynb"))
    assert {k: ast.literal_eval(v["default"]) for k, v in cell.items()} == params.declared(notebook)
    assert sorted(p.stem for p in REPO_NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == list(params.NOTEBOOKS)


@pytest.mark.parametrize("notebook", params.NOTEBOOKS)
def test_the_parameters_cells_are_the_schema_rendered(notebook):
    """Each setting is declared once, in params.py: its notebook's parameters cell (default, type, help, choices) is
    rendered from it, and papermill --help-notebook reads the types."""
    book = nbformat.read(REPO_NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    cell = next(c for c in book.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == params.parameters_cell(notebook), \
        f"{notebook}'s parameters cell differs from amanlib/params.py: run python -m amanlib.params to rewrite it"
    inferred = pm.inspect_notebook(str(REPO_NOTEBOOKS / f"{notebook}.ipynb"))
    assert {k: v["inferred_type_name"] for k, v in inferred.items()} == \
        {p.name: params.annotation(p).strip('"') for p in params.SCHEMA.values() if notebook in p.notebooks}


def test_the_library_defaults_are_the_schemas():
    """A notebook run and a library call with no arguments compute the same thing: each library default a
    parameter feeds equals the parameter's default (but frozen_layer4: the library's False is the authors' model,
    the notebooks' 'auto' picks the fast path on a CPU)."""
    from amanlib.backbone import choose_backbone
    from amanlib.data.frames import fill_apex
    from amanlib.data.sources import Sources
    from amanlib.data.synthetic import SyntheticConfig, synthetic_config
    from amanlib.executors import make_executor
    from amanlib.features import build_feature_cache
    from amanlib.pretrain import PretrainConfig
    from amanlib.train import TrainConfig

    default = lambda fn, name: inspect.signature(fn).parameters[name].default  # noqa: E731
    train, pretrain, synthetic, sources = TrainConfig(), PretrainConfig(), SyntheticConfig(), Sources()
    library = {
        "epochs": train.epochs, "batch_size": train.batch_size, "lr": train.lr,
        "epoch_selection": train.epoch_selection, "device": train.device, "pretrain_epochs": pretrain.epochs,
        "precision": pretrain.precision, "feature_batch_size": default(build_feature_cache, "batch_size"),
        "backbone": default(choose_backbone, "backbone"), "download_fer": default(choose_backbone, "download_fer"),
        "synthetic_subjects": synthetic.n_subjects, "synthetic_clips_per_subject": synthetic.clips_per_subject,
        "synthetic_regime": default(synthetic_config, "regime"), "dataset": sources.dataset,
        "label_protocol": sources.label_protocol, "data_seed": sources.seed,
        "trunk_seed": default(choose_backbone, "seed"), "apex_method": default(fill_apex, "method"),
        "executor": default(make_executor, "executor"), "ray_address": default(make_executor, "ray_address"),
        "cpus_per_task": default(make_executor, "cpus_per_task"),
        "gpus_per_task": default(make_executor, "gpus_per_task")}
    assert {name: params.SCHEMA[name].default for name in library} == library
    assert train.precision == params.SCHEMA["precision"].default


def test_the_training_ranges_are_train_configs():
    """epochs, batch_size and lr are refused by the parameters check exactly where TrainConfig refuses them."""
    from amanlib.train import TrainConfig
    for name, value in (("epochs", 0), ("epochs", 1), ("batch_size", 0), ("batch_size", 2), ("lr", 0.0),
                        ("lr", 1e-9), ("lr", -1.0), ("epochs", 2.5)):
        try:
            TrainConfig(**{name: value})
            library = True
        except ValueError as e:
            library = False
            assert params.SCHEMA[name].expected in str(e), (name, value)
        assert params._accepts(params.SCHEMA[name], value) == library, (name, value)


def test_the_parameters_cells_are_rewritten_from_the_schema(tmp_path):
    for name in params.NOTEBOOKS:
        shutil.copy(REPO_NOTEBOOKS / f"{name}.ipynb", tmp_path)
    assert params.write_parameters_cells(tmp_path) == []  # as committed
    book = nbformat.read(tmp_path / "04_training.ipynb", as_version=4)
    next(c for c in book.cells if "parameters" in c.metadata.get("tags", [])).source = "epochs = 3"
    nbformat.write(book, tmp_path / "04_training.ipynb")
    assert params.write_parameters_cells(tmp_path) == [tmp_path / "04_training.ipynb"]
    assert pm.inspect_notebook(str(tmp_path / "04_training.ipynb"))["epochs"]["default"] == "50"


def test_the_defaults_pass_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    everything = {}
    for notebook in params.NOTEBOOKS:
        defaults = params.declared(notebook)
        params.check(notebook, defaults)
        assert set(params.validate(defaults, [notebook])) == set(defaults)
        everything.update(defaults)
    out = params.validate(everything, params.NOTEBOOKS)
    assert out["results_dir"] == str(tmp_path.parent / "results") and out["lr"] == 1e-3


def test_schema_entries_are_typed_and_shared_names_are_shared():
    for p in params.SCHEMA.values():
        assert isinstance(p.kind, params.Kind) and p.notebooks and set(p.notebooks) <= set(params.NOTEBOOKS)
        assert p.help and "\n" not in p.help
        assert p.kind is not params.Kind.CHOICE or p.choices
        assert p.kind is not params.Kind.PATH or p.path
    assert params.SCHEMA["results_dir"].notebooks == params.NOTEBOOKS
    assert set(params.SCHEMA["device"].notebooks) == {"02_magnification", "03_feature_extraction", "04_training"}
    assert params.declared("04_training.ipynb") == params.declared("04_training")
    with pytest.raises(ValueError, match="unknown notebook '06_x'"):
        params.declared("06_x")


# --- types and ranges -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("epochs", "abc", "epochs (04_training): expected an integer >= 1, got 'abc'"),
    ("epochs", True, "epochs (04_training): expected an integer >= 1, got True"),
    ("epochs", 2.0, "got 2.0"),
    ("trunk_seed", -1, "trunk_seed (03_feature_extraction): expected an integer >= 0, got -1"),
    ("lr", 0, "lr (04_training): expected a finite number > 0, got 0"),
    ("lr", math.nan, "got nan"),
    ("lr", math.inf, "got inf"),
    ("lr", "1e-3", "got '1e-3'"),
    ("frozen_layer4", "yes", "frozen_layer4 (04_training): expected true, false or 'auto', got 'yes'"),
    ("frozen_layer4", None, "frozen_layer4 (04_training): expected true, false or 'auto', got None"),
    ("variants", ["AMAN", "AMAN"], "variants (04_training): expected None or a non-empty list of text, names without "
                                   "repeats, each AMAN"),
    ("variants", ["single factor twelve"], "got ['single factor twelve']"),
    ("variants", [], "got []"),
    ("mag_size", 16, "mag_size (03_feature_extraction): expected None or an integer >= 32, got 16"),
    ("sweep_factors", [], "sweep_factors (02_magnification): expected a non-empty list of finite numbers >= 1"),
    ("sweep_factors", [1, 0.5], "got [1, 0.5]"),
    ("sweep_factors", 4, "got 4"),
    ("factors", [1, 1.0], "no factor twice and at least 2 factors != 1 (factor 1 is the unmagnified frame"),
    ("factors", [1, 2], "at least 2 factors != 1 (factor 1 is the unmagnified frame; with one magnified factor AMAN "
                        "is that single factor)"),
    ("factors", [2, 2, 4], "factors (03_feature_extraction): expected None or a non-empty list of finite numbers >= 1, "
                           "no factor twice"),
    ("methods", ["learning", "magic"],
     "expected a non-empty list, each one of 'learning', 'eulerian', 'phase' or 'lagrangian'"),
    ("methods", [], "got []"),
    ("device", "cuda:x", "device (02_magnification, 03_feature_extraction, 04_training): expected 'auto', 'cpu', "
                         "'mps', 'cuda' or 'cuda:N', got 'cuda:x'"),
    ("epoch_selection", "best", "expected one of 'fixed', 'inner_val' or 'paper', got 'best'"),
    ("synthetic_subjects", 1, "synthetic_subjects (01_dataset_prep): expected an integer >= 2, got 1"),
    ("clip", -1, "clip (02_magnification): expected None or an integer >= 0 (a row of the clip table), got -1"),
])
def test_types_are_strict(name, value, message):
    with pytest.raises(ValueError) as e:
        params.validate({name: value}, params.NOTEBOOKS)
    assert message in str(e.value)


def test_valid_values_pass_as_plain_numbers_and_lists(monkeypatch):
    import numpy as np
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = params.validate({"lr": 1, "epochs": np.int64(3), "factors": (1, 2.5, 4), "device": "cuda:1",
                           "frozen_layer4": "auto", "precision": "fp32", "methods": ["phase", "lagrangian"], "clip": 0,
                           "magnifier": "lagrangian"},
                          params.NOTEBOOKS)
    assert out == {"lr": 1, "epochs": 3, "factors": [1, 2.5, 4], "device": "cuda:1", "frozen_layer4": "auto",
                   "precision": "fp32", "methods": ["phase", "lagrangian"], "clip": 0, "magnifier": "lagrangian"}
    assert type(out["epochs"]) is int


def test_every_problem_is_reported_at_once_on_one_line():
    with pytest.raises(ValueError) as e:
        params.validate({"epochs": "abc", "n_frames": 0, "lr": math.nan}, params.NOTEBOOKS)
    message = str(e.value)
    assert "\n" not in message and message.count("; ") == 2
    assert "n_frames (03_feature_extraction): expected an integer >= 1, got 0" in message


# --- paths ------------------------------------------------------------------------------------------------

def test_a_given_path_must_exist_and_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"fer_checkpoint \\(03_feature_extraction\\): expected None or an "
                                         f"existing file, got '{tmp_path}/fer.pth', which does not exist"):
        params.validate({"fer_checkpoint": "fer.pth"}, params.NOTEBOOKS)
    (tmp_path / "fer.pth").write_bytes(b"x")
    (tmp_path / "logs").mkdir()
    out = params.validate({"fer_checkpoint": "fer.pth", "other_logs": "logs"}, params.NOTEBOOKS)
    assert out == {"fer_checkpoint": str(tmp_path / "fer.pth"), "other_logs": str(tmp_path / "logs")}
    with pytest.raises(ValueError, match="other_logs .*, which is a file"):
        params.validate({"other_logs": "fer.pth"}, params.NOTEBOOKS)
    with pytest.raises(ValueError, match="fer_checkpoint .*, which is a folder"):
        params.validate({"fer_checkpoint": "logs"}, params.NOTEBOOKS)
    with pytest.raises(ValueError, match="fer_checkpoint .*got ''"):
        params.validate({"fer_checkpoint": ""}, params.NOTEBOOKS)


def test_output_folders_may_be_absent_but_not_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    out = params.validate({"data_dir": str(tmp_path / "new" / "data")}, params.NOTEBOOKS)
    assert out == {"data_dir": str(tmp_path / "new" / "data")}
    with pytest.raises(ValueError, match=f"results_dir \\(all notebooks\\): expected a writable folder "
                                         f"\\(created when absent\\), got '{tmp_path}/file', which is a file"):
        params.validate({"results_dir": str(tmp_path / "file")}, params.NOTEBOOKS)
    with pytest.raises(ValueError, match=f"got '{tmp_path}/file/data', but '{tmp_path}/file' is a file"):
        params.validate({"data_dir": str(tmp_path / "file" / "data")}, params.NOTEBOOKS)


def test_the_magnet_checkpoint_may_be_absent_only_when_it_will_be_downloaded(tmp_path):
    where = str(tmp_path / "models" / "mag.pth.tar")
    assert params.validate({"magnet_checkpoint": where}, params.NOTEBOOKS) == {"magnet_checkpoint": where}
    with pytest.raises(ValueError, match="magnet_checkpoint \\(02_magnification, 03_feature_extraction\\): .*"
                                         "which does not exist"):
        params.validate({"magnet_checkpoint": where, "download_magnet": False}, params.NOTEBOOKS)


# --- rules between parameters -----------------------------------------------------------------------------

def test_datasets_need_their_files(tmp_path):
    with pytest.raises(ValueError, match="dataset \\(01_dataset_prep\\): 'casme2' needs casme2_coding, "
                                         "casme2_frames; not given: casme2_frames"):
        params.validate({"dataset": "casme2", "casme2_coding": __file__}, ["01_dataset_prep"])
    with pytest.raises(ValueError, match="'smic' needs smic_hs; not given: smic_hs"):
        params.validate({"dataset": "smic"}, ["01_dataset_prep"])
    with pytest.raises(ValueError, match="'composite' needs .*not given: casme2_coding, casme2_frames, samm_codes, "
                                         "samm_frames, smic_hs"):
        params.validate({"dataset": "composite"}, ["01_dataset_prep"])
    files = {"casme2_coding": __file__, "samm_codes": __file__, "casme2_frames": str(tmp_path),
             "samm_frames": str(tmp_path), "smic_hs": str(tmp_path)}
    assert params.validate({"dataset": "composite", **files}, ["01_dataset_prep"])["dataset"] == "composite"
    with pytest.raises(ValueError, match="label_protocol \\(01_dataset_prep\\): dataset 'composite' needs "
                                         "'megc2019_3class', got 'casme2_5class'"):
        params.validate({"dataset": "composite", "label_protocol": "casme2_5class", **files}, ["01_dataset_prep"])
    params.validate({"dataset": "casme2", "label_protocol": "casme2_5class", "casme2_coding": __file__,
                     "casme2_frames": str(tmp_path)}, ["01_dataset_prep"])


def test_the_fer_backbone_needs_its_checkpoint():
    with pytest.raises(ValueError, match="backbone \\(03_feature_extraction\\): 'fer' needs fer_checkpoint"):
        params.validate({"backbone": "fer"}, params.NOTEBOOKS)
    assert params.validate({"backbone": "fer", "fer_checkpoint": __file__}, params.NOTEBOOKS)["backbone"] == "fer"
    notes = []
    assert params.validate({"backbone": "fer"}, ["04_training"], log=notes.append) == {}  # 03 not run: dropped
    assert len(notes) == 1


def test_bf16_where_it_would_be_emulated_is_refused_before_any_work(monkeypatch, tmp_path):
    """The refusal names the missing flag and the cost; auto and bf16_emulated pass, and where bf16 is native so
    does bf16. The device parameter is the one asked about."""
    import amanlib.runtime as runtime
    asked = []
    monkeypatch.setattr(runtime, "bf16_emulated_because",
                        lambda device, *a, **k: asked.append(str(device)) or ["no avx512_bf16/amx_bf16 flag"])
    with pytest.raises(ValueError) as e:
        params.validate({"precision": "bf16", "device": "cpu"}, params.NOTEBOOKS)
    assert str(e.value) == ("precision (03_feature_extraction, 04_training): bf16 is emulated on this CPU (no avx512_bf16/amx_bf16 "
                            "flag): measured 8.6x (an AVX2 CPU) to 14x (bench/precision.py, AVX2 simulated) slower "
                            "than fp32 for a ResNet-18 training step; use precision 'auto' or 'fp32', or "
                            "'bf16_emulated' to run it anyway")
    assert asked == ["cpu"]
    values = {**params.declared("03_feature_extraction"), "results_dir": str(tmp_path), "data_dir": str(tmp_path),
              "precision": "bf16"}
    with pytest.raises(ValueError, match="precision \\(03_feature_extraction\\): bf16 is emulated"):
        params.check("03_feature_extraction", values)
    for ok in ("auto", "fp32", "bf16_emulated"):
        assert params.validate({"precision": ok}, params.NOTEBOOKS)["precision"] == ok
    monkeypatch.setattr(runtime, "bf16_emulated_because", lambda *a, **k: [])
    assert params.validate({"precision": "bf16"}, params.NOTEBOOKS)["precision"] == "bf16"


# --- names ------------------------------------------------------------------------------------------------

def test_unknown_and_old_names():
    with pytest.raises(ValueError) as e:
        params.validate({"protocol": "paper"}, params.NOTEBOOKS)
    assert str(e.value) == ("protocol: unknown parameter (got 'paper'); it was renamed: label_protocol in "
                            "01_dataset_prep, epoch_selection in 04_training ('paper' is a value of epoch_selection)")
    with pytest.raises(ValueError, match="seed: unknown parameter \\(got 1\\); it was renamed: data_seed in "
                                         "01_dataset_prep, trunk_seed in 03_feature_extraction"):
        params.validate({"seed": 1}, params.NOTEBOOKS)  # it seeded two things; seeds (04) seeds the heads
    with pytest.raises(ValueError, match=r"ablations: unknown parameter \(got False\); it was renamed: variants in "
                                         r"04_training"):
        params.validate({"ablations": False}, params.NOTEBOOKS)  # ['AMAN'] now
    assert params.validate({"variants": ["AMAN", "single factor 4.5"]}, ["04_training"])["variants"] == \
        ["AMAN", "single factor 4.5"]
    with pytest.raises(ValueError, match="epoch_count: unknown parameter \\(got 3\\); did you mean .*"
                                         "epochs \\(04_training\\)"):
        params.validate({"epoch_count": 3}, params.NOTEBOOKS)
    with pytest.raises(ValueError, match="zzz: unknown parameter \\(got 1\\); no notebook declares it"):
        params.validate({"zzz": 1}, ["05_confusion_analysis"])
    notes = []
    assert params.validate({"batch_size": 32}, ["03_feature_extraction"], log=notes.append) == {}
    assert notes == ["note: batch_size is read only by 04_training, which this run does not include: dropped; "
                     "in 03_feature_extraction it is now feature_batch_size"]
    notes.clear()
    assert params.validate({"factors": [2, 4]}, params.NOTEBOOKS, log=notes.append) == {"factors": [2, 4]}
    assert notes == ["note: factors goes to 03_feature_extraction only; in 02_magnification it is now sweep_factors"]


def test_old_name_on_the_command_line_gets_the_suggestion(capsys, books, executed, tmp_path):
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "out"),
                      "-p", "protocol", "paper")
    assert "protocol: unknown parameter" in line and "epoch_selection in 04_training" in line
    assert executed == []


def test_a_parameter_of_a_notebook_left_out_is_dropped_with_a_note(books, executed, tmp_path):
    notes = []
    run_notebooks({"epochs": 3, "data_seed": 1}, only="01", results_dir=tmp_path / "out", notebooks_dir=books,
                  log=notes.append)
    assert "note: epochs is read only by 04_training, which this run does not include: dropped" in notes
    assert executed == [("01_dataset_prep", {"data_seed": 1, "results_dir": str(tmp_path / "out")})]


# --- run_notebooks and the command line -------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("epochs", "abc", "epochs (04_training): expected an integer >= 1, got 'abc'"),
    ("epochs", "-1", "epochs (04_training): expected an integer >= 1, got -1"),
    ("n_frames", "0", "n_frames (03_feature_extraction): expected an integer >= 1, got 0"),
    ("lr", "nan", "lr (04_training): expected a finite number > 0, got 'nan'"),
    ("lr", ".nan", "lr (04_training): expected a finite number > 0, got nan"),
    ("factors", "[1]", "factors (03_feature_extraction): expected None or a non-empty list of finite numbers >= 1, "
                       "no factor twice and at least 2 factors != 1"),
])
def test_bad_values_are_refused_before_any_notebook_runs(capsys, books, executed, tmp_path, name, value, message):
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "out"),
                      "-p", name, value)
    assert message in line
    assert executed == [] and not (tmp_path / "out").exists()


def test_a_valid_run_passes_checked_values_to_each_notebook(books, executed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    run_notebooks(parse_params(None, [("lr", "1e-3"), ("factors", "[2, 4]"), ("other_logs", "logs"),
                                      ("device", "cpu")]),
                  results_dir="out", notebooks_dir=books, log=lambda _: None)
    out = str(tmp_path / "out")
    assert executed == [
        ("01_dataset_prep", {"results_dir": out}),
        ("02_magnification", {"results_dir": out, "device": "cpu", "show_widgets": False}),
        ("03_feature_extraction", {"results_dir": out, "factors": [2, 4], "device": "cpu"}),
        ("04_training", {"results_dir": out, "lr": 1e-3, "device": "cpu"}),
        ("05_confusion_analysis", {"results_dir": out, "other_logs": str(tmp_path / "logs")}),
    ]


def test_the_results_folder_is_given_once(books, executed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="results_dir: two results folders given, 'a' as a parameter and 'b'"):
        run_notebooks({"results_dir": "a"}, results_dir="b", notebooks_dir=books)
    run_notebooks({"results_dir": "a"}, only="05", notebooks_dir=books, log=lambda _: None)
    assert executed == [("05_confusion_analysis", {"results_dir": str(tmp_path / "a")})]
    assert (tmp_path / "a" / "notebooks").is_dir()


def test_a_parameters_cell_that_disagrees_with_the_schema_is_an_error(tmp_path, executed):
    books = _notebooks_folder(tmp_path / "nb", ["04_training"])
    book = nbformat.read(books / "04_training.ipynb", as_version=4)
    book.cells[0].source = book.cells[0].source.replace("epoch_selection", "protocol")
    nbformat.write(book, books / "04_training.ipynb")
    with pytest.raises(RuntimeError, match="04_training.ipynb: its parameters cell and amanlib/params.py disagree; "
                                           "only the cell declares protocol; only amanlib/params.py declares "
                                           "epoch_selection"):
        run_notebooks({}, results_dir=tmp_path / "out", notebooks_dir=books)
    assert executed == []


def test_notebooks_of_ones_own_take_the_parameters_their_cells_declare(tmp_path, executed):
    folder = tmp_path / "nb"
    folder.mkdir()
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbformat.v4.new_code_cell("results_dir = '.'\nepochs = 1\nwidth = 3")]
    book.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(book, folder / "01_mine.ipynb")
    with pytest.raises(ValueError, match="epochs \\(01_mine\\): expected an integer >= 1, got 0"):
        run_notebooks({"epochs": 0}, results_dir=tmp_path / "out", notebooks_dir=folder)
    run_notebooks({"epochs": 2, "width": "any"}, results_dir=tmp_path / "out", notebooks_dir=folder, log=print)
    assert executed == [("01_mine", {"epochs": 2, "width": "any", "results_dir": str(tmp_path / "out")})]


def test_a_results_folder_under_a_file_is_one_error_naming_it(capsys, books, executed, tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "file" / "out"))
    assert f"got '{tmp_path}/file/out', but '{tmp_path}/file' is a file" in line
    assert executed == []


def test_a_read_only_results_folder_is_one_error_naming_it(capsys, books, executed, tmp_path, monkeypatch):
    results = tmp_path / "ro"
    results.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != results and real(path, mode, **kw))
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(results))
    assert f"results_dir (all notebooks): expected a writable folder (created when absent), got '{results}', " \
           "which is not writable" in line
    assert executed == []
    with pytest.raises(ValueError, match=f"results folder {results} is not writable"):  # the runner's own check
        from amanlib.notebooks import _writable_folder
        _writable_folder(results)


def test_a_second_run_into_the_same_folder_fails_at_once(capsys, books, tmp_path, monkeypatch):
    results = tmp_path / "out"
    results.mkdir()
    held = []

    def execute(src, out, parameters=None, **kw):  # while a run executes, its folder is locked
        held.append(_one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(results)))
        shutil.copyfile(src, out)

    monkeypatch.setattr(pm, "execute_notebook", execute)
    with FileLock(str(results / LOCK_NAME), timeout=0):
        line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(results))
    assert line == (f"amanlib run-notebooks: error: another run is using the results folder {results} "
                    f"(it holds {results / LOCK_NAME}); wait for it to finish or choose another results folder "
                    "(--results, or the results_dir parameter)")
    assert cli.main(["run-notebooks", "--notebooks", str(books), "--results", str(results), "--only", "05"]) == 0
    assert held == [line]  # locked during the run, released after it


def test_malformed_yaml_is_one_line_naming_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("epochs: 3\nfactors: [2, 4\nlr: 0.1\n")
    line = _one_error(capsys, "run-notebooks", "--params", str(bad))
    assert line == f"amanlib run-notebooks: error: {bad}: invalid YAML at line 3, column 3: expected ',' or ']', " \
                   "but got ':'"
    line = _one_error(capsys, "run-notebooks", "-p", "factors", "[2, 4")
    assert "-p factors '[2, 4': invalid YAML" in line


def test_params_file_problems_are_one_line_naming_the_file(capsys, tmp_path):
    line = _one_error(capsys, "run-notebooks", "--params", str(tmp_path / "absent.yaml"))
    assert line == f"amanlib run-notebooks: error: params file {tmp_path / 'absent.yaml'} does not exist"
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert f"{tmp_path / 'list.yaml'}: expected a mapping" in _one_error(capsys, "run-notebooks", "--params",
                                                                        str(tmp_path / "list.yaml"))
    assert f"{tmp_path}: Is a directory (EISDIR)" in _one_error(capsys, "run-notebooks", "--params", str(tmp_path))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    assert "bin.yaml: not a UTF-8 text file" in _one_error(capsys, "run-notebooks", "--params",
                                                           str(tmp_path / "bin.yaml"))


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("lr: 1e-3\nfactors: [2, 1.5e1]\n")
    assert parse_params(str(f), [("lr", "5e-4"), ("device", "cuda:0"), ("epochs", "1_0")]) == {
        "lr": 5e-4, "factors": [2, 15.0], "device": "cuda:0", "epochs": 10}


@pytest.mark.parametrize("error, shown", [
    (OSError(errno.ENOSPC, "No space left on device"), "{out}: No space left on device (ENOSPC)"),
    (PermissionError(errno.EACCES, "Permission denied", "/some/file"), "/some/file: Permission denied (EACCES)"),
    (OSError(errno.ENOSPC, "No space left on device", "/disk/x"), "/disk/x: No space left on device (ENOSPC)"),
])
def test_os_errors_are_one_line_naming_the_file(capsys, books, tmp_path, monkeypatch, error, shown):
    def execute(*args, **kwargs):
        raise error

    monkeypatch.setattr(pm, "execute_notebook", execute)
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "out"))
    out = tmp_path / "out" / "notebooks" / "01_dataset_prep.ipynb"
    assert line == "amanlib run-notebooks: error: " + shown.format(out=out)


def test_usage_errors_are_one_line(capsys):
    assert _one_error(capsys, "run-notebooks", "-p", "epochs").endswith(
        "argument -p: expected 2 arguments (see amanlib run-notebooks --help)")
    assert "--cell-timeout: expected a number of seconds > 0, got '0'" in _one_error(
        capsys, "run-notebooks", "--cell-timeout", "0")
    assert cli.main(["--version"]) == 0


# --- inside a notebook ------------------------------------------------------------------------------------

def test_check_validates_a_notebooks_own_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {**params.declared("04_training"), "np": object(), "In": [], "_": None}
    params.check("04_training", namespace)
    with pytest.raises(ValueError, match="^epochs \\(04_training\\): expected an integer >= 1, got 'abc'$"):
        params.check("04_training", {**namespace, "epochs": "abc"})
    del namespace["lr"]
    with pytest.raises(ValueError, match="04_training: lr not set; its parameters cell must define it"):
        params.check("04_training", namespace)
    with pytest.raises(ValueError, match="dataset \\(01_dataset_prep\\): 'samm' needs samm_codes, samm_frames"):
        params.check("01_dataset_prep", {**params.declared("01_dataset_prep"), "dataset": "samm"})


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(monkeypatch, device):
    """-p device cuda on a machine without one used to pass the check and fail in 03 with torch's error (issue 22)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda:3")  # cuda:3 on a machine with 1 GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device == "cuda:3" else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=rf"device \(02_magnification, 03_feature_extraction, 04_training\): "
                                         rf"'{device}' is not on this machine .*use 'auto' or 'cpu'"):
        params.validate({"device": device}, params.NOTEBOOKS)
    assert params.validate({"device": "cpu"}, params.NOTEBOOKS) == {"device": "cpu"}


def test_a_notebook_cut_by_a_full_disk_is_not_kept_and_a_whole_one_is(capsys, books, tmp_path, monkeypatch):
    """papermill writes the executed notebook as cells run; a disk that fills up cuts it mid-JSON (issue 22). Only a
    whole file becomes results/notebooks/NN.ipynb, and the message says which happened."""
    def cut(source, output, **kwargs):
        Path(output).write_text('{"cells": [')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pm, "execute_notebook", cut)
    out = tmp_path / "out" / "notebooks"
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "out"))
    assert line.endswith("01_dataset_prep.ipynb: No space left on device (ENOSPC)")
    assert not list(out.glob("*.ipynb"))  # neither the cut file nor a partial one

    def fails(source, output, **kwargs):
        nbformat.write(nbformat.v4.new_notebook(), output)
        raise pm.PapermillExecutionError(1, 2, "cell", "ValueError", "bad value", [])

    monkeypatch.setattr(pm, "execute_notebook", fails)
    line = _one_error(capsys, "run-notebooks", "--notebooks", str(books), "--results", str(tmp_path / "out"))
    assert f"executed notebook kept at {out / '01_dataset_prep.ipynb'}" in line
    assert [p.name for p in out.glob("*.ipynb")] == ["01_dataset_prep.ipynb"]
