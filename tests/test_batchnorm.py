"""Grouped BatchNorm against the authors' way of feeding BatchNorm: one (frame, factor) slice of B clips per
layer4 call when training AMAN, one frame's K magnified images per trunk call (train mode) when extracting."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from amanlib.backbone import ResNet18Trunk, load_fer_checkpoint, load_trunk
from amanlib.batchnorm import GroupBatchNorm2d, batch_groups, use_group_batch_norm
from amanlib.model import AMAN

B, F, K, C = 4, 3, 2, 256
STEPS = 3


def authors_logits(model: AMAN, x: torch.Tensor) -> torch.Tensor:
    """The authors' AMAN.forward: frames j, factors i, layer4 on the B clips of x[:, j, i], alpha per slice."""
    v_frames = []
    for j in range(x.size(1)):
        fs = torch.stack([model.avgpool(model.layer4(x[:, j, i])).flatten(1) for i in range(x.size(2))], 1)  # B, K, 512
        alpha = model.alpha(fs)  # B, K, 1
        v_frames.append((alpha * fs).sum(1) / alpha.sum(1))  # B, 512
    v_frames = torch.stack(v_frames, 1)  # B, F, 512
    beta = model.beta(v_frames)  # B, F, 1
    return model.pred_fc((beta * v_frames).sum(1) / beta.sum(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def norms(module: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


def randomise_running_stats(module: nn.Module, seed: int) -> nn.Module:
    """Running statistics far from any batch's, so using them (or changing them) shows."""
    g = torch.Generator().manual_seed(seed)
    for m in norms(module).values():
        m.running_mean.copy_(torch.randn(m.num_features, generator=g))
        m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.5)
    return module


def train_steps(model: nn.Module, logits_of, xs, ys):
    """RMSprop steps (the kit's settings); the train-mode logits and the gradients of every step."""
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, eps=1e-8, weight_decay=1e-4)
    model.train()
    out = []
    for x, y in zip(xs, ys):
        logits = logits_of(model, x)
        opt.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
    return out


@pytest.fixture(scope="module")
def start():
    """One AMAN start (per_slice, running statistics far from any batch's)."""
    torch.manual_seed(0)
    return randomise_running_stats(AMAN(3), 1)


def as_joint(model: AMAN) -> AMAN:
    """The same weights and running statistics in an AMAN whose layer4 has PyTorch's plain BatchNorm2d."""
    joint = AMAN(3, layer4_bn="joint").to(next(model.parameters()).dtype)
    joint.load_state_dict(model.state_dict())
    assert all(type(m) is nn.BatchNorm2d for m in norms(joint).values())
    return joint


def batches(size: int, dtype=torch.float32, steps: int = STEPS, seed: int = 0):
    """Features [B, F, K, C, size, size] and labels for `steps` steps."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, F, K, C, size, size, generator=g, dtype=dtype) for _ in range(steps)], \
        [torch.randint(0, 3, (B,), generator=g) for _ in range(steps)]


@pytest.fixture(scope="module")
def trained(start):
    """per_slice and the authors' loop trained STEPS RMSprop steps from the same start. In float64: RMSprop's
    first step is about lr * sign(grad) per weight, which turns float32 rounding in near-zero gradients into
    weight differences of ~1e-3; on 4x4 maps (layer4 takes any size) because float64 convolutions are slow."""
    per_slice = copy.deepcopy(start).double()
    loop = as_joint(per_slice)
    xs, ys = batches(4, torch.float64)
    runs = {"per_slice": train_steps(per_slice, AMAN.__call__, xs, ys),
            "loop": train_steps(loop, authors_logits, xs, ys)}
    return {"per_slice": per_slice, "loop": loop}, runs, xs[0]


def test_per_slice_trains_like_the_authors_loop(trained):
    models, runs, _ = trained
    for (logits, grads), (ref_logits, ref_grads) in zip(runs["per_slice"], runs["loop"]):
        assert max_diff(logits, ref_logits) < 1e-9
        assert max(max_diff(grads[n], ref_grads[n]) for n in grads) < 1e-9
    params = dict(models["loop"].named_parameters())
    assert max(max_diff(p, params[n]) for n, p in models["per_slice"].named_parameters()) < 1e-9


def test_per_slice_running_stats_are_the_authors(trained):
    loop = norms(trained[0]["loop"])
    assert len(loop) == 5 and all(type(m) is GroupBatchNorm2d for m in norms(trained[0]["per_slice"]).values())
    for name, m in norms(trained[0]["per_slice"]).items():
        assert max_diff(m.running_mean, loop[name].running_mean) < 1e-9
        assert max_diff(m.running_var, loop[name].running_var) < 1e-9
        assert m.num_batches_tracked.item() == loop[name].num_batches_tracked.item() == STEPS * F * K


def test_eval_uses_running_stats_in_both_modes(trained):
    models, _, x = trained
    with torch.no_grad():
        logits = models["per_slice"].eval()(x)
        assert max_diff(logits, authors_logits(models["loop"].eval(), x)) < 1e-9
        assert max_diff(logits, as_joint(models["per_slice"]).eval()(x)) < 1e-9


def test_float32_step_is_the_authors(start):
    """One float32 step on real-size maps: logits, gradients and running statistics as the loop's; joint's differ."""
    (x,), (y,) = batches(14, steps=1)
    per_slice, loop = copy.deepcopy(start), as_joint(start)
    (logits, grads), = train_steps(per_slice, AMAN.__call__, [x], [y])
    (ref_logits, ref_grads), = train_steps(loop, authors_logits, [x], [y])
    assert max_diff(logits, ref_logits) < 1e-6 and max(max_diff(grads[n], ref_grads[n]) for n in grads) < 1e-6
    for name, m in norms(loop).items():
        ours = norms(per_slice)[name]
        assert max_diff(ours.running_mean, m.running_mean) < 1e-5 and max_diff(ours.running_var, m.running_var) < 1e-5
    with torch.no_grad():
        assert max_diff(as_joint(start).train()(x), logits) > 1e-3  # joint is not the authors'


def test_per_slice_is_one_layer4_call_with_the_same_keys():
    model = AMAN(3).train()
    calls = []
    model.layer4.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(torch.randn(2, 2, 3, C, 14, 14))
    assert calls == [2 * 2 * 3]
    assert list(model.state_dict()) == list(AMAN(3, layer4_bn="joint").state_dict())
    with pytest.raises(ValueError, match="layer4_bn.*per_slice.*joint"):
        AMAN(3, layer4_bn="slice")


def test_channels_last_per_slice_matches():
    torch.manual_seed(0)
    plain = AMAN(3).train()
    fast = copy.deepcopy(plain)
    fast.channels_last = True
    x = torch.randn(2, 2, 2, C, 14, 14)
    assert max_diff(fast(x), plain(x)) < 1e-5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_folded_running_update_equals_sequential_calls(momentum):
    torch.manual_seed(0)
    bn = randomise_running_stats(nn.BatchNorm2d(6, momentum=momentum), 2)
    bn.num_batches_tracked += 5
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    seq = use_group_batch_norm(nn.Sequential(copy.deepcopy(bn)))
    x = (torch.randn(15, 6, 3, 3) * 2 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with batch_groups(seq, 5):
        y = seq(x)
    y_ref = torch.stack([bn(x_ref[g::5]) for g in range(5)], 1).flatten(0, 1)  # batch g: rows g, g+5, g+10
    g = torch.randn_like(y)
    (y * g).sum().backward(), (y_ref * g).sum().backward()
    assert max_diff(y, y_ref) < 1e-5 and max_diff(x.grad, x_ref.grad) < 1e-5
    assert max_diff(seq[0].weight.grad, bn.weight.grad) < 1e-4 and max_diff(seq[0].bias.grad, bn.bias.grad) < 1e-4
    assert max_diff(seq[0].running_mean, bn.running_mean) < 1e-6 and max_diff(seq[0].running_var, bn.running_var) < 1e-6
    assert seq[0].num_batches_tracked.item() == bn.num_batches_tracked.item() == 10
    with pytest.raises(ValueError, match="4 equal groups"), batch_groups(seq, 4):
        seq(x)


@pytest.fixture(scope="module")
def trunks():
    """A trunk with FER+-like weights and running statistics far from any batch's, in both BatchNorm modes."""
    torch.manual_seed(3)
    net = randomise_running_stats(resnet18(), 4).eval()
    trunks = {bn: ResNet18Trunk(bn=bn) for bn in ("running", "frame_batch")}
    for trunk in trunks.values():
        trunk.load_state_dict({k: v for k, v in net.state_dict().items() if k in trunk.state_dict()})
    return net, trunks


@pytest.fixture(scope="module")
def frames():
    return torch.randn(3, 4, 3, 48, 48, generator=torch.Generator().manual_seed(5))  # G frames, n images each


def test_frame_batch_is_the_train_mode_trunk_per_frame(trunks, frames):
    _, trunks = trunks
    trunk = trunks["frame_batch"]
    authors = copy.deepcopy(trunks["running"]).train()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    with torch.no_grad():
        expected = torch.stack([authors(frame) for frame in frames])  # G, n, 256, 3, 3
        for mode in (trunk.train, trunk.eval):
            mode()
            assert max_diff(trunk(frames), expected) < 1e-4
        assert max_diff(trunk(frames), torch.stack([trunk(frame) for frame in frames])) < 1e-5
        assert max_diff(trunk(frames[1]), expected[1]) < 1e-4
    assert trunk.bn == "frame_batch" and all(torch.equal(v, trunk.state_dict()[k]) for k, v in before.items())


def test_running_trunk_is_torchvision_in_eval(trunks, frames):
    net, trunks = trunks
    trunk = trunks["running"].eval()
    x = frames.flatten(0, 1)
    with torch.no_grad():
        expected = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        assert max_diff(trunk(x), expected) < 1e-5
        assert torch.equal(trunk(frames), trunk(x).unflatten(0, frames.shape[:2]))
        assert max_diff(trunks["frame_batch"](frames).flatten(0, 1), expected) > 1e-2  # the modes do differ here


def test_frame_batch_keeps_state_dict_and_loads_checkpoints(tmp_path):
    torch.manual_seed(6)
    net = resnet18(num_classes=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "fer.pth.tar")
    trunk = load_trunk(tmp_path / "fer.pth.tar", bn="frame_batch")
    assert list(trunk.state_dict()) == list(ResNet18Trunk().state_dict()) and trunk.bn == "frame_batch"
    assert torch.equal(trunk.layer2[0].bn1.running_var, net.layer2[0].bn1.running_var)
    full = load_fer_checkpoint(ResNet18Trunk(with_layer4=True, bn="frame_batch"), tmp_path / "fer.pth.tar")
    assert torch.equal(full.layer4[1].bn2.weight, net.layer4[1].bn2.weight)
    assert load_trunk(tmp_path / "fer.pth.tar").bn == "running"
    with pytest.raises(ValueError, match="bn must be one of.*running.*frame_batch"):
        load_trunk(tmp_path / "fer.pth.tar", bn="per_frame")


def test_bf16_autocast_stays_close(trunks, frames):
    """Measured: logits within 0.6% of the largest |logit|; features 2.5% off in relative L2 norm (2.9% at 224x224,
    as much as PyTorch's own train-mode BatchNorm per frame under bf16: batch statistics of a few images amplify
    the rounding of the bf16 convolution outputs)."""
    torch.manual_seed(7)
    model = AMAN(3).train()
    x = torch.randn(B, F, K, C, 14, 14)
    trunk = trunks[1]["frame_batch"]
    with torch.no_grad():
        ref_logits, ref_features = model(x), trunk(frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, features = model(x), trunk(frames)
    assert logits.dtype == features.dtype == torch.bfloat16
    assert max_diff(logits, ref_logits) < 0.02 * ref_logits.abs().max().item()
    assert ((features.float() - ref_features).norm() / ref_features.norm()).item() < 0.05
