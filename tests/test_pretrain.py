import dataclasses

import torch

from amanlib.data import make_synthetic_macro
from amanlib.backbone import load_trunk
from amanlib.model import AMAN
from amanlib.pretrain import PretrainConfig, pretrain_trunk


def test_pretrained_trunk_loads_like_fer_plus_and_is_keyed_by_its_inputs(tmp_path):
    macro = make_synthetic_macro(tmp_path / "macro", seed=0, n_subjects=3, intensities_px=(6.0,), variants=1,
                                 neutral_per_subject=1)
    cfg = PretrainConfig(epochs=1, batch_size=8, val_subjects=1, device="cpu", crop=96)
    done = pretrain_trunk(macro, tmp_path / "trunks", cfg, progress=False)
    summary = done.summary
    assert summary["train_images"] == 8 and summary["val_images"] == 4 and 0 <= done.val_accuracy <= 1
    trunk = load_trunk(done.path)  # the FER+ loader reads it (fc skipped)
    state = torch.load(done.path, weights_only=True)["state_dict"]
    torch.testing.assert_close(trunk.conv1.weight, state["conv1.weight"])
    aman = AMAN(3, init_layer4_from=done.path)
    torch.testing.assert_close(aman.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    mtime = done.path.stat().st_mtime_ns
    assert pretrain_trunk(macro, tmp_path / "trunks", cfg, progress=False) == done
    assert done.path.stat().st_mtime_ns == mtime  # reused, not trained again
    other_seed = make_synthetic_macro(tmp_path / "macro", seed=1, n_subjects=3, intensities_px=(6.0,), variants=1,
                                      neutral_per_subject=1)
    assert pretrain_trunk(other_seed, tmp_path / "trunks", cfg, progress=False).path != done.path  # new images
    other_lr = dataclasses.replace(cfg, lr=1e-3)
    assert pretrain_trunk(macro, tmp_path / "trunks", other_lr, progress=False).path != done.path
