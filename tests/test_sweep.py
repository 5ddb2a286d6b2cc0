"""run_sweep trains every fold x variant x seed at once and gives what run_loso gives for each."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import torch.nn.functional as F

import amanlib.sweep as sweep
from amanlib.cache import key_of
from amanlib.model import AMANHead, attention_weights
from amanlib.sweep import run_sweep
from amanlib.train import TrainConfig, Variant, run_inputs, run_loso
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


class WarmAlpha(AMANHead):
    """AMAN's head with a softmax temperature of 2 in alpha: a user's own head, which no projection form knows."""

    def forward(self, f):  # B, F, K, 512
        s = self.alpha[0](f)[..., 0]  # B, F, K
        w_alpha = torch.softmax(F.logsigmoid(s) / 2, -1) if self.use_alpha else torch.full_like(s, 1 / s.shape[-1])
        v_frame = (w_alpha[..., None] * f).sum(2)  # B, F, 512
        beta, w_beta = attention_weights(self.beta[0](v_frame)[..., 0], self.use_beta, -1)  # B, F
        return self.pred_fc((w_beta[..., None] * v_frame).sum(1)), torch.sigmoid(s), beta


def sweep_against_loso(tmp_path, cfg, variants, seeds, head=None):
    """run_sweep, and per (variant, seed) run_loso with the same settings: -> the sweep, [(batched, alone)]."""
    index, x = uneven_index(), pooled(uneven_index())
    result = run_sweep(x, index, cfg=cfg, variants=variants, seeds=seeds, runs_dir=tmp_path / "sweep",
                       factors=[1.0, 2.0, 4.0], progress=False, head=head)
    pairs = []
    for v in variants:
        for seed in seeds:
            vcfg = dataclasses.replace(cfg, seed=seed, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)
            alone = run_loso(x, index, cfg=vcfg, runs_dir=tmp_path / "loso", progress=False, head=head)
            assert result.runs[(v.name, seed)].out_dir.name == alone.out_dir.name  # the same keyed run
            pairs.append((result.runs[(v.name, seed)], alone))
    return result, pairs


def assert_same_predictions(batched, alone):
    cols = ["dataset", "subject", "clip", "gt", "pred", "fold", "epoch", "pred_last", "pred_best_test"]
    pd.testing.assert_frame_equal(batched.predictions[cols].reset_index(drop=True),
                                  alone.predictions[cols].reset_index(drop=True))
    pd.testing.assert_frame_equal(batched.history, alone.history, atol=1e-4, check_exact=False)


@pytest.mark.parametrize("rule", ["fixed", "paper", "inner_val"])
def test_sweep_equals_run_loso_per_variant_and_seed(tmp_path, rule):
    cfg = TrainConfig(epochs=4, step_size=2, batch_size=4, device="cpu", epoch_selection=rule)
    result, pairs = sweep_against_loso(tmp_path, cfg, VARIANTS, [0, 3])
    assert len(result.runs) == 8 and set(result.predictions.seed) == {0, 3}
    for (batched, alone), v in zip(pairs, [v for v in VARIANTS for _ in (0, 3)]):
        assert_same_predictions(batched, alone)
        if len(v.factor_slots) > 1:  # over one slot alpha cancels out: its gradient is rounding noise,
            np.testing.assert_allclose(np.stack(batched.predictions.alpha),  # which RMSprop scales up
                                       np.stack(alone.predictions.alpha), atol=1e-4)
        np.testing.assert_allclose(np.stack(batched.predictions.beta), np.stack(alone.predictions.beta), atol=1e-4)
        assert batched.config["factors"] == [[1.0, 2.0, 4.0][k] for k in v.factor_slots]  # values, not slots


def even_index(seed=0):
    """4 subjects, three with 3 clips and one with 5: two folds' models train side by side, one alone."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"dataset": "casme2", "subject": f"s{s}", "clip": f"c{s}_{c}", "label": int(rng.integers(3))}
                         for s, n in enumerate([3, 3, 3, 5]) for c in range(n)])


@pytest.mark.parametrize("layer4_bn, rule", [("per_slice", "fixed"), ("joint", "inner_val")])
def test_full_models_train_side_by_side_as_run_loso_trains_each(tmp_path, layer4_bn, rule, monkeypatch):
    """The full model (trunk maps; layer4 trains): every fold's model of a program runs in one side-by-side layer4.
    The first step's gradients agree to float rounding; RMSprop scales each weight's step by its own gradient's size,
    so rounding noise grows over steps: two epochs stay within 1e-3 of run_loso's losses, with the same predictions."""
    monkeypatch.setattr(sweep, "FULL_MODELS", 2)  # the three folds of 11 training clips: programs of 2 and 1 models
    index = even_index()
    x = torch.randn(len(index), 2, 3, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    x[:, :, 1, :2] += torch.tensor(index["label"].to_list(), dtype=torch.float32)[:, None, None, None, None]
    cfg = TrainConfig(epochs=2, step_size=1, batch_size=4, device="cpu", precision="fp32", layer4_bn=layer4_bn,
                      epoch_selection=rule)
    variants = [VARIANTS[2], VARIANTS[3]]
    sizes, build = [], sweep._full_program
    monkeypatch.setattr(sweep, "_full_program", lambda group, *a: sizes.append(len(group)) or build(group, *a))
    result = run_sweep(x, index, cfg=cfg, variants=variants, seeds=[0, 3], runs_dir=tmp_path / "sweep",
                       factors=[1.0, 2.0, 4.0], progress=False)
    if rule == "fixed":  # per (variant, seed): the fold of 9 training clips, then 2 + 1 of 11
        assert sorted(sizes) == [1] * 8 + [2] * 4
    for v in variants:
        for seed in (0, 3):
            vcfg = dataclasses.replace(cfg, seed=seed, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)
            alone = run_loso(x, index, cfg=vcfg, runs_dir=tmp_path / "loso", progress=False)
            batched = result.runs[(v.name, seed)]
            assert batched.out_dir.name == alone.out_dir.name
            cols = ["dataset", "subject", "clip", "gt", "pred", "fold", "epoch", "pred_last", "pred_best_test"]
            pd.testing.assert_frame_equal(batched.predictions[cols].reset_index(drop=True),
                                          alone.predictions[cols].reset_index(drop=True))
            pd.testing.assert_frame_equal(batched.history, alone.history, atol=1e-3, check_exact=False)
            np.testing.assert_allclose(np.stack(batched.predictions.beta), np.stack(alone.predictions.beta),
                                       atol=1e-2)


def test_a_killed_sweep_resumes_to_the_same_result(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=2, device="cpu")
    full = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                     progress=False)
    monkeypatch.setattr(sweep, "PROGRAM_MODELS", 1)  # one (variant, seed) job per batched program
    count_calls(monkeypatch, sweep, "_train_models", sweep._train_models, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                  progress=False)
    finished = list((tmp_path / "b").glob("*/done.json"))
    assert len(finished) == 2  # the first two runs are complete, nothing else is stamped
    calls = count_calls(monkeypatch, sweep, "_train_models", sweep._train_models)
    resumed = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0, 1], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                        progress=False)
    assert len(calls) == 6  # only the remaining six runs
    pd.testing.assert_frame_equal(resumed.predictions.drop(columns=["alpha", "beta"]),
                                  full.predictions.drop(columns=["alpha", "beta"]))
    with pytest.raises(ValueError, match="seeds"):
        run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[], runs_dir=tmp_path / "c", factors=[1, 2, 4],
                  progress=False)


def test_sweep_equals_run_loso_on_features_far_from_zero(tmp_path):
    """Pooled ReLU features sit far from zero (channel means up to ~20 standard deviations): folding each fold's
    standardisation into the weights must not cost precision there."""
    index = uneven_index()
    g = torch.Generator().manual_seed(5)
    x = pooled(index) * torch.rand(512, generator=g) * 0.1 + torch.rand(512, generator=g) * 2
    cfg = TrainConfig(epochs=6, step_size=3, device="cpu")
    result = run_sweep(x, index, cfg=cfg, variants=VARIANTS[:1], seeds=[0], runs_dir=tmp_path / "sweep", factors=[1,
                                                                                                                  2, 4],
                       progress=False)
    vcfg = dataclasses.replace(cfg, factor_slots=VARIANTS[0].factor_slots)
    alone = run_loso(x, index, cfg=vcfg, runs_dir=tmp_path / "loso", progress=False)
    batched = result.runs[(VARIANTS[0].name, 0)]
    pd.testing.assert_frame_equal(batched.predictions.drop(columns=["alpha", "beta"]).reset_index(drop=True),
                                  alone.predictions.drop(columns=["alpha", "beta"]).reset_index(drop=True))
    np.testing.assert_allclose(np.stack(batched.predictions.alpha), np.stack(alone.predictions.alpha), atol=1e-4)
    pd.testing.assert_frame_equal(batched.history, alone.history, atol=1e-4, check_exact=False)


def test_gathering_one_model_at_a_time_changes_nothing(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=2, device="cpu")
    together = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                         progress=False)
    monkeypatch.setattr(sweep, "CHUNK_ELEMENTS", 1)  # every matmul chunk holds one model's rows
    apart = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                      progress=False)
    pd.testing.assert_frame_equal(together.predictions.drop(columns=["alpha", "beta"]),
                                  apart.predictions.drop(columns=["alpha", "beta"]))
    pd.testing.assert_frame_equal(together.history, apart.history, atol=1e-6, check_exact=False)


def test_a_seeds_variants_gather_their_rows_once(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=3, device="cpu")
    shares, found = [], sweep._sharing
    monkeypatch.setattr(sweep, "_sharing", lambda *a: shares.append(found(*a)) or shares[-1])
    shared = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0, 3], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                       progress=False)
    assert sorted(shares) == [1, 3]  # AMAN and its two attention ablations per seed; the one-factor variant alone
    monkeypatch.setattr(sweep, "_sharing", lambda *a: 1)
    apart = run_sweep(x, index, cfg=cfg, variants=VARIANTS, seeds=[0, 3], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                      progress=False)
    pd.testing.assert_frame_equal(shared.predictions.drop(columns=["alpha", "beta"]),
                                  apart.predictions.drop(columns=["alpha", "beta"]))
    pd.testing.assert_frame_equal(shared.history, apart.history, atol=1e-6, check_exact=False)


def test_a_custom_head_trains_alike_in_the_sweep_and_run_loso(tmp_path):
    cfg = TrainConfig(epochs=4, step_size=2, device="cpu")
    warm, pairs = sweep_against_loso(tmp_path, cfg, VARIANTS, [0, 3], head=WarmAlpha)
    for batched, alone in pairs:
        assert_same_predictions(batched, alone)
    aman = run_sweep(pooled(uneven_index()), uneven_index(), cfg=cfg, variants=VARIANTS, seeds=[0, 3],
                     runs_dir=tmp_path / "aman",
                     factors=[1.0, 2.0, 4.0], progress=False)
    assert {r.out_dir for r in aman.runs.values()}.isdisjoint(r.out_dir for r in warm.runs.values())  # own keys
    differ = aman.history.train_loss.to_numpy() - warm.history.train_loss.to_numpy()
    assert np.abs(differ).max() > 1e-3 and (aman.predictions.pred != warm.predictions.pred).any()


def test_adamw_with_a_cosine_schedule_trains_alike_in_the_sweep_and_run_loso(tmp_path):
    """Folds of different sizes end their epochs at different steps: AdamW's step count must stay each model's."""
    cfg = TrainConfig(epochs=4, device="cpu", optimizer="adamw", schedule="cosine", lr=3e-3, weight_decay=1e-2)
    _, pairs = sweep_against_loso(tmp_path, cfg, VARIANTS[:2], [0])
    for batched, alone in pairs:
        assert_same_predictions(batched, alone)
        assert batched.config["optimizer"] == "adamw" and batched.history.lr.nunique() == 4  # cosine: every epoch


def test_the_optimiser_schedule_and_head_are_part_of_a_runs_key():
    index, cfg = uneven_index(), TrainConfig()
    key = lambda cfg, head=None: key_of(run_inputs("f", index, cfg, head))  # noqa: E731
    keys = {key(cfg), key(dataclasses.replace(cfg, optimizer="adamw")),
            key(dataclasses.replace(cfg, schedule="cosine")), key(cfg, WarmAlpha)}
    assert len(keys) == 4 and key(cfg, AMANHead) == key(cfg)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_the_bar_moves_every_epoch_by_whole_units(tmp_path, monkeypatch):
    """The training bar's ETA shows after the first epochs, not after the first program: a local sweep moves its
    bar (runs x folds) by whole units as epochs pass, ending exactly at its total."""
    updates = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.total = kwargs.get("total")

        def update(self, n=1):
            updates.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(sweep, "progress_bar", Bar)
    index = uneven_index()
    cfg = TrainConfig(epochs=10, batch_size=4, frozen_layer4=True)
    run_sweep(pooled(index), index, cfg=cfg, variants=VARIANTS[:2], seeds=[0], runs_dir=tmp_path, factors=[1.0, 2.0,
                                                                                                           4.0])
    moves = [n for n in updates if n]
    assert all(isinstance(n, int) and n > 0 for n in moves)
    assert sum(moves) == 2 * 5 and len(moves) >= 5  # 2 runs x 5 folds, in more steps than programs


def test_a_full_program_computes_alike_in_the_accelerators_channels_last_layout():
    """On an accelerator a full program feeds layer4 channels_last (a CPU does not): the same logits and attention
    in train and in eval mode."""
    index = even_index()
    x = torch.randn(len(index), 2, 3, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=4, device="cpu", precision="fp32", factor_slots=(1, 2))
    group = next(g for g in sweep._full_groups(index, sweep.loso_folds(index), [cfg], 8, 2 ** 20, 2, 3) if len(g) > 1)
    plain = sweep._full_program(group, x, 3, torch.device("cpu"), 2 ** 8)
    nhwc = dataclasses.replace(sweep._full_program(group, x, 3, torch.device("cpu"), 2 ** 8), channels_last=True)
    clips = torch.tensor(np.stack([d["fit"][:4] for d in group]))
    for training in (True, False):
        plain.train(training)
        nhwc.train(training)
        for a, b in zip(plain(clips), nhwc(clips)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
