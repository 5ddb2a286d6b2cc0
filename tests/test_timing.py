"""Seconds per notebook and stage: read back from papermill's cell durations and the cells' stage tags."""
import json

import nbformat
import pytest

from amanlib import timing
from test_notebooks import NOTEBOOKS


def _executed(path, cells):
    """An executed notebook whose code cells took the given (stage tag or None, seconds)."""
    book = nbformat.v4.new_notebook()
    for stage, seconds in cells:
        cell = nbformat.v4.new_code_cell("pass")
        cell.metadata["papermill"] = {"duration": seconds}
        if stage:
            cell.metadata["tags"] = [f"stage:{stage}"]
        book.cells.append(cell)
    book.cells.append(nbformat.v4.new_markdown_cell("text"))
    nbformat.write(book, path)
    return path


def test_stages_sum_tagged_cells_and_setup_takes_the_rest(tmp_path):
    path = _executed(tmp_path / "03.ipynb", [(None, 1.5), ("pre-training", 40.0), ("magnification + features", 60.0),
                                              ("figures", 2.0), ("figures", 1.0)])
    spent = timing.notebook_stages(path, 110.0)
    assert spent == pytest.approx({"setup": 7.0, "pre-training": 40.0, "magnification + features": 60.0,
                                   "figures": 3.0})
    assert sum(spent.values()) == pytest.approx(110.0)
    text = timing.table({"03_feature_extraction": spent, "04_training": {"setup": 5.0, "training": 20.0}})
    assert "pre-training 40" in text and "figures 3.0" in text and text.splitlines()[-1].split() == ["total", "135"]
    assert "| **total** | 12 | 40 | 60 | 20 | 3.0 | **135** |" in timing.markdown(
        {"date": "2026-11-25", "machine": "m", "notebooks": {"03_feature_extraction": spent,
                                                            "04_training": {"setup": 5.0, "training": 20.0}}})


def test_an_unknown_stage_tag_is_an_error(tmp_path):
    path = _executed(tmp_path / "01.ipynb", [("pretraining", 3.0)])
    with pytest.raises(ValueError, match="pretraining"):
        timing.notebook_stages(path, 5.0)


def test_the_notebooks_tag_the_issue_stages():
    seen = set()
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            seen.add(timing.cell_stage(cell))  # raises on a tag outside timing.STAGES
    assert {"pre-training", "magnification + features", "training", "statistics", "figures"} <= seen


def test_record_names_date_and_machine(tmp_path):
    recorded = timing.record(tmp_path, {"04_training": {"setup": 4.04, "training": 20.0}})
    assert json.loads((tmp_path / timing.TIMING_FILE).read_text()) == recorded
    assert recorded["notebooks"] == {"04_training": {"setup": 4.0, "training": 20.0}}
    assert "cores" in recorded["machine"] and len(recorded["date"]) == 10
    info = recorded["machine_info"]
    assert set(info) >= {"cpu", "cores", "cpu_capability", "onednn_max_cpu_isa", "native_bf16", "device", "torch"}
    assert recorded["machine"] == timing.machine(info) and f"CPU capability {info['cpu_capability']}" in \
        recorded["machine"]


def test_the_machine_line_names_capability_isa_cap_and_bf16():
    info = {"cpu": "Xeon", "cores": 2, "threads": 2, "cpu_capability": "AVX2", "onednn_max_cpu_isa": "AVX2",
            "native_bf16": False, "device": "cpu", "gpu": None, "torch": "2.14.1"}
    assert timing.machine(info) == "Xeon, 2 cores, CPU capability AVX2, ONEDNN_MAX_CPU_ISA=AVX2, no native bf16 " \
                                   "(fp32), no GPU"
    gpu = {**info, "cpu_capability": "AVX512", "onednn_max_cpu_isa": None, "native_bf16": True, "device": "cuda",
           "gpu": "H200"}
    assert timing.machine(gpu) == "Xeon, 2 cores, CPU capability AVX512, native bf16 on cuda, H200"
