import logging

import pytest
import torch
from torchvision.models import resnet18

from amanlib.backbone import ResNet18Trunk, load_fer_checkpoint, load_trunk, preprocess
from amanlib.features import extract_features
from conftest import count_calls


def fer_like_checkpoint(path, seed=0):
    """A file laid out like Emotion-FAN's Resnet18_FER+_pytorch.pth.tar (DataParallel keys, 8-class fc)."""
    torch.manual_seed(seed)
    net = resnet18(num_classes=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 40}, path)
    return net


def test_trunk_shape_and_names():
    trunk = ResNet18Trunk().eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 256, 14, 14)
    keys = set(trunk.state_dict())
    assert "conv1.weight" in keys and "layer3.1.bn2.running_var" in keys
    assert not any(k.startswith(("layer4", "fc")) for k in keys)


def test_load_fer_checkpoint_matches_torchvision(tmp_path):
    net = fer_like_checkpoint(tmp_path / "Resnet18_FER+_pytorch.pth.tar").eval()
    trunk = load_fer_checkpoint(ResNet18Trunk(), tmp_path / "Resnet18_FER+_pytorch.pth.tar").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        torch.testing.assert_close(trunk(x), expected)
    assert trunk.source.endswith("Resnet18_FER+_pytorch.pth.tar")
    full = load_fer_checkpoint(ResNet18Trunk(with_layer4=True), tmp_path / "Resnet18_FER+_pytorch.pth.tar")
    torch.testing.assert_close(full.layer4[0].conv1.weight, net.layer4[0].conv1.weight)


def test_load_fer_checkpoint_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt.*not a PyTorch checkpoint"):
        load_fer_checkpoint(ResNet18Trunk(), tmp_path / "notes.txt")
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*missing"):
        load_fer_checkpoint(ResNet18Trunk(), tmp_path / "partial.pth")
    torch.save({"state_dict": {k: v[..., :1] if v.dim() == 4 else v for k, v in ResNet18Trunk().state_dict().items()}},
               tmp_path / "shapes.pth")
    with pytest.raises(ValueError, match="shapes.pth.*shapes differ"):
        load_fer_checkpoint(ResNet18Trunk(), tmp_path / "shapes.pth")


def test_load_trunk_is_loud_without_checkpoint(caplog):
    with pytest.raises(ValueError, match="FER"):
        load_trunk(None)
    with caplog.at_level(logging.WARNING):
        trunk = load_trunk(None, allow_random=True)
    assert trunk.source == "random" and "RANDOM" in caplog.text


def test_extract_features_batches_and_dtype():
    torch.manual_seed(0)
    trunk = ResNet18Trunk().eval()
    images = torch.rand(5, 3, 120, 100)
    feats = extract_features(images, trunk, batch_size=2, device="cpu", dtype=torch.float16, progress=False)
    assert feats.shape == (5, 256, 14, 14) and feats.dtype == torch.float16
    with torch.no_grad():
        one = trunk(preprocess(images[3:4]))
    torch.testing.assert_close(feats[3:4].float(), one, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        extract_features(torch.rand(3, 64, 64), trunk)


def test_feature_cache_resumes_and_keys_other_settings_apart(tmp_path, monkeypatch):
    import numpy as np

    import amanlib.features as features
    from amanlib.data import make_synthetic
    from amanlib.magnify import load_magnifier

    index = make_synthetic(tmp_path / "syn", seed=0, n_subjects=2, clips_per_subject=2)
    trunk = ResNet18Trunk().eval()
    mag = load_magnifier("eulerian")
    clip = features.magnify_clip(index.iloc[0], mag, [1.0, 3.0], n_frames=2)
    assert clip.shape[:2] == (2, 2)
    from amanlib.data import load_clip_frames, select_frames
    frames = load_clip_frames(select_frames(index.iloc[0], 3))[1:]
    torch.testing.assert_close(clip[:, 0], frames)  # factor 1 is the frame itself
    assert (clip[:, 1] - frames).abs().max() > 1e-3

    real = features.magnify_clip
    count_calls(monkeypatch, features, "magnify_clip", real, crash_on=3)
    args = {"magnifier": mag, "backbone": trunk, "factors": [1.0, 3.0], "n_frames": 2, "root": tmp_path / "cache"}
    with pytest.raises(KeyboardInterrupt):
        features.build_feature_cache(index, **args, device="cpu", precision="fp32", progress=False)
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        features.load_feature_cache(tmp_path / "cache")
    calls = count_calls(monkeypatch, features, "magnify_clip", real)
    out = features.build_feature_cache(index, **args, device="cpu", precision="fp32", progress=False)  # against fp32
    assert len(calls) == 2 and out.features.shape == (4, 2, 2, 256, 14, 14) and out.features.dtype == np.float16
    cached = features.load_feature_cache(tmp_path / "cache", index)
    assert cached.key == out.key and cached.factors == [1.0, 3.0]
    assert np.abs(np.asarray(cached.features[3], np.float32)).sum() > 0
    with torch.inference_mode():
        direct = extract_features(real(index.iloc[3], mag, [1.0, 3.0], 2).flatten(0, 1), trunk, device="cpu",
                                  progress=False)
    np.testing.assert_allclose(cached.features[3].reshape(4, 256, 14, 14).astype(np.float32), direct.numpy(),
                               atol=2e-2, rtol=1e-2)
    other = features.build_feature_cache(index, magnifier=mag, backbone=trunk, factors=[1.0, 5.0], n_frames=2,
                                         root=tmp_path / "cache", device="cpu", precision="fp32",
                                         progress=False)  # other settings: a folder of their own, the old one kept
    assert other.path != out.path and (out.path / "done.json").exists()
    assert features.load_feature_cache(tmp_path / "cache").key == other.key


def test_frame_batch_features_are_the_authors_extraction(tmp_path):
    """Each frame's magnified images form one BatchNorm batch (a train-mode trunk per frame, as the authors'
    extractor runs it); the unmagnified slot is a batch of its own and changes no magnified slot."""
    import copy

    import numpy as np

    import amanlib.features as features
    from amanlib.data import make_synthetic
    from amanlib.magnify import load_magnifier

    index = make_synthetic(tmp_path / "syn", seed=0, n_subjects=2, clips_per_subject=1)
    mag = load_magnifier("eulerian")
    torch.manual_seed(0)
    trunk = ResNet18Trunk(bn="frame_batch")
    authors = copy.deepcopy(ResNet18Trunk()).train()
    authors.load_state_dict(trunk.state_dict())
    running = {k: v.clone() for k, v in trunk.state_dict().items()}
    with_plain = features.build_feature_cache(index, magnifier=mag, backbone=trunk, factors=[1.0, 2.0, 4.0],
                                              n_frames=2, root=tmp_path / "a", device="cpu",
                                              precision="fp32", progress=False)
    only_magnified = features.build_feature_cache(index, magnifier=mag, backbone=trunk, factors=[2.0, 4.0],
                                                  n_frames=2, root=tmp_path / "b", device="cpu",
                                                  precision="fp32", progress=False)  # compared with fp32 below
    np.testing.assert_array_equal(with_plain.features[:, :, 1:], only_magnified.features)  # slot 1 changes nothing
    clip = features.magnify_clip(index.iloc[1], mag, [2.0, 4.0], 2)  # F, K, 3, H, W
    with torch.no_grad():
        expected = torch.stack([authors(preprocess(frame)) for frame in clip])  # one train-mode call per frame
    np.testing.assert_allclose(only_magnified.features[1].astype(np.float32), expected.numpy(), atol=2e-2, rtol=1e-2)
    alone = features.extract_features(clip[:, :1], trunk, device="cpu", progress=False)  # per-frame statistics
    assert not torch.allclose(alone[:, 0], expected[:, 0], atol=1e-2)  # so the batch does matter
    assert all(torch.equal(v, running[k]) for k, v in trunk.state_dict().items())  # running statistics untouched
    same_weights = ResNet18Trunk()
    same_weights.load_state_dict(trunk.state_dict())
    eval_mode = features.build_feature_cache(index, magnifier=mag, backbone=same_weights, factors=[2.0, 4.0],
                                             n_frames=2, root=tmp_path / "b", device="cpu",
                                             precision="fp32", progress=False)
    assert eval_mode.key != only_magnified.key and eval_mode.inputs["trunk"]["bn"] == "running"  # keyed apart


def test_an_explicit_fer_checkpoint_is_checked_like_the_downloaded_one(tmp_path, monkeypatch, caplog):
    """backbone 'fer' with a file of one's own (issue 22): the paper's file (by git blob SHA-1) is labelled FER+,
    any other ResNet-18 as what it is, and a file that is no checkpoint is refused without torch's weights_only
    advice."""
    import amanlib.fer
    from amanlib.backbone import choose_backbone
    from amanlib.fer import git_blob_sha1
    fer_like_checkpoint(tmp_path / "mine.pth")
    with caplog.at_level("WARNING", logger="amanlib.backbone"):
        own = choose_backbone("fer", tmp_path / "work", fer_checkpoint=tmp_path / "mine.pth")
    assert own.name == "resnet18 (own checkpoint)" and own.note.startswith("NOT the paper's FER+ backbone")
    assert "not the paper's FER+ file" in caplog.text
    monkeypatch.setattr(amanlib.fer, "FER_BLOB_SHA1", git_blob_sha1(tmp_path / "mine.pth"))  # as if it were
    paper = choose_backbone("fer", tmp_path / "work", fer_checkpoint=tmp_path / "mine.pth")
    assert paper.name == "fer+" and paper.note.endswith("as in the paper")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ValueError, match="noise.bin is not a PyTorch checkpoint") as err:
        choose_backbone("fer", tmp_path / "work", fer_checkpoint=tmp_path / "noise.bin")
    assert "weights_only" not in str(err.value)
