"""No input change is ever answered with a stale result: every cache is keyed by content, locked, checked."""
import dataclasses
import errno
import json
import multiprocessing
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from amanlib import cache, features, train
from amanlib.data import make_synthetic
from amanlib.backbone import ResNet18Trunk
from amanlib.features import build_feature_cache, load_feature_cache
from amanlib.magnify import load_magnifier
from amanlib.train import TrainConfig, run_loso

SMALL = dict(n_subjects=2, clips_per_subject=2, frames=8, frames_jitter=1, size=64)
FAST = dict(epochs=2, device="cpu", step_size=1)


def _trunk():
    torch.manual_seed(0)
    return ResNet18Trunk().eval()


def _build(index, root, factors=(1.0, 3.0), magnifier="eulerian"):
    return build_feature_cache(index, magnifier=load_magnifier(magnifier), backbone=_trunk(), factors=list(factors),
                               n_frames=1, root=root,
                               magnifier_name=magnifier, device="cpu", progress=False)


def test_keys_are_content_not_path_strings():
    assert cache.key_of({"lr": 1e-3, "f": [1, 2.0]}) == cache.key_of({"f": (1.0, 2), "lr": 0.001})
    assert cache.key_of({"lr": 1e-3}) != cache.key_of({"lr": 2e-3})
    with pytest.raises(TypeError, match="path"):
        cache.key_of({"checkpoint": Path("a/b.pth")})
    with pytest.raises(ValueError, match="non-finite"):
        cache.key_of({"lr": float("nan")})


def test_a_new_seed_never_gets_the_old_features(tmp_path):
    seed0 = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    old = _build(seed0, tmp_path / "features")
    seed1 = make_synthetic(tmp_path / "data", seed=1, **SMALL)  # same clip names, other frames and labels
    assert seed1[["subject", "clip"]].equals(seed0[["subject", "clip"]])
    with pytest.raises(ValueError, match="build the features again"):
        load_feature_cache(tmp_path / "features", seed1)  # 03 was not re-run: 04 refuses the seed-0 features
    new = _build(seed1, tmp_path / "features")  # the advice: build again -> a folder of its own
    assert new.key != old.key and (old.path / "done.json").exists()
    assert load_feature_cache(tmp_path / "features", seed1).key == new.key


def test_the_same_frames_elsewhere_find_the_same_cache(tmp_path):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    first = _build(index, tmp_path / "features")
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = index.assign(frames_dir=[d.replace(str(tmp_path / "data"), str(tmp_path / "moved"))
                                     for d in index.frames_dir])
    assert _build(moved, tmp_path / "features").key == first.key  # absolute vs relative or moved: same content


def test_reordered_clip_table_is_refused_and_keyed_apart(tmp_path):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    built = _build(index, tmp_path / "features")
    reordered = index.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="row 0 of the clip table"):
        load_feature_cache(tmp_path / "features", reordered)
    x = torch.randn(len(index), 1, 2, 512)
    a = run_loso(x, index, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "runs", progress=False)
    b = run_loso(x, reordered, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "runs", progress=False)
    assert a.out_dir != b.out_dir  # the index rows in order are part of a run's key
    assert built.inputs["clips"][0]["files"][0][0].startswith("reg_img")  # file names and digests, no folders


def test_another_magnifier_gets_other_features_and_other_runs(tmp_path):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    eulerian = _build(index, tmp_path / "f", magnifier="eulerian")
    phase = _build(index, tmp_path / "f", magnifier="phase")
    assert eulerian.key != phase.key and eulerian.inputs["magnifier"]["name"] == "eulerian"
    cfg = TrainConfig(**FAST, frozen_layer4=True)
    a, b = (run_loso(c, index, cfg=cfg, runs_dir=tmp_path / "runs", progress=False) for c in (eulerian, phase))
    assert a.out_dir != b.out_dir and a.config["features_key"] != b.config["features_key"]
    pooled = [json.loads(p.read_text())["inputs"]["features"]
              for p in (tmp_path / "runs" / "pooled").glob("*/key.json")]
    assert sorted(pooled) == sorted([eulerian.key, phase.key])  # pooled per features (their key), never reused


def test_nan_features_stop_the_run_naming_the_clip(tmp_path):
    index = pd.DataFrame({"dataset": "casme2", "subject": ["s1", "s1", "s2", "s2"], "clip": list("abcd"),
                          "label": [0, 1, 0, 1]})
    x = torch.randn(4, 1, 2, 512)
    x[2, 0, 1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"casme2/s2/c"):
        run_loso(x, index, cfg=TrainConfig(**FAST), runs_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("*/predictions.csv"))


def test_no_factor_left_for_aman_is_refused():
    with pytest.raises(ValueError, match="without magnified factors"):
        features.factor_set([1])
    with pytest.raises(ValueError, match="without factors"):
        train.ablation_variants([1.0])
    with pytest.raises(ValueError, match="at least one factor"):
        TrainConfig(factor_slots=())
    for bad in (dict(epochs=-1), dict(epochs="abc"), dict(lr=float("nan")), dict(batch_size=0), dict(epochs=True)):
        with pytest.raises(ValueError, match=list(bad)[0]):
            TrainConfig(**bad)


def test_random_layer4_is_drawn_from_the_seed(tmp_path):
    x = torch.randn(4, 1, 2, 256, 4, 4)
    cfg = TrainConfig(**FAST, frozen_layer4=True)
    a = train.prepare_features(x, cfg, tmp_path / "a", progress=False)
    torch.manual_seed(123)  # the global RNG state must not matter
    b = train.prepare_features(x, cfg, tmp_path / "b", progress=False)
    c = train.prepare_features(x, dataclasses.replace(cfg, seed=1), tmp_path / "a", progress=False)
    torch.testing.assert_close(a.features, b.features)
    assert a.key == b.key != c.key and not torch.equal(a.features, c.features)


def test_pooled_features_follow_the_trunks_dtype(tmp_path, monkeypatch):
    """Features made by a bf16 trunk are pooled by layer4 in bf16 too where bf16 is native (elsewhere in fp32:
    tests/test_cache_integrity.py), under a key of their own."""
    x = torch.randn(4, 1, 2, 256, 14, 14)
    cfg = TrainConfig(**FAST, frozen_layer4=True)
    fp32 = train.prepare_features(x, cfg, tmp_path, progress=False)
    monkeypatch.setattr(train, "trunk_dtype", lambda features: torch.bfloat16)
    monkeypatch.setattr(train, "native_bf16", lambda device: True)  # as on the machine that made them
    bf16 = train.prepare_features(x, cfg, tmp_path, progress=False)
    assert bf16.key != fp32.key and bf16.features.dtype == torch.float32
    error = (bf16.features - fp32.features).norm() / fp32.features.norm()
    assert 0 < error < 0.02


def _run(args):
    x, index, lr, runs = args
    return str(run_loso(x, index, cfg=TrainConfig(**FAST, lr=lr), runs_dir=runs, progress=False).out_dir)


def test_concurrent_runs_into_one_folder_never_mix(tmp_path):
    index = pd.DataFrame({"dataset": "casme2", "subject": [f"s{i // 3}" for i in range(9)],
                          "clip": [f"c{i}" for i in range(9)], "label": [i % 3 for i in range(9)]})
    x = torch.randn(9, 2, 2, 512, generator=torch.Generator().manual_seed(0))
    jobs = [(x, index, lr, tmp_path / "runs") for lr in (1e-3, 5e-2, 1e-3)]
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:  # fork + torch threads hang
        folders = list(pool.map(_run, jobs))
    assert folders[0] == folders[2] != folders[1]  # same settings share one folder (the second waits, then reuses)
    for lr, folder in zip((1e-3, 5e-2), folders[:2]):
        alone = run_loso(x, index, cfg=TrainConfig(**FAST, lr=lr), runs_dir=tmp_path / f"alone{lr}", progress=False)
        mixed = train.LOSOResult.load(folder)
        assert mixed.config["lr"] == lr
        pd.testing.assert_frame_equal(mixed.predictions.drop(columns=["alpha", "beta"]),
                                      alone.predictions.drop(columns=["alpha", "beta"]))
        pd.testing.assert_frame_equal(mixed.history, alone.history)


def test_a_full_disk_is_a_clear_error_before_any_write(tmp_path, monkeypatch):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    monkeypatch.setattr(features.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"needs 0\.\d MB more but only 0\.0 MB are free") as err:
        _build(index, tmp_path / "features")
    assert err.value.errno == errno.ENOSPC
    assert not any(np.load(p).any() for p in tmp_path.glob("features/*/done.npy"))


def test_a_folder_of_other_inputs_is_refused_with_advice_that_works(tmp_path):
    built = cache.build_once(tmp_path, {"x": 1}, "test", lambda folder: (folder / "a.txt").write_text("1") and {})
    assert (built.path / "a.txt").read_text() == "1" and built.done
    impostor = cache.Entry(tmp_path, {"x": 2}, "test")
    impostor.path.mkdir()
    (impostor.path / cache.KEY_FILE).write_text(json.dumps({"key": "0" * 64}))  # e.g. copied in by hand
    (impostor.path / cache.STAMP_FILE).write_text("{}")
    with pytest.raises(RuntimeError, match=r"rm -r (\S+)") as err:
        cache.build_once(tmp_path, {"x": 2}, "test", lambda folder: {})
    shutil.rmtree(re.search(r"rm -r (\S+)\)", str(err.value)).group(1))  # the advice, followed
    assert cache.build_once(tmp_path, {"x": 2}, "test", lambda folder: {"ok": True}).stamp() == {"ok": True}


def test_a_corrupt_feature_cache_is_named_and_the_advice_works(tmp_path):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    built = _build(index, tmp_path / "features")
    data = np.lib.format.open_memmap(built.path / "features.f16", mode="r+")
    data[1, 0, 1, 5] = np.nan  # a bit flip on disk, a NaN from a broken magnifier run, ...
    data.flush()
    del data
    with pytest.raises(ValueError, match="damaged"):  # changed after its stamp: the digest tells
        load_feature_cache(tmp_path / "features", index)
    stamp = json.loads((built.path / cache.STAMP_FILE).read_text())  # a NaN there when the stamp was written
    stamp[cache.FILES]["features.f16"][cache.DIGEST] = cache.file_digest(built.path / "features.f16")
    (built.path / cache.STAMP_FILE).write_text(json.dumps(stamp))
    cache_ = load_feature_cache(tmp_path / "features", index)
    for cfg in (TrainConfig(**FAST), TrainConfig(**FAST, frozen_layer4=True)):
        with pytest.raises(ValueError, match=r"synthetic/sub01/EP02_01.*rm -r (\S+)\)") as err:
            run_loso(cache_, index, cfg=cfg, runs_dir=tmp_path / "runs", progress=False)
    shutil.rmtree(re.search(r"rm -r (\S+)\)", str(err.value)).group(1))  # the advice, followed
    rebuilt = _build(index, tmp_path / "features")
    assert rebuilt.key == built.key and np.isfinite(np.asarray(rebuilt.features, np.float32)).all()
    run_loso(load_feature_cache(tmp_path / "features", index), index, cfg=TrainConfig(**FAST),
             runs_dir=tmp_path / "runs",
             progress=False)


def test_an_unfinished_feature_cache_says_so_and_resumes(tmp_path):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    built = _build(index, tmp_path / "features")
    (built.path / "done.json").unlink()  # as if the process died before the stamp
    with pytest.raises(ValueError, match="incomplete: build the features again"):
        load_feature_cache(tmp_path / "features", index)
    assert _build(index, tmp_path / "features").key == built.key  # the advice: build again, it resumes
    assert load_feature_cache(tmp_path / "features", index).key == built.key
