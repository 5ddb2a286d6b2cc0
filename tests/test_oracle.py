"""The oracle (a positive control from the synthetic truth) and accuracy by true motion: slots from the truth alone,
trained like a single factor on the sweep's folds and seeds, recorded in metrics.json; tertiles sum back."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from amanlib import plots, report, results, stats
from amanlib.oracle import ORACLE_VARIANT, is_control, oracle_name, oracle_slots
from amanlib.sweep import run_ablations, run_oracle
from amanlib.train import Keyed, TrainConfig, Variant, run_loso
from test_results import check_oracle_and_by_motion
from test_stats import simulate
from test_sweep import pooled, uneven_index

FACTORS = [1.0, 2.0, 4.0]
CFG = TrainConfig(epochs=2, device="cpu")


def truth_of(index, seed=0):
    """A truth table as data.truth_for gives it: subject, clip and peak_px per clip (a few repeated values)."""
    rng = np.random.default_rng(seed)
    peak = rng.choice([0.3, 0.5, 0.8, 1.2, 1.5, 2.0, 3.0], len(index))
    return pd.DataFrame({"subject": index["subject"].astype(str), "clip": index["clip"].astype(str), "peak_px": peak})


def test_oracle_slots_are_the_factor_nearest_the_target():
    factors = [1, 2, 4.5, 7]
    #        2x3=6 | 4.5x1.5 nearest | 7x1 | 7x0.5 | all 6 away: a tie | all far: the smallest | 1x6 is excluded
    peak = [3.0, 1.5, 1.0, 0.5, 0.0, 100.0, 6.0]
    assert oracle_slots(peak, factors, 6.0).tolist() == [1, 2, 3, 3, 1, 1, 1]
    assert oracle_slots([1.0], [1, 4, 8], 6.0).tolist() == [1]  # |4 - 6| == |8 - 6|: the smaller factor
    assert oracle_slots([1.0], [8, 1, 4], 6.0).tolist() == [2]  # slots index the factors as given, in any order
    both = oracle_slots([1.0, 3.0], [1, 2, 4, 8], [3.0, 12.0])
    assert both.shape == (2, 2) and both.tolist() == [[1, 1], [3, 2]]  # a row per target: 2 (tie with 4)|2, 8|4
    with pytest.raises(ValueError, match="magnified"):
        oracle_slots([1.0], [1.0], 6.0)
    with pytest.raises(ValueError, match="target_px"):
        oracle_slots([1.0], factors, 0.0)
    assert oracle_name(6.0) == ORACLE_VARIANT and oracle_name(3.0) == "oracle factor (truth, T = 3 px)"
    assert is_control(oracle_name(3.0)) and not is_control("single factor 4")


def test_the_oracle_reads_the_truth_never_the_labels(tmp_path):
    index = uneven_index()
    x, truth = pooled(index), truth_of(index)
    shuffled = index.assign(label=np.random.default_rng(1).permutation(index["label"].to_numpy()))
    a = run_oracle(x, index, truth=truth, factors=FACTORS, cfg=CFG, runs_dir=tmp_path / "a", seeds=[0], progress=False)
    b = run_oracle(x, shuffled, truth=truth, factors=FACTORS, cfg=CFG, runs_dir=tmp_path / "b", seeds=[0],
                   progress=False)
    pd.testing.assert_frame_equal(a.oracle, b.oracle)  # other labels, the same slots
    expected = oracle_slots(truth["peak_px"], FACTORS, 6.0)
    assert a.oracle["slot"].tolist() == expected.tolist() and set(a.oracle["variant"]) == {ORACLE_VARIANT}
    # the run is a one-slot head on each clip's chosen slot, as run_loso trains it on those features gathered by hand
    gathered = torch.stack([x[i, :, s:s + 1] for i, s in enumerate(expected)])
    alone = run_loso(Keyed(gathered, "by hand"), index, cfg=CFG, runs_dir=tmp_path / "loso", progress=False)
    cols = ["dataset", "subject", "clip", "gt", "pred", "fold", "epoch"]
    pd.testing.assert_frame_equal(a.runs[(ORACLE_VARIANT, 0)].predictions[cols].reset_index(drop=True),
                                  alone.predictions[cols].reset_index(drop=True))
    # a planted truth (every clip 1.5 px: 4 x 1.5 = 6) puts every clip at factor 4; the key follows the slots
    planted = run_oracle(x, index, truth=truth.assign(peak_px=1.5), factors=FACTORS, cfg=CFG, runs_dir=tmp_path / "a",
                         seeds=[0], progress=False)
    assert set(planted.oracle["factor"]) == {4.0}
    assert planted.runs[(ORACLE_VARIANT, 0)].out_dir != a.runs[(ORACLE_VARIANT, 0)].out_dir


def test_ablations_with_truth_add_the_oracle_and_metrics_record_it(tmp_path):
    index = uneven_index()
    x, truth = pooled(index), truth_of(index)
    variants = [Variant("AMAN", (1, 2)), Variant("no magnification", (0,)), Variant("single factor 2", (1,)),
                Variant("single factor 4", (2,))]
    table, result = run_ablations(x, index, factors=FACTORS, cfg=CFG, runs_dir=tmp_path / "runs", variants=variants,
                                  seeds=[0, 1], progress=False,
                                  truth=truth)
    p = result.predictions
    assert set(p.variant) == {v.name for v in variants} | {ORACLE_VARIANT} and ORACLE_VARIANT in set(table.variant)
    clips = lambda v: p[p.variant == v][["seed", "subject", "clip"]].sort_values(["seed", "clip"])  # noqa: E731
    pd.testing.assert_frame_equal(clips(ORACLE_VARIANT).reset_index(drop=True), clips("AMAN").reset_index(drop=True))

    summary = stats.bootstrap_scores(p, n_resamples=50)
    comparisons = pd.DataFrame(stats.paired_comparisons(p, n_resamples=50, n_permutations=50))
    oracle = stats.oracle_check(result, summary, n_resamples=50, n_permutations=50)
    best = summary.loc[["single factor 2", "single factor 4"], "uf1"].idxmax()
    assert oracle["best_single_factor"] == best and oracle["target_px"] == 6.0 and "control" in oracle["role"]
    assert sum(oracle["chosen_factors"].values()) == len(index)
    by_motion = stats.accuracy_by_motion(p, truth, n_resamples=50)
    cache = SimpleNamespace(backbone={"name": "random"}, factors=FACTORS, inputs={
        "magnifier": {"name": "eulerian", "dtype": "float32"}, "n_frames": 2,
        "trunk": {"dtype": "float32", "bn": "frame_batch"}})
    metrics = results.record_training(tmp_path, index, cache, result, summary, comparisons, None, oracle=oracle,
                                      by_motion=by_motion)
    check_oracle_and_by_motion(metrics)
    planted = dataclasses.replace(result, history=result.history.assign(
        train_loss=result.history["train_loss"].where(result.history.index != 3)))  # one NaN loss, as old caches had
    with pytest.raises(ValueError, match=r"metrics.json is not written: .* non-finite training loss \(.*history.csv"):
        results.record_training(tmp_path, index, cache, planted, summary, comparisons, None, oracle=oracle)
    assert metrics["by_motion"]["variants"]["AMAN"]["small"]["n_clips"] == by_motion["n_clips"].iloc[0]
    table = report.variant_table(metrics)
    assert f"{ORACLE_VARIANT}: positive control" in set(table["variant"])
    text = report.comparisons_text(metrics["comparisons"])
    assert "against the positive control" in text and text.count(ORACLE_VARIANT) == 2  # UF1 and UAR, said apart
    assert f"minus the best single factor ({best}" in report.oracle_text(oracle)
    shown = report.by_motion_table(metrics)
    assert len(shown) == len(summary) and shown.iloc[0, 0].count("[") == 1
    keyed = lambda df: df.set_index(["variant", "bin"]).sort_index()  # noqa: E731
    pd.testing.assert_frame_equal(keyed(report.by_motion_frame(metrics)), keyed(by_motion.drop(columns="n_subjects")),
                                  check_dtype=False)  # metrics.json gives back what accuracy_by_motion found
    per_clip = stats.oracle_vs_preferred([r for (v, _), r in result.runs.items() if v == "AMAN"], truth, FACTORS)
    assert len(per_clip) == len(index) and per_clip["oracle_factor"].tolist() == result.oracle["factor"].tolist()
    assert per_clip["preferred_factor"].between(2, 4).all()
    for fig in (plots.accuracy_by_motion(by_motion, "by motion"), plots.oracle_vs_preferred(per_clip, 6.0, "oracle")):
        assert fig.axes

    # real data: no truth, no oracle, nothing by motion
    _, plain = run_ablations(x, index, factors=FACTORS, cfg=CFG, runs_dir=tmp_path / "runs", variants=variants,
                             seeds=[0, 1], progress=False)
    assert plain.oracle is None and ORACLE_VARIANT not in set(plain.predictions.variant)
    assert stats.oracle_check(plain, summary) is None and stats.accuracy_by_motion(plain.predictions, None) is None


def test_oracle_sensitivity_trains_one_oracle_per_target(tmp_path):
    index = uneven_index()
    x, truth = pooled(index), truth_of(index)
    result = run_oracle(x, index, truth=truth, factors=FACTORS, cfg=CFG, runs_dir=tmp_path, seeds=[0],
                        target_px=[6.0, 0.5], progress=False)
    assert set(result.predictions.variant) == {ORACLE_VARIANT, "oracle factor (truth, T = 0.5 px)"}
    assert set(result.oracle.loc[result.oracle.target_px == 0.5, "factor"]) == {2.0}  # 2 x 0.3 is nearest
    assert len(result.oracle) == 2 * len(index)


@pytest.mark.parametrize("seed", range(3))
def test_accuracy_by_tertile_sums_back_to_overall_accuracy(seed):
    rng = np.random.default_rng(seed)
    p = simulate(rng, {"AMAN": 0.6, "single factor 2": 0.4, "single factor 4": 0.5}, n_subjects=9, clips=7,
                 seeds=(0, 1, 2))
    clips = p.drop_duplicates("clip")
    truth = pd.DataFrame({"subject": clips["subject"].astype(str), "clip": clips["clip"].astype(str),
                          "peak_px": rng.choice([0.2, 0.5, 0.5, 1.0, 2.0, 2.0, 2.0], len(clips))})  # ties at cuts
    by_bin = stats.accuracy_by_motion(p, truth, n_resamples=100)
    n = len(clips)
    assert by_bin.groupby("variant")["n_clips"].sum().eq(n).all()  # every clip in one bin
    overall = stats.bootstrap_scores(p, n_resamples=10)["accuracy"]
    weighted = (by_bin["accuracy"] * by_bin["n_clips"]).groupby(by_bin["variant"]).sum() / n
    pd.testing.assert_series_equal(weighted[overall.index], overall, check_names=False, atol=1e-12, rtol=0)
    for s, one in p.groupby("seed"):
        part = stats.accuracy_by_motion(one, truth, n_resamples=10)
        acc = (part["accuracy"] * part["n_clips"]).groupby(part["variant"]).sum() / n
        truly = one.assign(hit=one["gt"] == one["pred"]).groupby("variant")["hit"].mean()
        pd.testing.assert_series_equal(acc[truly.index], truly, check_names=False, atol=1e-12, rtol=0)
    assert (by_bin["accuracy_ci_lo"] <= by_bin["accuracy"]).all()
    assert (by_bin["accuracy"] <= by_bin["accuracy_ci_hi"]).all()
    ranges = by_bin.drop_duplicates("bin")
    assert ranges["bin"].tolist()[0] == "small"
    assert (ranges["px_hi"].to_numpy()[:-1] < ranges["px_lo"].to_numpy()[1:]).all()  # bins do not overlap
    best = by_bin[by_bin.best_single_factor]
    assert len(best) == len(ranges) and set(best.variant) <= {"single factor 2", "single factor 4"}


def test_motion_bins_keep_equal_motions_together():
    codes, names = stats.motion_bins([6, 1, 2, 3, 4, 5], 3)
    assert names == ["small", "mid", "large"] and codes.tolist() == [2, 0, 0, 1, 1, 2]
    assert stats.motion_bins([1, 1, 1, 1, 2, 3], 3)[0].tolist() == [0, 0, 0, 0, 2, 2]  # ties: mid is left empty
    assert stats.motion_bins([1, 2, 3, 4], 4)[1] == ["bin 1 of 4", "bin 2 of 4", "bin 3 of 4", "bin 4 of 4"]


def test_the_headroom_bound_finds_a_planted_crossing_and_shuffled_bins_do_not():
    """bench/adaptation_headroom.py: where factor 2 is right on the small motions only and factor 4 on the large
    ones, the bound gives each half its factor and scores every clip right; bins of shuffled peaks cannot."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "adaptation_headroom", Path(__file__).resolve().parents[1] / "bench" / "adaptation_headroom.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    p = simulate(rng, {"single factor 2": 1.0, "single factor 4": 1.0}, n_subjects=8, clips=6, seeds=(0, 1))
    p = p.astype({"subject": str, "clip": str})
    clips = p.drop_duplicates(["subject", "clip"])
    peak = pd.Series(rng.uniform(0.1, 3.0, len(clips)), index=pd.MultiIndex.from_frame(clips[["subject", "clip"]]))
    small = peak.loc[list(zip(p["subject"], p["clip"]))].to_numpy() <= peak.median()
    wrong = (p["gt"] + 1) % 3
    p["pred"] = np.where((p["variant"] == "single factor 2") == small, p["gt"], wrong)  # each factor right on its half
    singles = ["single factor 2", "single factor 4"]
    bound, picks = bench.binned_choice(p, peak, singles, 2)
    assert picks == ["2", "4"] and len(bound) == len(p) // 2
    assert (bound["gt"] == bound["pred"]).all()
    assert bench._uf1(bound) == 1.0
    assert (bench.shuffled_bounds(p, peak, singles, 2, shuffles=20) < 0.9).all()
