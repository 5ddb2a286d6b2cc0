import pytest
import torch

from amanlib.batchnorm import batch_groups
from amanlib.model import AMAN, load_copy, side_by_side

B, F, K, C = 2, 3, 4, 256


def reference_forward(model: AMAN, x: torch.Tensor) -> torch.Tensor:
    """Direct transcription of the paper's formulas, one (frame, factor) at a time."""
    v_frames, betas = [], []
    for j in range(x.shape[1]):
        fs = [model.avgpool(model.layer4(x[:, j, i])).flatten(1) for i in range(x.shape[2])]
        alphas = [torch.sigmoid(model.alpha[0](f)) for f in fs]
        v_frame = sum(a * f for a, f in zip(alphas, fs)) / sum(alphas)
        v_frames.append(v_frame)
        betas.append(torch.sigmoid(model.beta[0](v_frame)))
    v = sum(b * vf for b, vf in zip(betas, v_frames)) / sum(betas)
    return model.pred_fc(v)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return AMAN(num_classes=3).eval()


def test_forward_matches_formulas(model):
    x = torch.randn(B, F, K, C, 14, 14)
    with torch.no_grad():
        logits, alpha, beta = model(x, return_attention=True)
        expected = reference_forward(model, x)
    assert logits.shape == (B, 3) and alpha.shape == (B, F, K) and beta.shape == (B, F)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert ((alpha > 0) & (alpha < 1)).all() and ((beta > 0) & (beta < 1)).all()


def test_layer4_runs_once_over_all_maps(model):
    calls = []
    model.layer4.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(torch.randn(B, F, K, C, 14, 14))
    assert calls == [B * F * K]


def test_state_dict_keys_are_the_authors(model):
    keys = set(model.state_dict())
    for key in ["layer4.0.conv1.weight", "layer4.0.bn1.running_mean", "layer4.0.downsample.0.weight",
                "layer4.0.downsample.1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.bias",
                "alpha.0.weight", "alpha.0.bias", "beta.0.weight", "pred_fc.weight", "pred_fc.bias"]:
        assert key in keys
    assert all(k.split(".")[0] in {"layer4", "alpha", "beta", "pred_fc"} for k in keys)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_load_checkpoint_variants(model, tmp_path, wrap):
    state = model.state_dict()
    if wrap == "module":  # what DataParallel + the authors' training loop saves
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap == "state_dict":
        obj = {"state_dict": state}
    else:
        obj = state
    torch.save(obj, tmp_path / "ckpt.pth.tar")
    torch.manual_seed(1)
    other = AMAN.from_checkpoint(tmp_path / "ckpt.pth.tar").eval()
    x = torch.randn(1, 2, 2, C, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


def test_bad_checkpoints_name_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        AMAN(3).load_checkpoint(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 512)}}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        AMAN(3).load_checkpoint(wrong)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        AMAN(3).load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="shape"):
        AMAN(3)(torch.randn(2, 256, 14, 14))


def test_init_layer4_from_resnet18_checkpoint(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(2)
    net = resnet18(num_classes=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "fer.pth.tar")
    model = AMAN(3, init_layer4_from=tmp_path / "fer.pth.tar")
    torch.testing.assert_close(model.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    torch.save({"state_dict": {"conv1.weight": net.conv1.weight}}, tmp_path / "nolayer4.pth")
    with pytest.raises(ValueError, match="layer4"):
        AMAN(3, init_layer4_from=tmp_path / "nolayer4.pth")


def test_bf16_autocast_on_cpu_runs_and_is_close(model):
    x = torch.randn(B, F, K, C, 14, 14)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_saturated_attention_keeps_the_papers_weighted_mean_finite(model):
    """Scores far below zero make every sigmoid 0 in float32, where sum(alpha f) / sum(alpha) is 0 / 0; the kit's
    softmax(log sigmoid) form gives the ratio a float64 computation of the paper's formula gives."""
    f = torch.randn(B, F, K, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.alpha[0].bias.fill_(-300.0)
        model.beta[0].bias.fill_(-300.0)
        logits, alpha, beta = model.attend(f)
        exact = model.double()
        s = exact.alpha[0](f.double())
        v_frame = (torch.sigmoid(s) * f.double()).sum(2) / torch.sigmoid(s).sum(2)
        t = torch.sigmoid(exact.beta[0](v_frame))
        want = exact.pred_fc((t * v_frame).sum(1) / t.sum(1))
    assert (alpha == 0).all() and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.double(), want, rtol=1e-4, atol=1e-4)


def test_side_by_side_copies_compute_what_each_copy_computes():
    """M layer4s as one module of grouped convolutions: each copy's pooled output and BatchNorm statistics (per
    (frame, factor) slice, in train mode) are what that copy gives alone."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(AMAN(3, in_channels=16).train())
    wide = side_by_side(models[0].layer4, 3).train()
    for m, model in enumerate(models):
        load_copy(wide, m, model.layer4)
    assert wide[0].conv1.groups == 3 and wide[0].conv1.weight.shape == (3 * 512, 16, 3, 3)
    B, F, K = 4, 2, 3
    x = torch.randn(3, B, F, K, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with batch_groups(wide, F * K):
        out = wide(x.permute(1, 2, 3, 0, 4, 5, 6).reshape(B * F * K, 3 * 16, 6, 6))  # L*F*K, M*C, H, W
    out = out.mean((2, 3)).view(B, F, K, 3, 512).permute(3, 0, 1, 2, 4)
    alone = torch.stack([model.pool(x[m]) for m, model in enumerate(models)])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wide[1].bn2.running_var.view(3, 512),
                               torch.stack([model.layer4[1].bn2.running_var for model in models]))
