import torch

from amanlib.data import make_synthetic_macro
from amanlib.features import load_trunk
from amanlib.model import AMAN
from amanlib.pretrain import PretrainConfig, pretrain_trunk


def test_pretrained_trunk_loads_like_fer_plus(tmp_path):
    macro = make_synthetic_macro(tmp_path / "macro", seed=0, n_subjects=3, intensities_px=(6.0,), variants=1,
                                 neutral_per_subject=1)
    cfg = PretrainConfig(epochs=1, batch_size=8, val_subjects=1, device="cpu", crop=96)
    summary = pretrain_trunk(macro, tmp_path / "trunk.pth", cfg, progress=False)
    assert summary["train_images"] == 8 and summary["val_images"] == 4 and 0 <= summary["val_accuracy"] <= 1
    trunk = load_trunk(tmp_path / "trunk.pth")  # the FER+ loader reads it (fc skipped)
    assert trunk.source.endswith("trunk.pth")
    state = torch.load(tmp_path / "trunk.pth", weights_only=True)["state_dict"]
    torch.testing.assert_close(trunk.conv1.weight, state["conv1.weight"])
    aman = AMAN(3, init_layer4_from=tmp_path / "trunk.pth")
    torch.testing.assert_close(aman.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    mtime = (tmp_path / "trunk.pth").stat().st_mtime_ns
    assert pretrain_trunk(macro, tmp_path / "trunk.pth", cfg, progress=False) == summary
    assert (tmp_path / "trunk.pth").stat().st_mtime_ns == mtime  # reused, not trained again
