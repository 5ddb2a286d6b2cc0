"""run_sweep trains every fold x variant x seed at once and gives what run_loso gives for each."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import amanlib.sweep as sweep
from amanlib.sweep import run_sweep
from amanlib.model import AMAN
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
    monkeypatch.setattr(sweep, "PROGRAM_MODELS", 1)  # one (variant, seed) job per batched program
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


def test_sweep_equals_run_loso_on_features_far_from_zero(tmp_path):
    """Pooled ReLU features sit far from zero (channel means up to ~20 standard deviations): folding each fold's
    standardisation into the weights must not cost precision there."""
    index = uneven_index()
    g = torch.Generator().manual_seed(5)
    x = pooled(index) * torch.rand(512, generator=g) * 0.1 + torch.rand(512, generator=g) * 2
    cfg = TrainConfig(epochs=6, step_size=3, device="cpu")
    result = run_sweep(x, index, cfg, VARIANTS[:1], seeds=[0], runs_dir=tmp_path / "sweep", factors=[1, 2, 4],
                       progress=False)
    vcfg = dataclasses.replace(cfg, factor_slots=VARIANTS[0].factor_slots)
    alone = run_loso(x, index, vcfg, tmp_path / "loso", progress=False)
    batched = result.runs[(VARIANTS[0].name, 0)]
    pd.testing.assert_frame_equal(batched.predictions.drop(columns=["alpha", "beta"]).reset_index(drop=True),
                                  alone.predictions.drop(columns=["alpha", "beta"]).reset_index(drop=True))
    np.testing.assert_allclose(np.stack(batched.predictions.alpha), np.stack(alone.predictions.alpha), atol=1e-4)
    pd.testing.assert_frame_equal(batched.history, alone.history, atol=1e-4, check_exact=False)


def test_gathering_one_model_at_a_time_changes_nothing(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=2, device="cpu")
    together = run_sweep(x, index, cfg, VARIANTS, seeds=[0], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                         progress=False)
    monkeypatch.setattr(sweep, "CHUNK_ELEMENTS", 1)  # every matmul chunk holds one model's rows
    apart = run_sweep(x, index, cfg, VARIANTS, seeds=[0], runs_dir=tmp_path / "b", factors=[1, 2, 4], progress=False)
    pd.testing.assert_frame_equal(together.predictions.drop(columns=["alpha", "beta"]),
                                  apart.predictions.drop(columns=["alpha", "beta"]))
    pd.testing.assert_frame_equal(together.history, apart.history, atol=1e-6, check_exact=False)


def test_a_seeds_variants_gather_their_rows_once(tmp_path, monkeypatch):
    index, x = uneven_index(), pooled(uneven_index())
    cfg = TrainConfig(epochs=3, device="cpu")
    shares, found = [], sweep._sharing
    monkeypatch.setattr(sweep, "_sharing", lambda *a: shares.append(found(*a)) or shares[-1])
    shared = run_sweep(x, index, cfg, VARIANTS, seeds=[0, 3], runs_dir=tmp_path / "a", factors=[1, 2, 4],
                       progress=False)
    assert sorted(shares) == [1, 3]  # AMAN and its two attention ablations per seed; the one-factor variant alone
    monkeypatch.setattr(sweep, "_sharing", lambda *a: 1)
    apart = run_sweep(x, index, cfg, VARIANTS, seeds=[0, 3], runs_dir=tmp_path / "b", factors=[1, 2, 4],
                      progress=False)
    pd.testing.assert_frame_equal(shared.predictions.drop(columns=["alpha", "beta"]),
                                  apart.predictions.drop(columns=["alpha", "beta"]))
    pd.testing.assert_frame_equal(shared.history, apart.history, atol=1e-6, check_exact=False)


def heads(n_models, num_classes=3, seed=0):
    """AMAN heads drawn as run_loso draws them, and their parameters stacked as the sweep holds them."""
    torch.manual_seed(seed)
    nets = [AMAN(num_classes, layer4=False) for _ in range(n_models)]
    names = ("alpha.0", "beta.0", "pred_fc")
    weights = torch.stack([torch.cat([n.state_dict()[f"{k}.weight"] for k in names]) for n in nets])  # M, J, 512
    biases = torch.stack([torch.cat([n.state_dict()[f"{k}.bias"] for k in names]) for n in nets])  # M, J
    return nets, weights, biases


SWITCHES = [(True, True), (True, False), (False, True), (False, False)]  # (alpha, beta) per model


def test_attention_on_projections_equals_aman_attend():
    nets, weights, biases = heads(len(SWITCHES))
    x = torch.randn(len(SWITCHES), 5, 3, 4, 512, generator=torch.Generator().manual_seed(1))  # M, L, F, K, 512
    P = torch.einsum("mlfkc,mjc->mjlfk", x, weights)
    alpha_on = torch.tensor([a for a, _ in SWITCHES])[:, None, None, None]
    beta_on = torch.tensor([b for _, b in SWITCHES])[:, None, None]
    logits, saved = sweep._forward(P, biases, alpha_on, beta_on)
    for m, (net, (use_alpha, use_beta)) in enumerate(zip(nets, SWITCHES)):
        net.use_alpha, net.use_beta = use_alpha, use_beta
        with torch.no_grad():
            want, alpha, beta = net.attend(x[m])
        torch.testing.assert_close(logits[m], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved[1][m], alpha, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(saved[4][m], beta, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_factors", [1, 4])
def test_hand_written_backward_equals_autograd(n_factors):
    g = torch.Generator().manual_seed(2)
    M, L, C = len(SWITCHES), 5, 3
    P = torch.randn(M, 2 + C, L, 3, n_factors, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(M, 2 + C, generator=g, dtype=torch.float64, requires_grad=True)
    alpha_on = torch.tensor([a for a, _ in SWITCHES])[:, None, None, None]
    beta_on = torch.tensor([b for _, b in SWITCHES])[:, None, None]
    y = torch.randint(0, C, (M, L), generator=g)
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64).expand(M, L) / 3  # a short last batch
    logits, saved = sweep._forward(P, bias, alpha_on, beta_on)
    loss = (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(M, L)
            * weight).sum()
    want_P, want_bias = torch.autograd.grad(loss, [P, bias])
    d_logits = (torch.softmax(logits, 2) - torch.nn.functional.one_hot(y, C)) * weight[..., None]
    got_P, got_bias = sweep._backward(d_logits.detach(), [t.detach() for t in saved], alpha_on, beta_on)
    torch.testing.assert_close(got_P, want_P, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_bias, want_bias, atol=1e-12, rtol=1e-10)


def test_flat_rmsprop_equals_torch_and_skips_models_without_a_batch():
    g = torch.Generator().manual_seed(3)
    cfg = TrainConfig()
    M, P = 3, 7
    theta = torch.randn(M * P, generator=g)
    refs = [torch.nn.Parameter(theta.view(M, P)[m].clone()) for m in range(M)]
    optims = [torch.optim.RMSprop([p], lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay) for p in refs]
    square, work = torch.zeros_like(theta), torch.empty_like(theta)
    for active in ([True, True, True], [True, False, True], [False, True, True]):
        grads = torch.randn(M, P, generator=g)
        on = torch.tensor(active).repeat_interleave(P)
        sweep._rmsprop(theta, grads.flatten().clone(), square, cfg.lr, cfg, None if all(active) else on, work)
        for m in np.flatnonzero(active):
            refs[m].grad = grads[m].clone()
            optims[m].step()
        want = torch.stack([p.detach() for p in refs]).flatten()
        torch.testing.assert_close(theta, want, rtol=1e-6, atol=1e-9)


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
    run_sweep(pooled(index), index, cfg, VARIANTS[:2], [0], tmp_path, factors=[1.0, 2.0, 4.0])
    moves = [n for n in updates if n]
    assert all(isinstance(n, int) and n > 0 for n in moves)
    assert sum(moves) == 2 * 5 and len(moves) >= 5  # 2 runs x 5 folds, in more steps than programs
