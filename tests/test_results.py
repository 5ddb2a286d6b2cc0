"""The committed results: metrics.json holds the pinned schema, and README's table is rendered from it."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from amanlib import timing
from amanlib import stats
from amanlib.report import REGIME_FOLDERS, readme_table, render_readme
from amanlib.results import protocol_gap
from amanlib.runtime import machine_info

REPO = Path(__file__).resolve().parents[1]
METRICS = json.loads((REPO / "results" / "metrics.json").read_text())
WIDE = json.loads((REPO / "results" / "wide" / "metrics.json").read_text())  # make reproduce-wide
PHASE = json.loads((REPO / "results" / "phase" / "metrics.json").read_text())  # make reproduce-phase
OTHERS = [WIDE, PHASE]  # in the order of REGIME_FOLDERS, as `amanlib readme` renders them


@pytest.mark.parametrize("m", [METRICS, WIDE, PHASE], ids=["default", "wide", "phase"])
def test_metrics_json_schema(m):
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
        assert set(mech) == {"spearman_r", "ci", "p_value", "n", "frames_without_weight", "clips_without_weight"}
        assert mech["n"] + mech["clips_without_weight"] == m["clips"]
        check_oracle_and_by_motion(m)
        assert m["synthetic_regime"] in ("narrow", "wide")
    assert not Path(m["run_dir"]).is_absolute()
    assert set(m["fidelity"]) == {"name", "trunk_bn", "layer4_bn", "layer4_init"}
    mine = m["by_fidelity"][m["fidelity"]["name"]]
    assert mine["uf1"] == m["uf1"] and mine["run_dirs"] == m["run_dirs"]  # the preset's entry is this run
    assert set(m["machine"]) == set(machine_info("cpu"))
    assert set(m["precision"]) == {"magnifier", "trunk"} and set(m["precision"].values()) <= {"fp32", "bf16"}


def check_oracle_and_by_motion(m: dict) -> None:
    """metrics.json's `oracle` (the positive control against the best single factor) and `by_motion` (accuracy per
    variant and tertile of true motion) on synthetic data, with their CIs."""
    o = m["oracle"]
    assert "positive control" in o["role"] and o["variant"] in m["ablations"] and o["target_px"] > 0
    assert sum(o["chosen_factors"].values()) == m["clips"] and o["best_single_factor"] in m["ablations"]
    assert o["best_single_factor"] == max((v for v in m["ablations"] if v.startswith("single factor ")),
                                          key=lambda v: m["ablations"][v]["uf1"])
    assert o["uf1"] == pytest.approx(m["ablations"][o["variant"]]["uf1"])
    assert {(c["a"], c["b"], c["metric"]) for c in o["minus_best_single_factor"]} == {
        (o["variant"], o["best_single_factor"], k) for k in ("uf1", "uar")}
    for c in o["minus_best_single_factor"]:
        assert c["ci"][0] <= c["diff"] <= c["ci"][1] and 0 <= c["p_value"] <= 1
        assert c["diff"] == pytest.approx(o[c["metric"]] - m["ablations"][o["best_single_factor"]][c["metric"]])
    b = m["by_motion"]
    assert list(b["bins"])[0] == "small" and sum(e["n_clips"] for e in b["bins"].values()) == m["clips"]
    assert set(b["variants"]) == set(m["ablations"]) and set(b["best_single_factor_by_bin"]) == set(b["bins"])
    for variant, per_bin in b["variants"].items():
        assert set(per_bin) == set(b["bins"]), variant
        for e in per_bin.values():
            assert e["ci"][0] <= e["accuracy"] <= e["ci"][1]
        total = sum(e["accuracy"] * e["n_clips"] for e in per_bin.values()) / m["clips"]
        assert total == pytest.approx(m["ablations"][variant]["accuracy"])  # the bins sum back to all clips


def test_readme_table_is_the_committed_metrics(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert not render_readme(readme, METRICS, others=OTHERS), \
        "README's results table or regimes differ from results/metrics.json and those of REGIME_FOLDERS: run " \
        "`.venv/bin/python -m amanlib readme`"
    assert readme_table(METRICS) in (REPO / "README.md").read_text()
    assert [(m["synthetic_regime"], m["magnifier"]) for m in (METRICS, *OTHERS)] == [
        ("narrow", "learning"), ("wide", "learning"), ("wide", "phase")]
    assert REGIME_FOLDERS == ("wide", "phase")
    assert "**wide, phase magnification**" in (REPO / "README.md").read_text()


def test_readme_timing_is_the_committed_timing(tmp_path):
    committed = timing.read(REPO / "results")
    assert committed is not None, "results/timing.json is missing: `make reproduce` writes it"
    assert set(committed["notebooks"]) == {p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert not render_readme(readme, METRICS, committed, OTHERS), \
        "README's timing table differs from results/timing.json: run `.venv/bin/python -m amanlib readme`"
    assert timing.markdown(committed) in (REPO / "README.md").read_text()


def _seed_predictions(seed: int, last: list[int], best: list[int]) -> pd.DataFrame:
    """One fake AMAN run of 6 clips (2 subjects, 3 classes) under epoch selection fixed: pred is the last epoch."""
    gt = [0, 1, 2, 0, 1, 2]
    return pd.DataFrame({"dataset": "synthetic", "subject": ["s1"] * 3 + ["s2"] * 3,
                         "clip": [f"c{i}" for i in range(6)], "gt": gt, "pred": last, "pred_last": last, "pred_best_test": best, "variant": "AMAN",
                         "seed": seed})


def test_protocol_gap_compares_the_same_seeds_as_metrics_json():
    """Seed 0's best epoch on the test subject (0.5) is below the seed-mean last epoch (0.667): the gap of seed 0
    alone against metrics.json's seed mean put 'optimistic' below 'honest' (issue 19)."""
    runs = [_seed_predictions(0, last=[0, 0, 0, 0, 0, 2], best=[0, 1, 0, 0, 0, 2]),
            _seed_predictions(1, last=[0, 1, 2, 0, 1, 2], best=[0, 1, 2, 0, 1, 2])]
    accuracy = stats.bootstrap_scores(pd.concat(runs), n_resamples=10).loc["AMAN", "accuracy"]  # as metrics.json
    assert protocol_gap(runs[:1], "fixed").loc["best epoch on test subject (optimistic)", "accuracy"] < accuracy
    gap = protocol_gap(runs, "fixed")
    assert gap.loc["chosen epoch (fixed)", "accuracy"] == pytest.approx(accuracy)
    assert (gap.loc["best epoch on test subject (optimistic)", ["uf1", "uar", "accuracy"]]
            >= gap.loc["last epoch", ["uf1", "uar", "accuracy"]]).all()
    pd.testing.assert_frame_equal(protocol_gap(pd.concat(runs), "fixed"), gap)  # one table with a seed column
    assert gap["n"].tolist() == [6, 6, 6]


def test_readme_table_marks_an_optimistic_run():
    """README's table of a run whose epoch was chosen on the test subject says so in its first line (issue 22)."""
    assert "OPTIMISTIC" not in readme_table(METRICS).splitlines()[0]
    assert "epoch selection paper (OPTIMISTIC: epoch chosen on the held-out subject's own accuracy" in \
        readme_table({**METRICS, "epoch_selection": "paper", "optimistic": True}).splitlines()[0]


def test_readme_table_says_when_there_are_too_few_subjects():
    assert "Too few subjects" not in readme_table(METRICS)
    few = readme_table({**METRICS, "subjects": 2})
    assert "with 2 subjects (fewer than 6)" in few.splitlines()[2] and "scores higher" not in few


def test_folder_comparison_pairs_the_runs_of_two_results_folders(tmp_path):
    """README's Lagrangian row: AMAN of results/lagrangian minus AMAN of results, paired by seed and subject; two
    folders whose runs hold other clips are refused."""
    import torch

    from amanlib import report, results
    from amanlib.train import TrainConfig, run_loso
    from test_train import FAST, toy_index, toy_pooled

    index = toy_index(n_subjects=6, per_subject=4)
    for magnifier, signal in (("learning", 0.0), ("lagrangian", 3.0)):
        folder = tmp_path / magnifier
        runs = [run_loso(toy_pooled(index, signal=signal), index, cfg=TrainConfig(**FAST, seed=s),
                         runs_dir=folder / "runs",
                         progress=False) for s in (0, 1)]
        (folder / "metrics.json").write_text(json.dumps({**dict.fromkeys(results.METRICS_FIELDS),
                                                         "magnifier": magnifier,
                                                         "run_dirs": [str(r.out_dir.relative_to(folder)) for r in runs]}))
    comparison = report.folder_comparison(tmp_path / "learning", tmp_path / "lagrangian", n_resamples=200,
                                          n_permutations=200)
    assert (comparison["variant"], comparison["baseline"]) == ("AMAN (lagrangian)", "AMAN (learning)")
    uf1 = next(c for c in comparison["comparisons"] if c["metric"] == "uf1")
    assert uf1["diff"] > 0 and uf1["ci"][0] <= uf1["diff"] <= uf1["ci"][1]
    assert report.magnifier_text(comparison).startswith("**AMAN (lagrangian) minus AMAN (learning)** (95% CI")
    other = toy_index(n_subjects=6, per_subject=3)
    run = run_loso(torch.randn(len(other), 3, 4, 512), other, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "x" / "runs",
                   progress=False)
    (tmp_path / "x" / "metrics.json").write_text(json.dumps({**dict.fromkeys(results.METRICS_FIELDS),
                                                             "magnifier": "phase",
                                                             "run_dirs": [str(run.out_dir.relative_to(tmp_path / "x"))]}))
    with pytest.raises(ValueError, match="same clips and seeds"):
        report.folder_comparison(tmp_path / "learning", tmp_path / "x", n_resamples=200, n_permutations=200)


def test_a_metrics_json_without_a_field_the_kit_reads_is_one_line_naming_it(tmp_path, capsys):
    """metrics.json without run_dirs, fidelity or ablations: notebook 05 and `amanlib readme` stop with the file and
    the field named (issue 22), and any other error of a CLI command is one line too, its traceback behind --debug."""
    from amanlib import cli, report, results
    metrics = dict.fromkeys(results.METRICS_FIELDS)
    del metrics["ablations"], metrics["run_dirs"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"metrics.json lacks ablations, run_dirs: .* run notebook 04"):
        results.read_metrics(tmp_path)
    assert cli.main(["readme", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amanlib readme: error: ") and "lacks ablations" in err[0]
    (tmp_path / "metrics.json").write_text(json.dumps({**dict.fromkeys(results.METRICS_FIELDS), "ablations": 3}))
    (tmp_path / "README.md").write_text(f"{report.README_START}\n{report.README_END}\n")
    assert cli.main(["readme", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(amanlib --debug shows where)" in err[0]
    with pytest.raises(Exception):
        cli.main(["--debug", "readme", "--results", str(tmp_path), "--readme", str(tmp_path / "README.md")])


def test_an_older_metrics_file_says_how_to_name_every_run(tmp_path):
    from amanlib.results import sweep_predictions
    with pytest.raises(ValueError, match=r"names only AMAN's runs .* run notebook 04 \(training\) again"):
        sweep_predictions(tmp_path, {"run_dirs": ["work/runs/x"], "seeds": [0]})


def test_the_gpu_block_sets_the_full_model_beside_the_frozen_default(tmp_path):
    """README's GPU block: None until results/gpu holds a run; then per variant both folders trained, the two UF1s with
    their CIs and the paired difference (folder_comparison), and where the notebooks ran; render_readme puts it between
    its markers."""
    from amanlib import report, results
    from amanlib.train import TrainConfig, run_loso
    from test_train import FAST, toy_index, toy_pooled

    index = toy_index(n_subjects=6, per_subject=4)
    assert report.gpu_markdown(tmp_path) is None
    for folder, model, signal in ((tmp_path, "AMAN, frozen layer4", 0.0), (tmp_path / "gpu", "AMAN", 3.0)):
        runs = {v: [str(run_loso(toy_pooled(index, signal=signal + shift), index, cfg=TrainConfig(**FAST, seed=s),
                                 runs_dir=folder / "work" / "runs", progress=False).out_dir.relative_to(folder))
                    for s in (0, 1)] for v, shift in (("AMAN", 0.0), ("no magnification", 0.5))}
        scores = {"uf1": 0.5 + signal / 10, "uf1_ci": [0.4, 0.6 + signal / 10]}
        (folder / "metrics.json").write_text(json.dumps({
            **dict.fromkeys(results.METRICS_FIELDS), "model": model, "run_dirs": runs["AMAN"], "runs": runs,
            "ablations": {"AMAN": scores, "no magnification": scores, **({} if signal else {"single factor 2": scores})}}))
    (tmp_path / "gpu" / "timing.json").write_text(json.dumps({"date": "2026-12-05", "machine": "a CPU, NVIDIA H200",
                                                              "notebooks": {"04_training": {"training": 61.5}}}))
    block = report.gpu_markdown(tmp_path, n_resamples=200, n_permutations=200)
    assert block.startswith("`bench/gpu.sh`'s run in `results/gpu` on a CPU, NVIDIA H200 (2026-12-05, 62 s of "
                            "notebooks): **AMAN** beside the default's **AMAN, frozen layer4**")
    rows = [line for line in block.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| AMAN", "| no magnification"]  # the variants both trained
    uf1 = next(c for c in report.folder_comparison(tmp_path, tmp_path / "gpu", "no magnification",
                                                   lambda m: m["model"], 200, 200)["comparisons"]
               if c["metric"] == "uf1")
    assert rows[1] == (f"| no magnification | 0.800 [0.400, 0.900] | 0.500 [0.400, 0.600] | "
                       f"{uf1['diff']:+.3f} [{uf1['ci'][0]:+.3f}, {uf1['ci'][1]:+.3f}] ({uf1['p_value']:.2g}) |")
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    assert render_readme(readme, METRICS, others=OTHERS, gpu=block)
    assert readme.read_text().count(block) == 1 and "It has not yet run on a GPU" not in readme.read_text()
