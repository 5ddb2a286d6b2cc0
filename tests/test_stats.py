"""amanlib.stats: scores equal amanlib.metrics, CI coverage on clustered data, the sign-flip test, seeding,
the Spearman mechanism check and the preferred factor."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from amanlib import stats
from amanlib.metrics import accuracy, uar, uf1
from amanlib.stats import bootstrap_scores, paired_comparisons, preferred_factor, spearman_mechanism


def simulate(rng, p_correct: dict, n_subjects=20, clips=5, seeds=(0,), n_classes=3) -> pd.DataFrame:
    """Predictions of each variant and seed: gt uniform, correct with probability p_correct[variant] (a scalar
    or one value per subject), otherwise a uniformly drawn wrong class; the clips are the same for all."""
    subject = np.repeat(np.arange(n_subjects), clips)
    gt = rng.integers(0, n_classes, len(subject))
    parts = []
    for variant, p in p_correct.items():
        for seed in seeds:
            correct = rng.random(len(subject)) < np.broadcast_to(p, n_subjects)[subject]
            wrong = (gt + rng.integers(1, n_classes, len(subject))) % n_classes
            parts.append(pd.DataFrame({"variant": variant, "seed": seed, "dataset": "casme2", "subject": subject,
                                       "clip": np.arange(len(subject)), "gt": gt,
                                       "pred": np.where(correct, gt, wrong)}))
    return pd.concat(parts, ignore_index=True)


def random_labels(rng, n_subjects=6, clips=8, seeds=(0, 1)) -> pd.DataFrame:
    """Independent random labels: gt never class 3, variant B predicts 0-3, variant C only 0-1 (so classes
    are absent from some variants and subjects)."""
    df = simulate(rng, {"A": 0.5, "B": 0.3, "C": 0.5}, n_subjects, clips, seeds)
    df.loc[df.variant == "B", "pred"] = rng.integers(0, 4, (df.variant == "B").sum())
    df.loc[df.variant == "C", "pred"] = rng.integers(0, 2, (df.variant == "C").sum())
    return df


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_amanlib_metrics(seed):
    df = random_labels(np.random.default_rng(seed))
    out = bootstrap_scores(df, n_resamples=20)
    for variant, part in df.groupby("variant"):
        for name, fn in (("uf1", uf1), ("uar", uar), ("accuracy", accuracy)):
            per_seed = [fn(g["gt"], g["pred"]) for _, g in part.groupby("seed")]
            assert out.loc[variant, name] == pytest.approx(np.mean(per_seed), abs=1e-12)
            assert out.loc[variant, f"{name}_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert out[["n_seeds", "n_subjects", "n_clips"]].iloc[0].tolist() == [2, 6, 48]


def test_per_subject_scores_equal_amanlib_metrics():
    df = random_labels(np.random.default_rng(7), n_subjects=4, clips=3)
    tables = stats._tables(df)
    scores = stats._confusion_scores(tables.counts)
    keys = df["dataset"] + "/" + df["subject"].astype(str)
    for v, variant in enumerate(tables.variants):
        for s, seed in enumerate(sorted(df.seed.unique())):
            for n, subject in enumerate(tables.subjects):
                part = df[(df.variant == variant) & (df.seed == seed) & (keys == subject)]
                for name, fn in (("uf1", uf1), ("uar", uar), ("accuracy", accuracy)):
                    assert scores[name][v, s, n] == pytest.approx(fn(part["gt"], part["pred"]), abs=1e-12)


def test_ci_covers_true_accuracy_on_clustered_data():
    """Subject-level random effect: p_s ~ Beta(6, 3), so the expected accuracy is 6/9 and clips of a subject
    are correlated (ICC 0.1); the subject bootstrap must keep its nominal 95% coverage."""
    rng = np.random.default_rng(2024)
    covered = []
    for i in range(200):
        df = simulate(rng, {"AMAN": rng.beta(6, 3, 20)}, n_subjects=20, clips=5)
        row = bootstrap_scores(df, n_resamples=500, seed=i).loc["AMAN"]
        covered.append(row.accuracy_ci_lo <= 6 / 9 <= row.accuracy_ci_hi)
    assert 0.90 <= np.mean(covered) <= 0.99


def test_sign_flip_test_under_null_and_clear_effect():
    rng = np.random.default_rng(3)
    null = [paired_comparisons(simulate(rng, {"AMAN": 0.6, "B": 0.6}), n_resamples=50, n_permutations=2000,
                               seed=i)[0]["p_value"] for i in range(20)]
    assert np.mean(null) > 0.3 and np.mean(np.array(null) < 0.05) <= 0.15
    clear = paired_comparisons(simulate(rng, {"AMAN": 0.9, "B": 0.4}), metrics=("uf1", "uar", "accuracy"))
    for row in clear:
        assert row["p_value"] < 0.01 and row["diff"] > 0.3 and row["ci"][0] > 0


def test_exact_sign_flips_with_few_subjects():
    df = simulate(np.random.default_rng(0), {"AMAN": 1.0, "B": 0.0}, n_subjects=4, clips=3)
    (row,) = paired_comparisons(df, metrics=("accuracy",), n_permutations=16)
    assert row["p_value"] == 2 / 16 and row["diff"] == 1.0


def test_variant_against_its_copy_is_exactly_zero():
    df = simulate(np.random.default_rng(1), {"AMAN": 0.7, "B": 0.5}, seeds=(0, 1, 2))
    df = pd.concat([df, df[df.variant == "AMAN"].assign(variant="copy")], ignore_index=True)
    rows = [r for r in paired_comparisons(df, metrics=("uf1", "uar", "accuracy"), n_resamples=300) if r["b"] == "copy"]
    assert len(rows) == 3
    for row in rows:
        assert row["diff"] == 0.0 and row["ci"] == [0.0, 0.0] and row["p_value"] == 1.0


def test_seeding_and_uneven_seed_counts():
    df = simulate(np.random.default_rng(2), {"AMAN": 0.7, "B": 0.5}, seeds=(0, 1, 2))
    df = df[(df.variant == "AMAN") | (df.seed == 0)]
    first, again, other = (bootstrap_scores(df, n_resamples=200, seed=s) for s in (5, 5, 6))
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first.filter(like="_ci_").to_numpy(), other.filter(like="_ci_").to_numpy())
    assert first.n_seeds.tolist() == [3, 1] and first.loc["B", "uf1_std"] == 0
    assert paired_comparisons(df, n_resamples=200, seed=5) == paired_comparisons(df, n_resamples=200, seed=5)


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns="gt"), "missing"),
    (lambda df: df.iloc[:0], "empty"),
    (lambda df: df.drop(index=df.index[-1]), "same 100 clips"),
    (lambda df: df.assign(gt=np.where(df.variant == "B", (df["gt"] + 1) % 3, df["gt"])), "different gt"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "repeat"),
])
def test_bad_predictions_are_named(change, message):
    df = simulate(np.random.default_rng(0), {"AMAN": 0.7, "B": 0.5})
    with pytest.raises(ValueError, match=message):
        bootstrap_scores(change(df), n_resamples=10)


def test_bad_arguments_are_named():
    df = simulate(np.random.default_rng(0), {"AMAN": 0.7, "B": 0.5})
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_scores(df, n_resamples=0)
    with pytest.raises(ValueError, match="level"):
        paired_comparisons(df, level=1.0)
    with pytest.raises(ValueError, match="reference 'X'"):
        paired_comparisons(df, reference="X")
    with pytest.raises(ValueError, match="metrics"):
        paired_comparisons(df, metrics=("f1",))


def test_weighted_spearman_equals_scipy_on_the_expanded_sample():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)  # ties in x
    weights = rng.integers(0, 3, (6, 30)).astype(float)
    expected = [spearmanr(np.repeat(x, w.astype(int)), np.repeat(y, w.astype(int)))[0] for w in weights]
    np.testing.assert_allclose(stats._weighted_spearman(x, y, weights), expected, atol=1e-12)


def test_spearman_mechanism_negative_and_independent():
    rng = np.random.default_rng(5)
    x = pd.Series(rng.uniform(2, 12, 200))
    strong = spearman_mechanism(x, -x ** 2 + rng.normal(0, 5, 200), n_resamples=1000,
                                clusters=pd.Series(np.arange(200) // 10))
    assert strong["spearman_r"] < -0.8 and strong["ci"][1] < 0 and strong["p_value"] < 0.01 and strong["n"] == 200
    noise = pd.Series(rng.normal(size=200))
    none = spearman_mechanism(x, noise, n_resamples=1000)
    assert abs(none["spearman_r"]) < 0.2 and none["ci"][0] < 0 < none["ci"][1] and none["p_value"] > 0.05
    assert none == spearman_mechanism(x, noise, n_resamples=1000)


def test_spearman_mechanism_p_value_counts_subjects_not_clips():
    """Clips share their subject's motion and preference: 240 clips of 8 subjects with no relation between the
    subjects' values look significant clip by clip, but not subject by subject."""
    from scipy.stats import spearmanr
    rng = np.random.default_rng(3)
    subject = np.repeat(np.arange(8), 30)
    x = pd.Series(rng.normal(size=8)[subject] + rng.normal(0, 0.1, 240))
    y = pd.Series(rng.normal(size=8)[subject] + rng.normal(0, 0.1, 240))
    assert spearmanr(x, y).pvalue < 1e-3  # as if the 240 clips were independent
    clustered = spearman_mechanism(x, y, n_resamples=1000, clusters=pd.Series(subject))
    assert clustered["p_value"] > 0.05 and clustered["ci"][0] < 0 < clustered["ci"][1]


def test_spearman_mechanism_names_nans():
    x, y = pd.Series([1.0, np.nan, 3.0, 4.0]), pd.Series([np.nan, 2.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="3 NaN"):
        spearman_mechanism(x, y)


def test_preferred_factor_by_hand():
    alpha = np.array([[[1, 0, 0], [1, 1, 0]],  # frames prefer 2 and (2 + 4) / 2 = 3
                      [[1, 1, 2], [0, 0, 3]]], dtype=float)  # (2 + 4 + 16) / 4 = 5.5 and 8
    np.testing.assert_allclose(preferred_factor(alpha, [2, 4, 8]), [2.5, 6.75])
    with pytest.raises(ValueError, match="K = 2"):
        preferred_factor(alpha, [2, 4])
    with pytest.raises(ValueError, match="non-negative"):
        preferred_factor(-alpha, [2, 4, 8])
    saturated = alpha.copy()
    saturated[0, 1] = 0  # a frame whose alpha underflowed to 0 for every factor is skipped, not an error
    saturated[1] = 0  # a clip without any weighted frame has no preferred factor
    np.testing.assert_allclose(preferred_factor(saturated, [2, 4, 8]), [2.0, np.nan])


def test_fewer_than_min_subjects_cannot_reach_p_005_and_nothing_is_concluded():
    """MIN_SUBJECTS is where the exact sign-flip test first can reach p < 0.05 (issue 22: 2 subjects gave a '95% CI'
    and p 0.001); below it the texts mark the statistics and draw no conclusion."""
    from amanlib import report
    smallest = {}
    for n in (stats.MIN_SUBJECTS - 1, stats.MIN_SUBJECTS):
        signs, exact = stats._sign_flips(n, 10000, np.random.default_rng(0))
        smallest[n] = stats._sign_flip_p(np.ones(n), signs, exact)  # every subject favours one side: the least p
    assert smallest[stats.MIN_SUBJECTS - 1] > 0.05 > smallest[stats.MIN_SUBJECTS]
    comparisons = [{"a": "AMAN", "b": "no magnification", "metric": "uf1", "diff": 0.2, "ci": [0.1, 0.3],
                    "p_value": 0.001}]
    few, enough = report.comparisons_text(comparisons, 2), report.comparisons_text(comparisons, 32)
    assert "Too few subjects" in few and "with 2 subjects" in few and "scores higher" not in few
    assert "scores higher than no magnification" in enough and "Too few" not in enough
    mechanism = {"spearman_r": 0.6, "ci": [0.5, 1.0], "p_value": 0.001, "n": 18}
    assert "larger motions prefer" not in stats.mechanism_text(mechanism, 2)
    assert "Too few subjects" in stats.mechanism_text(mechanism, 2)
    assert "larger motions prefer larger factors" in stats.mechanism_text(mechanism, 32)


def test_mechanism_skips_and_counts_frames_without_alpha_weight():
    """The full model on a small set gave frames whose alpha was 0 for every factor (issue 22): the mechanism check
    skips them, counts them and says how many clips it used, instead of failing after training."""
    from types import SimpleNamespace
    from amanlib.stats import mechanism_check
    rng = np.random.default_rng(0)
    n = 24
    truth = pd.DataFrame({"subject": [f"s{i % 8}" for i in range(n)], "clip": [f"c{i}" for i in range(n)],
                          "peak_px": rng.uniform(0.2, 2, n)})
    alpha = rng.uniform(0.1, 1, (n, 2, 3))
    alpha[0, 1] = 0  # one frame saturated
    alpha[1] = 0  # one clip with no weight at all
    predictions = truth[["subject", "clip"]].assign(alpha=list(alpha))
    run = SimpleNamespace(predictions=predictions, config={"factors": [2.0, 4.0, 8.0]})
    result = mechanism_check(SimpleNamespace(runs={("AMAN", 0): run}), truth)
    assert result["n"] == n - 1 and result["frames_without_weight"] == 3 and result["clips_without_weight"] == 1
    assert "3 frames without alpha weight skipped" in stats.mechanism_text(result, 8)


def test_a_mechanism_without_spread_is_undefined_not_an_error():
    """A tiny or one-epoch run can prefer one factor for every clip: rho is then undefined, which the check, its text,
    and the figure say, instead of stopping notebook 04 after training."""
    from types import SimpleNamespace
    from amanlib import plots
    from amanlib.stats import mechanism_check
    truth = pd.DataFrame({"subject": ["s0", "s1", "s2"], "clip": ["c0", "c1", "c2"], "peak_px": [0.5, 1.0, 2.0]})
    alpha = np.tile([0.2, 0.9], (3, 1, 1))  # every clip prefers the same factor
    run = SimpleNamespace(predictions=truth[["subject", "clip"]].assign(alpha=list(alpha)), config={"factors": [2, 8]})
    result = mechanism_check(SimpleNamespace(runs={("AMAN", 0): run}), truth)
    assert result["spearman_r"] is None and result["n"] == 3
    assert result["undefined"] == "the preferred factor is the same for every clip"
    assert stats.mechanism_text(result, 3) == ("Spearman's rho is undefined here (the preferred factor is the same for "
                                               "every clip; n = 3 clips).")
    fig = plots.mechanism_scatter(truth["peak_px"], [6.6] * 3, result, "tiny")
    assert "undefined" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="non-constant"):  # the statistic itself still refuses such data
        stats.spearman_mechanism(pd.Series([6.6] * 3, index=truth["clip"]), truth.set_index("clip")["peak_px"])
