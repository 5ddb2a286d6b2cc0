"""The committed results: metrics.json holds the pinned schema, and README's table is rendered from it."""
import json
from pathlib import Path

import numpy as np
import pytest

from amanlib import timing
from amanlib.results import readme_table, render_readme

REPO = Path(__file__).resolve().parents[1]
METRICS = json.loads((REPO / "results" / "metrics.json").read_text())


def test_metrics_json_schema():
    m = METRICS
    assert m["seeds"] and all(isinstance(s, int) for s in m["seeds"])
    assert m["label_protocol"] and m["epoch_selection"] in ("fixed", "inner_val", "paper")
    aman = m["ablations"]["AMAN"]
    for key in ("uf1", "uar", "accuracy"):
        assert m[key] == pytest.approx(aman[key])
    assert m["uf1_ci"] == aman["uf1_ci"] and m["uar_ci"] == aman["uar_ci"]
    for name, v in m["ablations"].items():
        assert set(v) >= {"uf1", "uar", "accuracy", "uf1_std", "uar_std", "uf1_ci", "uar_ci", "per_seed"}, name
        for key in ("uf1", "uar", "accuracy"):
            assert len(v["per_seed"][key]) == len(m["seeds"])
            assert v[key] == pytest.approx(np.mean(v["per_seed"][key]))  # means are the mean of per_seed
        for key in ("uf1", "uar"):
            lo, hi = v[f"{key}_ci"]
            assert lo <= v[key] <= hi
    pairs = {(c["b"], c["metric"]) for c in m["comparisons"]}
    assert pairs == {(b, k) for b in m["ablations"] if b != "AMAN" for k in ("uf1", "uar")}
    for c in m["comparisons"]:
        assert c["a"] == "AMAN" and 0 <= c["p_value"] <= 1 and c["ci"][0] <= c["diff"] <= c["ci"][1]
        assert c["diff"] == pytest.approx(aman[c["metric"]] - m["ablations"][c["b"]][c["metric"]])
    if m["dataset"] == "synthetic":
        mech = m["mechanism"]
        assert set(mech) == {"spearman_r", "ci", "p_value", "n"} and mech["n"] == m["clips"]
    assert not Path(m["run_dir"]).is_absolute()
    assert set(m["fidelity"]) == {"name", "trunk_bn", "layer4_bn", "layer4_init"}
    mine = m["by_fidelity"][m["fidelity"]["name"]]
    assert mine["uf1"] == m["uf1"] and mine["run_dirs"] == m["run_dirs"]  # the preset's entry is this run


def test_readme_table_is_the_committed_metrics(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert not render_readme(readme, METRICS), "README's results table differs from results/metrics.json: " \
                                               "run `.venv/bin/python -m amanlib readme`"
    assert readme_table(METRICS) in (REPO / "README.md").read_text()


def test_readme_timing_is_the_committed_timing(tmp_path):
    committed = timing.read(REPO / "results")
    assert committed is not None, "results/timing.json is missing: `make reproduce` writes it"
    assert set(committed["notebooks"]) == {p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert not render_readme(readme, METRICS, committed), "README's timing table differs from results/timing.json: " \
                                                          "run `.venv/bin/python -m amanlib readme`"
    assert timing.markdown(committed) in (REPO / "README.md").read_text()
