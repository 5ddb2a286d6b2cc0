"""bf16 where the hardware has it: detection, the precision setting, and what bf16 changes in the features."""
import pytest
import torch

from amanlib.backbone import ResNet18Trunk
from amanlib.features import extract_features
from amanlib.runtime import native_bf16, resolve_precision


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "cpuinfo_bf16"
    with_bf16.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    without = tmp_path / "cpuinfo_plain"
    without.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert native_bf16("cpu", with_bf16) and not native_bf16("cpu", without)
    assert not native_bf16("cpu", tmp_path / "absent")  # no /proc/cpuinfo (macOS, Windows): fp32
    amx = tmp_path / "cpuinfo_amx"
    amx.write_text("flags : avx2 amx_bf16 amx_tile\n")
    assert native_bf16("cpu", amx)


def test_precision_setting(monkeypatch):
    import amanlib.runtime as runtime
    assert resolve_precision("fp32", "cpu") is None and resolve_precision("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert resolve_precision("auto", "cpu") is None  # never emulated bf16 where it would be slower
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_bf16_trunk_features_stay_close_to_fp32():
    torch.manual_seed(0)
    trunk = ResNet18Trunk().eval()
    images = torch.rand(6, 3, 96, 96)
    fp32 = extract_features(images, trunk, device="cpu", progress=False)
    bf16 = extract_features(images, trunk, device="cpu", progress=False, autocast_dtype=torch.bfloat16)
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert bf16.dtype == torch.float32 and 0 < relative < 0.02, relative  # measured 0.008 (random weights, 96 px)
