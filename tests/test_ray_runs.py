"""LOSO, sweep and features on a local Ray instance give what the local executor gives, byte for byte."""
import numpy as np
import pandas as pd
import pytest
import torch

from amanlib.train import TrainConfig, run_loso
from test_train import toy_index, toy_pooled


@pytest.fixture
def one_thread():
    """The driver on one thread, as each Ray task (cpus_per_task=1): CPU kernels then sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ray_loso_equals_local_loso(tmp_path, ray_session, one_thread):
    index = toy_index(n_subjects=4, per_subject=5)
    x = toy_pooled(index, signal=0.5)
    cfg = TrainConfig(epochs=3, step_size=2, device="cpu", epoch_selection="paper")
    local = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "local", progress=False)
    ray = run_loso(x, index, cfg=cfg, runs_dir=tmp_path / "ray", progress=False, executor=ray_session)
    pd.testing.assert_frame_equal(ray.predictions, local.predictions)
    pd.testing.assert_frame_equal(ray.history, local.history)
    assert ray.out_dir.name == local.out_dir.name  # the executor is no part of the run's identity
    folds = sorted(p.name for p in (ray.out_dir / "folds").iterdir())
    assert folds == sorted(p.name for p in (local.out_dir / "folds").iterdir()) and len(folds) == 4
    for name in folds:
        a, b = (torch.load(d / "folds" / name, weights_only=False) for d in (local.out_dir, ray.out_dir))
        np.testing.assert_array_equal(a["pred"], b["pred"])
        np.testing.assert_array_equal(a["alpha"], b["alpha"])


def test_ray_features_equal_local_features(tmp_path, ray_session, one_thread):
    from amanlib.backbone import ResNet18Trunk
    from amanlib.data import make_synthetic
    from amanlib.features import build_feature_cache
    from amanlib.magnify import load_magnifier

    index = make_synthetic(tmp_path / "syn", seed=0, n_subjects=2, clips_per_subject=2)
    torch.manual_seed(0)
    trunk, mag = ResNet18Trunk(bn="frame_batch"), load_magnifier("eulerian")
    args = {"magnifier": mag, "backbone": trunk, "factors": [1.0, 3.0], "n_frames": 2, "device": "cpu", "progress": False}
    local = build_feature_cache(index, **args, root=tmp_path / "local")
    ray = build_feature_cache(index, **args, root=tmp_path / "ray", executor=ray_session)
    assert ray.key == local.key  # the executor is no part of the features' identity
    assert (ray.path / "features.f16").read_bytes() == (local.path / "features.f16").read_bytes()


def test_ray_sweep_equals_local_sweep(tmp_path, ray_session, one_thread):
    from amanlib.sweep import run_sweep
    from amanlib.train import ablation_variants

    index = toy_index(n_subjects=3, per_subject=4)
    x = toy_pooled(index, F=2, K=3, signal=0.5)
    factors = [1.0, 2.0, 4.0]
    cfg = TrainConfig(epochs=3, step_size=2, device="cpu")
    variants = ablation_variants(factors)
    local = run_sweep(x, index, cfg=cfg, variants=variants, seeds=[0, 1], runs_dir=tmp_path / "local",
                      factors=factors, progress=False)
    ray = run_sweep(x, index, cfg=cfg, variants=variants, seeds=[0, 1], runs_dir=tmp_path / "ray", factors=factors,
                    progress=False, executor=ray_session)
    pd.testing.assert_frame_equal(ray.predictions, local.predictions)
    pd.testing.assert_frame_equal(ray.scores, local.scores)
