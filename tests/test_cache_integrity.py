"""A cache is verified before it is served (issue 22, item 2): each fault planted in a stamped folder gives one
warning naming the folder and a rebuilt entry with the intact result, for every stage that caches."""
import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from amanlib import cache, train
from amanlib.data import make_synthetic
from amanlib.features import load_feature_cache
from amanlib.sweep import run_sweep
from amanlib.train import Keyed, TrainConfig, Variant, run_loso
from test_integrity import SMALL, _build
from test_train import toy_index, toy_maps, toy_pooled


def _zero_block(path):
    """Zeros over the second half of a file (same size, header intact): only the digest can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


FAULTS = {"zeroed block": ("data.npy", _zero_block, "sha1 does not match"),
          "truncated": ("data.npy", _truncate, "bytes"),
          "random bytes": ("weights.pt", _random_bytes, "sha1 does not match"),
          "deleted": ("table.csv", lambda p: p.unlink(), "missing"),
          "nested file cut": ("part/more.npy", _truncate, "bytes"),
          "truncated key.json": (cache.KEY_FILE, _truncate, "key.json is missing or unreadable"),
          "truncated done.json": (cache.STAMP_FILE, _truncate, "done.json is unreadable")}


def _write(folder):
    """A stage's output: an array, a state dict, a table and a file in a subfolder."""
    np.save(folder / "data.npy", np.arange(4096, dtype=np.float32))
    torch.save({"w": torch.arange(512.0)}, folder / "weights.pt")
    pd.DataFrame({"clip": ["a", "b", "c"], "pred": [0, 1, 2]}).to_csv(folder / "table.csv", index=False)
    (folder / "part").mkdir()
    np.save(folder / "part" / "more.npy", np.ones(1024))
    return {"shape": [4096], "clips": 3}


def _content(folder):
    return (np.load(folder / "data.npy"), torch.load(folder / "weights.pt")["w"], pd.read_csv(folder / "table.csv"),
            np.load(folder / "part" / "more.npy"))


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    pd.testing.assert_frame_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])


def _counted(calls):
    def build(folder):
        calls.append(folder)
        return _write(folder)
    return build


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_folder_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog, fault):
    calls = []
    built = cache.build_once(tmp_path, {"x": 1}, "test", _counted(calls))
    intact = _content(built.path)
    name, plant, what = FAULTS[fault]
    plant(built.path / name)
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        again = cache.build_once(tmp_path, {"x": 1}, "test", _counted(calls))
    assert len(calls) == 2 and again.path == built.path
    _same(_content(again.path), intact)
    assert again.stamp() == {"shape": [4096], "clips": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(built.path) in warnings[0] and what in warnings[0]
    if name not in (cache.KEY_FILE, cache.STAMP_FILE):
        assert name in warnings[0]
    assert cache.build_once(tmp_path, {"x": 1}, "test", _counted(calls)).done and len(calls) == 2


def test_a_stamp_without_digests_is_rebuilt_once(tmp_path, caplog):
    calls = []
    built = cache.build_once(tmp_path, {"x": 1}, "test", _counted(calls))
    (built.path / cache.STAMP_FILE).write_text(json.dumps({"shape": [4096], "clips": 3}))  # as amanlib wrote it before
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        again = cache.build_once(tmp_path, {"x": 1}, "test", _counted(calls))
    assert len(calls) == 2 and "no content digests" in caplog.text and str(built.path) in caplog.text
    assert cache.FILES in json.loads((again.path / cache.STAMP_FILE).read_text())


def test_an_intact_entry_is_hashed_once_and_keeps_its_summary(tmp_path, monkeypatch):
    cache.build_once(tmp_path, {"x": 1}, "test", _write)
    stamp = json.loads((tmp_path / cache.Entry(tmp_path, {"x": 1}, "test").path / cache.STAMP_FILE).read_text())
    assert stamp["shape"] == [4096] and stamp["clips"] == 3  # the summary stays at the top level
    assert sorted(stamp[cache.FILES]) == ["data.npy", "part/more.npy", "table.csv", "weights.pt"]
    hashed = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path, *a: hashed.append(path) or real(path, *a))
    entry = cache.Entry(tmp_path, {"x": 1}, "test")
    assert entry.done and entry.done
    with entry.writing():
        assert entry.done
    assert len(hashed) == 4 and entry.stamp() == {"shape": [4096], "clips": 3}
    with pytest.raises(ValueError, match="files"):
        entry.finish({cache.FILES: 1})


def test_an_unstamped_folder_with_a_cut_key_is_started_again(tmp_path, caplog):
    entry = cache.Entry(tmp_path, {"x": 1}, "test")
    with entry.writing():
        np.save(entry.path / "partial.npy", np.ones(3))
    _truncate(entry.path / cache.KEY_FILE)
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"), entry.writing():
        assert not (entry.path / "partial.npy").exists()
    assert "key.json is unreadable" in caplog.text
    assert json.loads((entry.path / cache.KEY_FILE).read_text())["key"] == entry.key


@pytest.mark.parametrize("plant", [_zero_block, _truncate, _random_bytes])
def test_a_damaged_feature_cache_is_named_then_rebuilt(tmp_path, caplog, plant):
    index = make_synthetic(tmp_path / "data", seed=0, **SMALL)
    built = _build(index, tmp_path / "features")
    intact = np.array(built.features)
    del built.features  # no memmap of the file left open while it is damaged
    plant(built.path / "features.f16")
    with pytest.raises(ValueError, match=rf"{built.path} is damaged \(features.f16 .*build the features again"):
        load_feature_cache(tmp_path / "features", index)
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        rebuilt = _build(index, tmp_path / "features")
    assert rebuilt.key == built.key and str(built.path) in caplog.text and "features.f16" in caplog.text
    np.testing.assert_array_equal(np.asarray(rebuilt.features), intact)
    np.testing.assert_array_equal(np.asarray(load_feature_cache(tmp_path / "features", index).features), intact)


FAST = dict(epochs=2, step_size=1, device="cpu", batch_size=4)


@pytest.mark.parametrize("name, plant", [("predictions.csv", _truncate), ("attention.npz", _random_bytes),
                                         ("folds/casme2_sub00.pt", _truncate)])
def test_a_damaged_run_is_trained_again_from_scratch(tmp_path, caplog, name, plant):
    index = toy_index(n_subjects=3, per_subject=2)
    x = toy_maps(index)
    first = run_loso(x, index, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "runs", progress=False)
    plant(first.out_dir / name)
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        again = run_loso(x, index, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "runs", progress=False)
    assert again.out_dir == first.out_dir and str(first.out_dir) in caplog.text and name in caplog.text
    pd.testing.assert_frame_equal(again.predictions.drop(columns=["alpha", "beta"]),
                                  first.predictions.drop(columns=["alpha", "beta"]))
    np.testing.assert_array_equal(np.stack(again.predictions.alpha), np.stack(first.predictions.alpha))
    pd.testing.assert_frame_equal(again.history, first.history)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_features_are_pooled_in_fp32_where_bf16_is_not_native(tmp_path, caplog, monkeypatch, native):
    """A results folder made on a CPU with native bf16 and trained on one without: frozen layer4 pools in fp32 (bf16
    would be emulated, measured 5x slower on the committed default), recorded in the pooled cache's key."""
    index = toy_index(n_subjects=3, per_subject=2)
    x = Keyed(toy_maps(index, C=256, size=4), "toy", [1.0, 2.0])
    monkeypatch.setattr(train, "trunk_dtype", lambda features: torch.bfloat16)
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    with caplog.at_level(logging.WARNING, logger="amanlib.train"):
        train.prepare_features(x, TrainConfig(**FAST, frozen_layer4=True), tmp_path / "runs", progress=False)
    (key,) = (tmp_path / "runs" / "pooled").glob("*/key.json")
    assert json.loads(key.read_text())["inputs"]["dtype"] == ("torch.bfloat16" if native else "None")
    assert ("pools them in fp32" in caplog.text) is not native


def test_damaged_pooled_features_are_pooled_again(tmp_path, caplog):
    index = toy_index(n_subjects=3, per_subject=2)
    x = Keyed(toy_maps(index, C=256, size=4), "toy", [1.0, 2.0])
    cfg = TrainConfig(**FAST, frozen_layer4=True)
    first = train.prepare_features(x, cfg, tmp_path / "runs", progress=False)
    (path,) = (tmp_path / "runs" / "pooled").glob("*/pooled.pt")
    _truncate(path)
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        again = train.prepare_features(x, cfg, tmp_path / "runs", progress=False)
    assert str(path.parent) in caplog.text and "pooled.pt" in caplog.text
    torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)


def test_a_damaged_run_of_a_sweep_is_trained_again(tmp_path, caplog):
    index = toy_index(n_subjects=3, per_subject=2)
    x = Keyed(toy_pooled(index, F=2, K=3), "toy", [1.0, 2.0, 4.0])
    args = {"cfg": TrainConfig(**FAST), "variants": [Variant("AMAN", (1, 2))], "seeds": [0], "runs_dir": tmp_path / "runs"}
    (first,) = run_sweep(x, index, **args, progress=False).runs.values()
    _zero_block(first.out_dir / "predictions.csv")
    with caplog.at_level(logging.WARNING, logger="amanlib.cache"):
        (again,) = run_sweep(x, index, **args, progress=False).runs.values()
    assert str(first.out_dir) in caplog.text and "predictions.csv" in caplog.text
    pd.testing.assert_frame_equal(again.predictions.drop(columns=["alpha", "beta"]),
                                  first.predictions.drop(columns=["alpha", "beta"]))


def test_loading_a_damaged_run_names_it_and_what_repairs_it(tmp_path):
    """Notebook 05 reads runs back without training: a damaged one is an error naming the folder, not pandas'."""
    from amanlib.results import LOSOResult
    index = toy_index(n_subjects=3, per_subject=2)
    run = run_loso(toy_maps(index), index, cfg=TrainConfig(**FAST), runs_dir=tmp_path / "runs", progress=False)
    _truncate(run.out_dir / "predictions.csv")
    with pytest.raises(ValueError, match=rf"LOSO run {run.out_dir} is damaged \(predictions.csv has .* notebook 04"):
        LOSOResult.load(run.out_dir)


def test_a_copied_or_moved_results_folder_reads_its_own_trunk(tmp_path):
    """The features name the pre-trained trunk (where layer4 starts from) relative to themselves when it lies in the
    same work folder: a copy reads its own file, a moved folder still finds it (issue 22 item 6)."""
    import shutil

    from amanlib.backbone import Backbone, ResNet18Trunk
    from amanlib.features import build_feature_cache
    from amanlib.magnify import load_magnifier

    index = make_synthetic(tmp_path / "data", **SMALL)
    work = tmp_path / "results" / "work"
    (work / "trunks" / "k").mkdir(parents=True)
    torch.manual_seed(0)
    trunk = ResNet18Trunk().eval()
    torch.save({"state_dict": trunk.state_dict()}, work / "trunks" / "k" / "trunk.pth")
    backbone = Backbone(trunk, "synthetic_macro", work / "trunks" / "k" / "trunk.pth", "test trunk")
    build_feature_cache(index, magnifier=load_magnifier("eulerian"), backbone=backbone, factors=[1.0, 3.0],
                        n_frames=1, root=work / "features",
                        magnifier_name="eulerian", device="cpu", progress=False)
    shutil.copytree(tmp_path / "results", tmp_path / "copy")
    copied = load_feature_cache(tmp_path / "copy" / "work" / "features", index)
    assert copied.backbone["checkpoint"] == str((tmp_path / "copy" / "work" / "trunks" / "k" / "trunk.pth").resolve())
    shutil.rmtree(tmp_path / "results")
    assert torch.load(copied.backbone["checkpoint"])["state_dict"].keys() == trunk.state_dict().keys()
