"""run_sweep trains every fold x variant x seed at once and gives what run_loso gives for each."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import amanlib.sweep as sweep
from amanlib.sweep import run_sweep
from amanlib.train import TrainConfig, Variant, run_loso
from conftest import count_calls


def uneven_index(seed=0):
    """5 subjects with 3 to 7 clips: folds of different sizes and a short last batch."""
    rng = np.random.default_rng(seed)
    rows = [{"dataset": "casme2", "subject": f"s{s}", "clip": f"c{s}_{c}", "label": int(rng.integers(3))}
            for s, n in enumerate([3, 5, 7, 4, 6]) for c in range(n)]
    return pd.DataFrame(rows)


def pooled(index, F=2, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), F, K, 512, generator=g)
    x[:, :, 1] += 0.3 * torch.randn(3, 512, generator=g)[torch.tensor(index["label"].to_list())][:, None]
    return x


VARIANTS = [Variant("AMAN", (1, 2)), Variant("alpha only", (1, 2), use_beta=False),
            Variant("beta only", (1, 2), use_alpha=False), Variant("one factor", (1,))]


@pytest.mark.parametrize("rule", ["fixed", "paper", "inner_val"])
def test_sweep_equals_run_loso_per_variant_and_seed(tmp_path, rule):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=4, step_size=2, batch_size=4, device="cpu", epoch_selection=rule)
    result = run_sweep(x, index, cfg, VARIANTS, seeds=[0, 3], runs_dir=tmp_path / "sweep", factors=[1.0, 2.0, 4.0],
                       progress=False)
    assert len(result.runs) == 8 and set(result.predictions.seed) == {0, 3}
    for v in VARIANTS:
        for seed in (0, 3):
            vcfg = dataclasses.replace(cfg, seed=seed, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)
            alone = run_loso(x, index, vcfg, tmp_path / "loso", progress=False)
            batched = result.runs[(v.name, seed)]
            assert batched.out_dir.name == alone.out_dir.name  # the same keyed run
            cols = ["dataset", "subject", "clip", "gt", "pred", "fold", "epoch", "pred_last", "pred_best_test"]
            pd.testing.assert_frame_equal(batched.predictions[cols].reset_index(drop=True),
                                          alone.predictions[cols].reset_index(drop=True))
            if len(v.factor_slots) > 1:  # over one slot alpha cancels out: its gradient is rounding noise,
                np.testing.assert_allclose(np.stack(batched.predictions.alpha),  # which RMSprop scales up
                                           np.stack(alone.predictions.alpha), atol=1e-4)
            np.testing.assert_allclose(np.stack(batched.predictions.beta), np.stack(alone.predictions.beta), atol=1e-4)
            pd.testing.assert_frame_equal(batched.history, alone.history, atol=1e-4, check_exact=False)
            assert batched.config["factors"] == [[1.0, 2.0, 4.0][k] for k in v.factor_slots]  # values, not slots


def test_a_killed_sweep_resumes_to_the_same_result(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=2, device="cpu")
    full = run_sweep(x, index, cfg, VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "a", factors=[1, 2, 4], progress=False)
    monkeypatch.setattr(sweep, "CHUNK_ELEMENTS", 1)  # one (variant, seed) job per batched program
    count_calls(monkeypatch, sweep, "_train_models", sweep._train_models, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(x, index, cfg, VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "b", factors=[1, 2, 4], progress=False)
    finished = list((tmp_path / "b").glob("*/done.json"))
    assert len(finished) == 2  # the first two runs are complete, nothing else is stamped
    calls = count_calls(monkeypatch, sweep, "_train_models", sweep._train_models)
    resumed = run_sweep(x, index, cfg, VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                        progress=False)
    assert len(calls) == 6  # only the remaining six runs
    pd.testing.assert_frame_equal(resumed.predictions.drop(columns=["alpha", "beta"]),
                                  full.predictions.drop(columns=["alpha", "beta"]))
    with pytest.raises(ValueError, match="seeds"):
        run_sweep(x, index, cfg, VARIANTS, seeds=[], runs_dir=tmp_path / "c", factors=[1, 2, 4], progress=False)


def test_per_batch_standardisation_equals_the_precomputed_one(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=2, device="cpu")
    kept = run_sweep(x, index, cfg, VARIANTS[:2], seeds=[0], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                     progress=False)
    monkeypatch.setattr(sweep, "STANDARDISED_BYTES", 0)  # features too large to standardise once per fold
    per_batch = run_sweep(x, index, cfg, VARIANTS[:2], seeds=[0], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                          progress=False)
    pd.testing.assert_frame_equal(kept.predictions.drop(columns=["alpha", "beta"]),
                                  per_batch.predictions.drop(columns=["alpha", "beta"]))
