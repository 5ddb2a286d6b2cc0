"""Motion magnification: the authors' outputs reproduced, batching exact, known motion magnified, bad input refused,
and the synthetic set's magnified truth."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms.v2.functional import gaussian_blur

from amanlib.magnify import (
    MAGNET_SHA256,
    METHODS,
    EulerianMagnifier,
    LagrangianMagnifier,
    LearningBasedMagnifier,
    PhaseMagnifier,
    download_magnet_checkpoint,
    load_magnifier,
    verify_checkpoint,
)

GOLDEN_FACTORS = [round(float(f), 2) for f in np.linspace(2, 12, 32)]


# ---------------------------------------------------------------- helpers

def smooth_texture(h: int, w: int, sigma: float, seed: int) -> torch.Tensor:
    """Gaussian-blurred white noise, grey level 0.5 +- 0.12 per std, [1, 3, H, W] (channels differ)."""
    g = torch.Generator().manual_seed(seed)
    x = gaussian_blur(torch.randn(1, 3, h, w, generator=g), kernel_size=[2 * int(3 * sigma) + 1] * 2, sigma=[sigma] * 2)
    return (0.5 + 0.12 * (x - x.mean()) / x.std()).clamp(0, 1)


def fourier_shift(x: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """Circular sub-pixel translation by (dy, dx): content at p moves to p + d."""
    h, w = x.shape[-2:]
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64)[:, None], torch.fft.rfftfreq(w, dtype=torch.float64)[None]
    ramp = torch.exp(-2j * math.pi * (fy * dy + fx * dx))
    return torch.fft.irfft2(torch.fft.rfft2(x.double()) * ramp, s=(h, w)).to(x.dtype)


def global_translation(ref: torch.Tensor, moved: torch.Tensor, margin: int = 12, iters: int = 30) -> torch.Tensor:
    """Iterative Lucas-Kanade for one translation d with moved(p) ~ ref(p - d); [dy, dx], borders ignored."""
    ref, moved = ref.double().mean(-3)[0], moved.double().mean(-3)[0]  # H, W grey
    inner = (slice(margin, -margin), slice(margin, -margin))
    gy, gx = (g[inner] for g in torch.gradient(ref))
    A = torch.stack([torch.stack([(gy * gy).sum(), (gy * gx).sum()]), torch.stack([(gy * gx).sum(), (gx * gx).sum()])])
    d = torch.zeros(2, dtype=torch.float64)
    for _ in range(iters):
        err = (fourier_shift(moved, -d[0].item(), -d[1].item()) - ref)[inner]
        step = torch.linalg.solve(A, -torch.stack([(gy * err).sum(), (gx * err).sum()]))
        d = d + step
        if step.abs().max() < 1e-7:
            break
    return d


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def magnet(request):
    from conftest import reference_path

    return LearningBasedMagnifier.from_checkpoint(reference_path("magnet", "learning_based_mag.pth.tar"), device="cpu")


@pytest.fixture(scope="module")
def face_pair():
    """The CASME II onset/apex pair at its native 282x231 (odd width), [1, 3, H, W] in [0, 1]."""
    from conftest import reference_path

    tt = transforms.ToTensor()
    names = ("reg_img46.jpg", "reg_img59.jpg")
    return tuple(tt(Image.open(reference_path("magnet", "frames", n)).convert("RGB"))[None] for n in names)


# ---------------------------------------------------------------- learning-based

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_learning_reproduces_all_32_golden_images(magnet, reference, dtype):
    """The authors' demo: both frames Resize((384, 384)) on PIL, all 32 factors; each output >= 40 dB vs their JPEG,
    in fp32 and under bf16 autocast alike."""
    tt = transforms.Compose([transforms.Resize((384, 384)), transforms.ToTensor()])
    onset, apex = (tt(Image.open(reference("magnet", "frames", n)))[None] for n in ("reg_img46.jpg", "reg_img59.jpg"))
    out = LearningBasedMagnifier(magnet.net, autocast_dtype=dtype)(onset, apex, GOLDEN_FACTORS)  # 1, 32, 3, 384, 384
    assert out.shape == (1, 32, 3, 384, 384)
    ours = out[0].mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # save_image's rounding
    scores = {}
    for k, f in enumerate(GOLDEN_FACTORS):
        golden = np.asarray(Image.open(reference("magnet", "golden", f"amp_{f}.jpg")).convert("RGB"))
        scores[f] = psnr(ours[k], golden)
    assert min(scores.values()) >= 40.0, scores
    # the factor matters: an output compared with the wrong factor's golden image scores clearly lower
    golden_12 = np.asarray(Image.open(reference("magnet", "golden", "amp_12.0.jpg")).convert("RGB"))
    assert psnr(ours[0], golden_12) < scores[12.0] - 5


def test_learning_batched_equals_per_factor(magnet, face_pair):
    onset, apex = (F.interpolate(x, size=(66, 54), mode="bilinear", antialias=True).clamp(0, 1) for x in face_pair)
    batch_o, batch_a = torch.cat([onset, apex.flip(-1)]), torch.cat([apex, onset.flip(-1)])  # B = 2
    factors = [0.5, 1.0, 3.0, 7.5, 20.0]
    batched = LearningBasedMagnifier(magnet.net, chunk_size=16)(batch_o, batch_a, factors)  # one decoder pass
    single = torch.cat([magnet(batch_o, batch_a, [f]) for f in factors], dim=1)
    assert batched.shape == (2, 5, 3, 66, 54)
    torch.testing.assert_close(batched, single, atol=2e-5, rtol=0)
    chunked = LearningBasedMagnifier(magnet.net, chunk_size=4)(batch_o, batch_a, factors)  # 2 + 2 + 1 factors
    torch.testing.assert_close(chunked, batched, atol=2e-5, rtol=0)
    assert (batched[:, 4] - batched[:, 2]).abs().max() > 0.05  # the factor changes the output


def test_learning_factor_one_reconstructs_frame_at_odd_size(magnet, face_pair):
    onset, apex = face_pair  # 282 x 231: padded to a multiple of 4 inside, cropped back
    out = magnet(onset, apex, [1.0])
    assert out.shape == (1, 1, 3, 282, 231)
    mse = ((out[:, 0] - apex) ** 2).mean().item()
    assert 10 * math.log10(1 / mse) > 35
    assert not out.is_inference() and out.min() >= 0 and out.max() <= 1


def test_learning_bf16_autocast_close_to_fp32(magnet, face_pair):
    onset, apex = (F.interpolate(x, size=(64, 64), mode="area") for x in face_pair)
    bf16 = LearningBasedMagnifier(magnet.net, autocast_dtype=torch.bfloat16, channels_last=True)
    plain = LearningBasedMagnifier(magnet.net, channels_last=False)
    a, b = bf16(onset, apex, [2.0, 6.0]), plain(onset, apex, [2.0, 6.0])
    assert a.dtype == torch.float32
    assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.1
    assert not torch.equal(a, b)  # autocast really ran in bf16


# ---------------------------------------------------------------- checkpoint handling

def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LearningBasedMagnifier.from_checkpoint(tmp_path / "nope.pth.tar")
    msg = str(err.value)
    assert "nope.pth.tar" in msg and "github.com/weimengting/AMAN" in msg
    assert "mag_imple/learning_based_mag.pth.tar" in msg and MAGNET_SHA256 in msg


@pytest.mark.parametrize("content", ["text", "torch-dict", "wrong-weights"])
def test_not_a_checkpoint_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / f"{content}.pth.tar"
    if content == "text":
        path.write_text("this is not a checkpoint\n")
    elif content == "torch-dict":
        torch.save({"epoch": 3}, path)
    else:
        torch.save({"state_dict": {"module.encoder.conv1.weight": torch.zeros(16, 3, 7, 7)}}, path)
    with pytest.raises(ValueError, match=str(path.name)):
        load_magnifier("learning", checkpoint=path, device="cpu")


def test_checkpoint_verification_and_download_path(tmp_path, reference):
    real = reference("magnet", "learning_based_mag.pth.tar")
    assert verify_checkpoint(real) == real
    fake = tmp_path / "fake.pth.tar"
    fake.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match="fake.pth.tar"):
        verify_checkpoint(fake)
    # the download helper, fed a local file:// URL (no network in tests)
    (tmp_path / "ckpt").mkdir()
    got = download_magnet_checkpoint(tmp_path / "ckpt", url=real.as_uri())  # a folder: the file goes inside
    assert got == tmp_path / "ckpt" / "learning_based_mag.pth.tar" and verify_checkpoint(got) == got
    dest = tmp_path / "bad" / "weights.pth.tar"
    with pytest.raises(ValueError, match="SHA-256"):
        download_magnet_checkpoint(dest, url=fake.as_uri())
    assert not dest.exists() and not any(dest.parent.iterdir())  # nothing half-written left behind


# ---------------------------------------------------------------- Eulerian and phase-based

CLASSIC = [
    pytest.param(lambda: EulerianMagnifier(lambda_c=8.0), id="eulerian"),
    pytest.param(lambda: PhaseMagnifier(), id="phase"),
    pytest.param(lambda: LagrangianMagnifier(), id="lagrangian"),
]


@pytest.mark.parametrize("make", CLASSIC)
def test_factor_one_is_identity(make, face_pair):
    onset, apex = face_pair  # odd width
    out = make()(onset, apex, [1.0, 4.0])
    assert out.shape == (1, 2, 3, 282, 231)
    assert (out[:, 0] - apex).abs().max() < 0.02
    assert (out[:, 1] - apex).abs().max() > 0.05  # and factor 4 is not


@pytest.mark.parametrize("make", CLASSIC)
@pytest.mark.parametrize("size", [(128, 128), (97, 131)], ids=["128x128", "97x131"])
def test_known_motion_is_magnified(make, size):
    """A sub-pixel Fourier shift d of a smooth texture, magnified by a, moves by a*d (within 25 %)."""
    d = torch.tensor([0.2, -0.1], dtype=torch.float64)
    onset = smooth_texture(*size, sigma=3.0, seed=0)
    frame = fourier_shift(onset, *d.tolist()).clamp(0, 1)
    assert torch.allclose(global_translation(onset, frame), d, atol=2e-3)  # the estimator itself is right
    factors = [2.0, 3.0, 4.0]
    out = make()(onset, frame, factors)
    for k, a in enumerate(factors):
        measured = global_translation(onset, out[:, k])
        assert torch.linalg.norm(measured - a * d) < 0.25 * a * torch.linalg.norm(d), (a, measured.tolist())


def test_eulerian_cutoff_attenuates_fine_motion():
    """lambda_c bounds amplification: with a cut-off far above the texture's wavelengths, little is added."""
    onset = smooth_texture(128, 128, sigma=4.0, seed=1)
    frame = fourier_shift(onset, 0.2, 0.0).clamp(0, 1)
    shifts = [
        global_translation(onset, EulerianMagnifier(lambda_c=lc)(onset, frame, [4.0])[:, 0])[0].item()
        for lc in (8.0, 64.0)
    ]
    assert shifts[0] > 0.6 and 0.18 < shifts[1] < 0.45, shifts  # 0.2 = the unmagnified shift


@pytest.mark.parametrize("make", CLASSIC)
def test_classic_batched_equals_per_factor(make):
    onset = torch.cat([smooth_texture(64, 72, 3.0, s) for s in (2, 3)])  # B = 2
    frames = torch.cat([fourier_shift(onset[:1], 0.3, 0.1), fourier_shift(onset[1:], -0.2, 0.4)]).clamp(0, 1)
    magnifier = make()
    factors = [0.5, 1.0, 2.5, 8.0]
    batched = magnifier(onset, frames, factors)
    single = torch.cat([magnifier(onset, frames, [f]) for f in factors], dim=1)
    assert batched.shape == (2, 4, 3, 64, 72)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], magnifier(onset[1:], frames[1:], factors), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", ["eulerian", "phase", "lagrangian"])
def test_bad_input_gets_clear_errors(name):
    m = load_magnifier(name)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="frames' shape"):
        m(x, torch.rand(2, 3, 32, 30), [2.0])
    with pytest.raises(ValueError, match="batch 1"):
        m(x, torch.rand(3, 3, 32, 32), [2.0])  # two onsets for three frames
    with pytest.raises(ValueError, match=r"frames values must lie in \[0, 1\]"):
        m(x, x * 255, [2.0])
    with pytest.raises(ValueError, match=r"onset values must lie in \[0, 1\]"):
        m(x - 0.5, x, [2.0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(x[:, :1], x[:, :1], [2.0])
    with pytest.raises(ValueError, match="float"):
        m((x * 255).to(torch.uint8), (x * 255).to(torch.uint8), [2.0])
    with pytest.raises(ValueError, match="factors"):
        m(x, x, [])
    with pytest.raises(ValueError, match="finite"):
        m(x, x, [2.0, float("nan")])
    with pytest.raises(ValueError, match="onset values"):
        m(torch.full_like(x, float("nan")), x, [2.0])


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="'optical'.*learning, eulerian, phase"):
        load_magnifier("optical")


def test_load_magnifier_builds_each_method(reference):
    ckpt = reference("magnet", "learning_based_mag.pth.tar")
    assert isinstance(load_magnifier("learning", checkpoint=ckpt, device="cpu"), LearningBasedMagnifier)
    assert load_magnifier("eulerian", lambda_c=30.0).config.lambda_c == 30.0
    assert load_magnifier("phase", sigma=0.0, device="cpu").config.sigma == 0.0
    assert load_magnifier("lagrangian", flow="farneback", device="cpu").config.flow == "farneback"
    assert METHODS == ("learning", "eulerian", "phase", "lagrangian")
    with pytest.raises(ValueError, match="flow must be one of"):
        load_magnifier("lagrangian", flow="lucas-kanade")


def test_default_checkpoint_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AMANLIB_MAGNET_CHECKPOINT", str(tmp_path / "here.pth.tar"))
    with pytest.raises(FileNotFoundError, match="here.pth.tar"):
        load_magnifier("learning", device="cpu")


@pytest.mark.parametrize("name", METHODS)
def test_one_onset_for_all_frames_equals_the_onset_repeated(name, reference):
    """magnify_clip passes the clip's onset once ([1, 3, H, W]): prepared once, same result as repeating it."""
    m = load_magnifier(name, checkpoint=reference("magnet", "learning_based_mag.pth.tar"), device="cpu") \
        if name == "learning" else load_magnifier(name)
    g = torch.Generator().manual_seed(0)
    onset, frames = torch.rand(1, 3, 40, 48, generator=g), torch.rand(3, 3, 40, 48, generator=g)
    once = m(onset, frames, [1.0, 3.0, 6.0])
    repeated = m(onset.expand(3, -1, -1, -1), frames, [1.0, 3.0, 6.0])
    torch.testing.assert_close(once, repeated, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- Lagrangian

@pytest.mark.parametrize("flow", ["dis", "farneback"])
def test_lagrangian_moves_a_translation_a_times(flow):
    """A sub-pixel shift d of a smooth texture comes out shifted by a * d within 10 %, up to a * |d| = 8.5 px."""
    d = torch.tensor([0.15, 0.4], dtype=torch.float64)  # dy, dx
    onset = smooth_texture(128, 128, sigma=3.0, seed=4)
    frame = fourier_shift(onset, *d.tolist()).clamp(0, 1)
    factors = [2.0, 4.0, 7.0, 10.0, 20.0]
    out = LagrangianMagnifier(flow=flow)(onset, frame, factors)
    for k, a in enumerate(factors):
        measured = global_translation(onset, out[:, k], margin=16)
        assert torch.linalg.norm(measured - a * d) < 0.1 * a * torch.linalg.norm(d), (a, measured.tolist())


def test_lagrangian_contract_and_determinism():
    """[B, K, 3, H, W] in [0, 1] at an odd, non-square size, factor 1 the frame, the same bytes on every run."""
    onset = smooth_texture(61, 90, sigma=2.0, seed=5)
    frames = torch.cat([fourier_shift(onset, 0.3, -0.2), fourier_shift(onset, -0.5, 0.1)]).clamp(0, 1)  # B = 2
    runs = [LagrangianMagnifier()(onset, frames, [1.0, 3.0, 12.0]) for _ in range(2)]
    out = runs[0]
    assert out.shape == (2, 3, 3, 61, 90) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out[:, 0] - frames).abs().max() < 1e-5
    assert out[:, 1:].sub(frames[:, None]).abs().amax() > 0.05
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()


# ---------------------------------------------------------------- the synthetic truth

@pytest.fixture(scope="module")
def drifting_set(tmp_path_factory):
    """A small synthetic set whose heads drift 0.8 px at most, without blinks or flicker; its folder and clip table."""
    from amanlib.data import make_synthetic, synthetic_root

    settings = dict(seed=2, n_subjects=2, clips_per_subject=3, drift_px=0.8, blink_prob=0.0, flicker=0.0)
    root = tmp_path_factory.mktemp("truth")
    return synthetic_root(root, **settings), make_synthetic(root, **settings)


def test_truth_at_factor_one_is_the_generated_clip(drifting_set):
    """Every frame of a clip at factor 1 equals the JPEG the generator wrote, within its noise and compression."""
    from amanlib.data import clip_frame_paths, load_clip_frames, render_magnified_truth

    folder, index = drifting_set
    for _, row in index.iloc[[0, 4]].iterrows():
        truth = render_magnified_truth(folder, row["subject"], row["clip"], [1.0])
        written = load_clip_frames(clip_frame_paths(row))  # F, 3, H, W
        assert truth.images.shape == (len(written), 1, 3, 128, 128)
        assert truth.motion.shape == (len(written), 2, 128, 128)
        error = (truth.images[:, 0] - written).abs().mean(dim=(1, 2, 3))  # per frame
        assert error.max() < 3 / 255, error * 255
    with pytest.raises(ValueError, match="no clip 'EP09_01'"):
        render_magnified_truth(folder, "sub01", "EP09_01", [2.0])
    with pytest.raises(ValueError, match="frames must lie in"):
        render_magnified_truth(folder, "sub01", "EP01_01", [2.0], frames=[0])
    with pytest.raises(FileNotFoundError, match="synthetic_root"):
        render_magnified_truth(folder.parent, "sub01", "EP01_01", [2.0])


def test_truth_moves_the_face_a_times(drifting_set):
    """Factor a moves the head (the offset frame: drift only) and the expression (the apex) a times as far."""
    import cv2

    from amanlib.data import render_magnified_truth
    from amanlib.magnify.lagrangian import luminance_u8

    folder, index = drifting_set
    row = index.loc[(index["apex"] - index["onset"]).idxmax()]
    factors = [1.0, 2.0, 3.0]
    truth = render_magnified_truth(folder, row["subject"], row["clip"], factors,
                                   frames=[row["onset"], row["apex"], row["offset"]])
    assert not truth.folded.any()
    onset, apex, offset = truth.images  # each K, 3, H, W
    drift = truth.motion[2].mean(dim=(1, 2)).double().flip(0)  # dy, dx: uniform at the offset
    assert torch.allclose(truth.motion[2], truth.motion[2, :, :1, :1], atol=1e-3) and drift.norm() > 0.2
    expression = truth.motion[1]
    strength = expression.norm(dim=0)
    region = strength > 0.5 * strength.max()
    direction = expression / strength.clamp(min=1e-6)
    for k, a in enumerate(factors):
        head = global_translation(onset[k:k + 1], offset[k:k + 1], margin=16)
        assert torch.linalg.norm(head - a * drift) < 0.03 + 0.05 * a * drift.norm(), (a, head.tolist())
        flow = cv2.calcOpticalFlowFarneback(*luminance_u8(torch.stack([onset[k], apex[k]])), None, 0.5, 3, 9, 3, 5,
                                            1.1, 0)
        along = (torch.from_numpy(flow).permute(2, 0, 1) * direction).sum(0)[region].median()
        assert abs(along / (a * strength[region].median()) - 1) < 0.2, (a, float(along))


def test_apex_truth_is_the_truth_at_the_apex_and_none_on_real_data(drifting_set):
    """Notebook 02 shows data.apex_truth above the magnifiers: the truth at the row's apex, nothing for real clips."""
    from amanlib.data import apex_truth, render_magnified_truth

    folder, index = drifting_set
    row = index.iloc[1]
    want = render_magnified_truth(folder, row["subject"], row["clip"], [1.0, 4.0], [int(row["apex"])]).images[0]
    torch.testing.assert_close(apex_truth(row, [1.0, 4.0]), want, rtol=0, atol=0)
    assert apex_truth(row.copy().replace({"synthetic": "casme2"}), [1.0, 4.0]) is None


def test_truth_scores_table_is_rendered_from_the_bench_csv(tmp_path):
    """README's table of magnifiers against the truth: per method and tertile, the truth's own row left out, folded
    pairs left out of the scores."""
    from amanlib.magnify.truth_scores import markdown, summary

    rows = [dict(method=m, subject="sub01", clip=f"EP0{c}_01", peak_px=p, tertile=t, factor=f, folded=fold,
                 psnr_face_db=psnr, displacement_vs_truth=ratio, displacement_ratio=ratio, regime="narrow", seed=0,
                 learning_precision="fp32", threads=2, machine="x86_64")
            for m, psnr, ratio in (("truth", float("inf"), 1.0), ("phase", 30.0, 0.8))
            for c, (p, t) in enumerate([(0.3, "low"), (0.7, "mid"), (1.2, "high")])
            for f, fold in ((2.0, False), (12.0, t == "high"))]
    rows.append({**rows[-1], "factor": 12.0, "folded": True, "psnr_face_db": 0.0})  # a folded pair: not scored
    table = pd.DataFrame(rows)
    table.to_csv(tmp_path / "scores.csv", index=False)
    assert summary(table).loc["phase", ("psnr_face_db", "high")] == 30.0
    text = markdown(tmp_path / "scores.csv")
    assert "| phase | 30.0 / 30.0 / 30.0 | 0.80 / 0.80 / 0.80 |" in text and "| truth |" not in text
    assert "3 clips of the narrow regime" in text and "1 of 6 clip x factor pairs fold" in text


def test_the_truth_bench_gives_the_best_score_to_the_truth_itself(tmp_path):
    """bench/magnify_truth.py's scorer: the truth scores infinite PSNR and reads its own displacement (ratio 1);
    every magnifier and the unmagnified frame score below it."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "magnify_truth", Path(__file__).resolve().parents[1] / "bench" / "magnify_truth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = SimpleNamespace(seed=0, regime="narrow", subjects=2, clips=3, factors=[2.0, 7.0], checkpoint=None,
                           precision="fp32")
    table = bench.score(tmp_path, args)
    unfolded = table[~table["folded"]]
    psnr = unfolded.groupby("method")["psnr_face_db"].mean()
    assert psnr["truth"] == float("inf") and (psnr.drop("truth") < psnr["truth"]).all()
    assert (unfolded[unfolded["method"] == "truth"]["displacement_vs_truth"] == 1.0).all()
    assert {"frame", "eulerian", "phase", "lagrangian"} <= set(psnr.index)
