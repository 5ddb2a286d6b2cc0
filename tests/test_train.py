import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import amanlib.train as train
from amanlib.metrics import accuracy, read_megc_log
from amanlib.sweep import run_ablations
from amanlib.train import TrainConfig, ablation_variants, loso_folds, run_loso
from conftest import count_calls


def toy_index(n_subjects=5, per_subject=6, seed=0, datasets=("casme2",)):
    rng = np.random.default_rng(seed)
    rows = [{"dataset": datasets[s % len(datasets)], "subject": f"sub{s:02d}", "clip": f"EP{s:02d}_{c:02d}",
             "label": int(rng.integers(3))} for s in range(n_subjects) for c in range(per_subject)]
    return pd.DataFrame(rows)


def toy_pooled(index, F=3, K=4, signal=1.0, seed=0):
    """Pooled features [N, F, K, 512]: class means plus noise, the signal only in factor slot 1."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(3, 512, generator=g)
    x = torch.randn(len(index), F, K, 512, generator=g)
    x[:, :, 1] += signal * means[torch.tensor(index["label"].to_list())][:, None]
    return x


def toy_maps(index, F=2, K=2, C=16, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), F, K, C, size, size, generator=g)
    x[..., :2, :, :] += torch.tensor(index["label"].to_list(), dtype=torch.float32)[:, None, None, None, None, None]
    return x.half()


FAST = dict(epochs=3, device="cpu", step_size=2)


def test_folds_hold_every_subject_out_once():
    index = toy_index(n_subjects=4, datasets=("casme2", "samm"))
    index.loc[index.subject == "sub03", "subject"] = "sub01"  # same name in another dataset: a different subject
    folds = loso_folds(index)
    assert [f[0] for f in folds] == ["casme2/sub00", "samm/sub01", "casme2/sub02", "samm/sub01"][:len(folds)]
    tested = np.concatenate([f[1] for f in folds])
    assert sorted(tested) == list(range(len(index)))
    for name, test, tr in folds:
        assert set(test).isdisjoint(tr) and len(test) + len(tr) == len(index)
        key = index.dataset + "/" + index.subject
        assert set(key[test]) == {name} and name not in set(key[tr])
    with pytest.raises(ValueError, match="label"):
        loso_folds(index.drop(columns="label"))


def test_full_model_is_deterministic(tmp_path):
    index = toy_index(n_subjects=3, per_subject=2)
    x = toy_maps(index)
    cfg = TrainConfig(epochs=2, step_size=1, device="cpu", batch_size=4)
    a = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "a", progress=False)
    b = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(a.predictions.drop(columns=["alpha", "beta"]),
                                  b.predictions.drop(columns=["alpha", "beta"]))
    np.testing.assert_array_equal(np.stack(a.predictions.alpha), np.stack(b.predictions.alpha))
    assert np.stack(a.predictions.alpha).shape == (6, 2, 2) and np.stack(a.predictions.beta).shape == (6, 2)
    pd.testing.assert_frame_equal(a.history, b.history)
    assert len(a.history) == 3 * 2 and set(a.history.columns) >= {"fold", "epoch", "lr", "train_loss", "test_acc"}
    assert a.history.lr.tolist()[:2] == pytest.approx([1e-3, 1e-3 * 0.2])  # StepLR(step 1 here, gamma 0.2)
    for name in ["predictions.csv", "history.csv", "scores.csv", "attention.npz", "megc_log.txt"]:
        assert (a.out_dir / name).exists()


def test_bf16_autocast_path_runs_on_cpu(tmp_path, monkeypatch):
    """CPU bf16 autocast stands in for CUDA's: the same code path, checked to really run in bf16."""
    index = toy_index(n_subjects=2, per_subject=1)
    dtypes = []
    real_pool = train.AMAN.pool

    def recording_pool(self, x):
        f = real_pool(self, x)
        dtypes.append(f.dtype)
        return f

    monkeypatch.setattr(train.AMAN, "pool", recording_pool)
    cfg = TrainConfig(epochs=1, device="cpu", precision="bf16_emulated")
    res = run_loso(toy_maps(index, K=1), index, cfg=cfg, runs_dir=tmp_path, progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert np.isfinite(np.stack(res.predictions.alpha)).all()


def test_learns_a_separable_toy_problem(tmp_path):
    index = toy_index(n_subjects=6, per_subject=8)
    res = run_loso(toy_pooled(index, signal=0.5), index, cfg=TrainConfig(epochs=8, device="cpu"), runs_dir=tmp_path,
                   progress=False)
    assert res.scores.loc["full", "accuracy"] > 0.9
    # the label lives in factor slot 1 only: alpha must learn to prefer it
    alpha = np.stack(res.predictions.alpha)
    assert alpha[:, :, 1].mean() > alpha[:, :, [0, 2, 3]].mean()


def test_resume_after_interruption_gives_identical_results(tmp_path, monkeypatch):
    index = toy_index(n_subjects=4)
    x = toy_pooled(index, signal=0.1)
    cfg = TrainConfig(**FAST)
    full = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "full", progress=False)

    real = train.train_fold
    count_calls(monkeypatch, train, "train_fold", real, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "resumed", progress=False)
    folds = [p for p in (tmp_path / "resumed").glob("*/folds")]
    assert len(folds) == 1 and len(list(folds[0].glob("*.pt"))) == 2
    assert not list(folds[0].glob(".*"))  # no half-written files
    calls = count_calls(monkeypatch, train, "train_fold", real)
    resumed = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "resumed", progress=False)
    assert len(calls) == 2  # only the two unfinished folds ran
    pd.testing.assert_frame_equal(resumed.predictions.drop(columns=["alpha", "beta"]),
                                  full.predictions.drop(columns=["alpha", "beta"]))
    other = run_loso(x, index, cfg=dataclasses.replace(cfg, lr=0.5), runs_dir=tmp_path / "resumed", progress=False)
    assert other.out_dir != resumed.out_dir and other.config["lr"] == 0.5  # its own folder; nothing mixed


def test_paper_protocol_is_optimistic(tmp_path):
    index = toy_index(n_subjects=6, per_subject=6)
    x = toy_pooled(index, signal=0.08)  # weak signal: held-out accuracy varies from epoch to epoch
    fixed = run_loso(x, index, cfg=TrainConfig(epochs=6, device="cpu"), runs_dir=tmp_path / "fixed", progress=False)
    paper = run_loso(x, index, cfg=TrainConfig(epochs=6, device="cpu", epoch_selection="paper"),
                     runs_dir=tmp_path / "paper",
                     progress=False)
    acc = lambda r: accuracy(r.predictions["gt"], r.predictions["pred"])
    assert acc(paper) >= acc(fixed)
    assert acc(paper) > acc(fixed)  # on this toy problem the per-subject best epoch must beat the last one
    # the same run already yields the optimistic numbers, so the gap can be shown without training twice
    np.testing.assert_array_equal(fixed.predictions.pred_best_test, paper.predictions.pred)
    assert "OPTIMISTIC" in (paper.out_dir / "megc_log.txt").read_text().splitlines()[0]
    assert "optimistic" in paper.scores.epoch_selection.iloc[0]


def test_inner_val_never_sees_the_test_subject(tmp_path, monkeypatch):
    index = toy_index(n_subjects=4)
    seen = []
    real = train.inner_val_subject

    def recording(index, rows, seed):
        seen.append((rows, real(index, rows, seed)))
        return seen[-1][1]

    monkeypatch.setattr(train, "inner_val_subject", recording)
    res = run_loso(toy_pooled(index), index, cfg=TrainConfig(**FAST, epoch_selection="inner_val"), runs_dir=tmp_path,
                   progress=False)
    for (name, test, _), (train_rows, val) in zip(loso_folds(index), seen):
        assert set(val) <= set(train_rows) and set(val).isdisjoint(test) and len(val) == 6
    assert "val_uf1" in res.history and res.history.groupby("fold").val_uf1.count().eq(3).all()


def test_predictions_round_trip_through_megc_log(tmp_path):
    index = toy_index(n_subjects=3, datasets=("smic", "casme2", "samm"))
    res = run_loso(toy_pooled(index), index, cfg=TrainConfig(**FAST), runs_dir=tmp_path, progress=False)
    back = read_megc_log(res.out_dir / "megc_log.txt")
    pd.testing.assert_frame_equal(back, res.predictions[["dataset", "subject", "clip", "gt", "pred"]]
                                  .reset_index(drop=True).astype({"gt": int, "pred": int}))
    assert list(res.scores.index) == ["full", "smic", "casme2", "samm"]


def test_frozen_layer4_and_ablations(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(0)
    torch.save({"state_dict": resnet18().state_dict()}, tmp_path / "trunk.pth")
    index = toy_index(n_subjects=3, per_subject=4)
    x = toy_maps(index, F=2, K=3, C=256, size=4)
    factors = [1.0, 2.0, 4.0]
    names = [v.name for v in ablation_variants(factors)]
    assert names == ["AMAN", "magnification attention only", "frame attention only", "no magnification",
                     "single factor 2", "single factor 4"]
    assert ablation_variants(factors)[0].factor_slots == (1, 2)
    cfg = TrainConfig(**FAST, frozen_layer4=True, layer4_init="backbone", init_layer4_from=str(tmp_path / "trunk.pth"))
    table, result = run_ablations(x, index, factors=factors, cfg=cfg, runs_dir=tmp_path / "abl", progress=False)
    runs = {v: r for (v, _), r in result.runs.items()}
    assert set(table.variant) == set(names) and set(table.subset) == {"full", "casme2"}
    assert (table.model == "AMAN, frozen layer4").all()
    assert runs["AMAN"].config["factors"] == [2.0, 4.0] and runs["no magnification"].config["factors"] == [1.0]
    pooled_files = list((tmp_path / "abl" / "pooled").glob("*/pooled.pt"))
    assert len(pooled_files) == 1  # pooled once for all variants
    pooled = torch.load(pooled_files[0])
    assert pooled.shape == (12, 2, 3, 512)


@pytest.mark.parametrize("rule, test_acc, expected", [
    ("paper", [0.5, 1.0, 1.0], (1, 1, 2)),  # stops at its first 100% epoch, which it keeps
    ("paper", [0.0, 0.0, 0.0], (2, 2, 3)),  # never classified right: the last epoch, as the authors keep it
    ("paper", [0.3, 0.6, 0.6, 0.2], (1, 1, 4)),  # the first epoch reaching the best
    ("fixed", [0.0, 1.0, 0.5], (2, 1, 3)),  # honest rules never stop on test accuracy
])
def test_epoch_rules(rule, test_acc, expected):
    assert train.choose_epoch([{"test_acc": a} for a in test_acc], rule) == expected


def test_paper_rule_stops_at_100_and_keeps_the_last_epoch_of_a_subject_never_right(tmp_path):
    index = toy_index(n_subjects=4, per_subject=6)
    index["label"] = [0, 1] * 12
    index.loc[index.subject == "sub03", "label"] = 2  # a class no training clip has: never predicted
    x = toy_pooled(index, signal=3.0)
    cfg = TrainConfig(epochs=8, device="cpu", epoch_selection="paper")
    paper = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "paper", progress=False)
    fixed = run_loso(x, index, cfg=dataclasses.replace(cfg, epoch_selection="fixed"), runs_dir=tmp_path / "fixed",
                     progress=False)
    epochs = paper.history.groupby("fold").epoch.max() + 1
    assert (paper.history.groupby("fold").test_acc.max() == 1.0).sum() >= 2  # the signal is strong enough
    for fold, h in paper.history.groupby("fold"):
        hits = np.flatnonzero(h.test_acc.to_numpy() == 1.0)
        assert epochs[fold] == (hits[0] + 1 if len(hits) else 8)  # trained up to the first 100% epoch only
    never = paper.predictions[paper.predictions.subject == "sub03"]
    assert (never.epoch == 7).all() and (never.pred != never.gt).all()
    assert (fixed.history.groupby("fold").epoch.max() == 7).all()
    np.testing.assert_array_equal(fixed.predictions.pred_best_test, paper.predictions.pred)


def _no_stamp(runs_dir) -> bool:
    return not list(runs_dir.rglob("done.json"))


def test_a_diverged_run_raises_naming_the_run_and_caches_nothing(tmp_path):
    index = toy_index(n_subjects=3, per_subject=4)
    x = toy_pooled(index)
    cfg = TrainConfig(**FAST, lr=1e37)  # RMSprop steps of about lr: the parameters overflow to inf
    with pytest.raises(train.TrainingDiverged, match=r"fold casme2/sub00, epoch \d.*lr 1e\+37.*Nothing of this run "
                                                     r"is cached") as e:
        run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "loso", progress=False)
    assert e.value.fold == "casme2/sub00" and _no_stamp(tmp_path / "loso")
    with pytest.raises(train.TrainingDiverged, match=r"^AMAN: training diverged \(seed 0.*fold casme2/sub00"):
        run_ablations(x, index, factors=[1.0, 2.0, 4.0, 8.0], cfg=cfg, runs_dir=tmp_path / "sweep", progress=False)
    assert _no_stamp(tmp_path / "sweep")


def test_the_full_model_raises_on_divergence_too(tmp_path):
    index = toy_index(n_subjects=3, per_subject=2)
    with pytest.raises(train.TrainingDiverged, match=r"fold casme2/sub00, epoch \d"):
        run_loso(toy_maps(index, C=256, size=4), index, cfg=TrainConfig(**FAST, lr=1e37), runs_dir=tmp_path / "r",
                 progress=False)
    assert _no_stamp(tmp_path / "r")


def test_a_channel_constant_over_the_training_clips_is_centred_not_divided():
    fit = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    fit[:, 7] = 0.5  # a ReLU channel that never fires differently on these clips
    fit[:, 9] = 0.25
    fit[:3, 9] += 1e-6  # float noise on an otherwise constant channel
    shift, scale = train.standardisation(fit)
    assert scale[7] == 1 and scale[9] == 1 and shift[7] == 0.5
    torch.testing.assert_close(scale[:7], fit[:, :7].std(0))  # the others are divided by their deviation


@pytest.mark.parametrize("slots, use_alpha, use_beta", [((2,), True, True), (None, False, True), (None, True, False)])
def test_unread_attention_stays_zero_and_nothing_turns_denormal(tmp_path, slots, use_alpha, use_beta):
    """Weight decay drives attention layers whose scores nothing reads towards 0 through denormal floats (a slow path
    of every CPU matmul); they start at 0 and stay there, and the run's predictions are those of a random start."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 4, 512, generator=g)
    labels = torch.arange(24) % 3
    cfg = TrainConfig(epochs=30, batch_size=4, factor_slots=slots, use_alpha=use_alpha, use_beta=use_beta,
                      weight_decay=0.1, device="cpu")
    fold = train._Fold(cfg, x, labels, 3, torch.device("cpu"), seed=0, fit_rows=np.arange(24))
    unread = [fold.model.alpha[0]] if slots or not use_alpha else []
    unread += [] if use_beta else [fold.model.beta[0]]
    assert unread and all(float(p.detach().abs().sum()) == 0 for layer in unread for p in layer.parameters())
    for _ in range(cfg.epochs):
        fold.train_epoch(np.arange(24))
    for layer in unread:
        assert all(float(p.detach().abs().sum()) == 0 for p in layer.parameters())
    smallest = torch.finfo(torch.float32).tiny
    for name, p in fold.model.named_parameters():
        assert not ((p != 0) & (p.abs() < smallest)).any(), f"{name} holds denormal floats"


def test_variants_are_chosen_by_name_in_the_order_given():
    factors = [1.0, 2.0, 4.5, 7.0]
    chosen = train.select_variants(factors, ["single factor 4.5", "AMAN", "no magnification"])
    assert [v.name for v in chosen] == ["single factor 4.5", "AMAN", "no magnification"]
    assert [v.factor_slots for v in chosen] == [(2,), (1, 2, 3), (0,)]
    assert train.select_variants(factors) == train.ablation_variants(factors)
    with pytest.raises(ValueError, match=r"variants \['single factor 12'\] are not variants of these features "
                                         r"\(factors \[1.0, 2.0, 4.5, 7.0\]\); the variants are \['AMAN', "):
        train.select_variants(factors, ["AMAN", "single factor 12"])

