"""bf16 where the hardware has it: detection (CPU flags, torch's and oneDNN's ISA), the precision setting and its
one default everywhere, what ran, and what bf16 changes in the features."""
import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import papermill as pm
import pytest
import torch

from amanlib import params
from amanlib.backbone import ResNet18Trunk, choose_backbone
from amanlib.features import build_feature_cache, extract_features
from amanlib.magnify import magnifier_for
from amanlib.pretrain import PretrainConfig
from amanlib.train import TrainConfig, run_inputs, training_dtype
from amanlib.runtime import PRECISIONS, machine_info, native_bf16, resolve_precision

REPO = Path(__file__).resolve().parents[1]


AVX512 = {"env": {}, "capability": "AVX512"}  # what torch and oneDNN use on an AVX512-BF16 CPU, uncapped


@pytest.fixture
def cpuinfo(tmp_path):
    """Fake /proc/cpuinfo files: one with avx512_bf16, one without."""
    with_bf16 = tmp_path / "cpuinfo_bf16"
    with_bf16.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    without = tmp_path / "cpuinfo_plain"
    without.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    return with_bf16, without


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, cpuinfo):
    with_bf16, without = cpuinfo
    assert native_bf16("cpu", with_bf16, **AVX512) and not native_bf16("cpu", without, **AVX512)
    assert not native_bf16("cpu", tmp_path / "absent", **AVX512)  # no /proc/cpuinfo (macOS, Windows): fp32
    amx = tmp_path / "cpuinfo_amx"
    amx.write_text("flags : avx2 amx_bf16 amx_tile\n")
    assert native_bf16("cpu", amx, **AVX512)


@pytest.mark.parametrize("isa, native", [
    (None, True), ("ALL", True), ("DEFAULT", True), ("avx512_core_bf16", True), ("AVX512_CORE_AMX", True),
    ("AVX512_CORE_FP16", True), ("AVX10_1_512_AMX", True),
    ("AVX2", False), ("avx2_vnni", False), ("AVX512_CORE", False), ("AVX512_CORE_VNNI", False), ("SSE41", False)])
def test_native_bf16_honours_onednn_isa_cap(cpuinfo, isa, native):
    env = {} if isa is None else {"ONEDNN_MAX_CPU_ISA": isa}
    assert native_bf16("cpu", cpuinfo[0], env=env, capability="AVX512") is native


def test_native_bf16_honours_torch_cpu_capability(cpuinfo):
    """ATEN_CPU_CAPABILITY=avx2 makes torch report AVX2: its kernels would emulate bf16 even where the flag is."""
    assert not native_bf16("cpu", cpuinfo[0], env={}, capability="AVX2")
    assert not native_bf16("cpu", cpuinfo[0], env={}, capability="DEFAULT")


def test_precision_setting(cpuinfo):
    with_bf16, without = cpuinfo
    for info in (with_bf16, without):
        assert resolve_precision("fp32", "cpu", info, **AVX512) is None
        assert resolve_precision("bf16_emulated", "cpu", info, **AVX512) is torch.bfloat16  # knowingly, anywhere
    assert resolve_precision("auto", "cpu", with_bf16, **AVX512) is torch.bfloat16
    assert resolve_precision("bf16", "cpu", with_bf16, **AVX512) is torch.bfloat16
    assert resolve_precision("auto", "cpu", without, **AVX512) is None  # never emulated bf16 where it would be slower
    assert resolve_precision("auto", "cpu", with_bf16, env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, capability="AVX2") is None
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_explicit_bf16_where_emulated_is_refused_in_one_line_naming_why(cpuinfo):
    with pytest.raises(ValueError) as e:
        resolve_precision("bf16", "cpu", cpuinfo[1], **AVX512)
    assert str(e.value) == ("bf16 is emulated on this CPU (no avx512_bf16/amx_bf16 flag): measured 8.6x (an AVX2 "
                            "CPU) to 14x (bench/precision.py, AVX2 simulated) slower than fp32 for a ResNet-18 "
                            "training step; use precision 'auto' or 'fp32', or 'bf16_emulated' to run it anyway")
    with pytest.raises(ValueError, match=r"\(torch's CPU capability is AVX2, not AVX512; ONEDNN_MAX_CPU_ISA=AVX2 caps "
                                         r"oneDNN below AVX512_CORE_BF16\)"):
        resolve_precision("bf16", "cpu", cpuinfo[0], env={"ONEDNN_MAX_CPU_ISA": "avx2"}, capability="AVX2")


def test_auto_is_fp32_under_the_simulated_avx2_isa():
    """The AVX2 simulation (README) must choose what an AVX2 machine would: torch reads ATEN_CPU_CAPABILITY at
    start-up, so a fresh process checks it."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = ("import torch; from amanlib.runtime import machine_info, resolve_precision; "
            "info = machine_info('cpu'); print(resolve_precision('auto', 'cpu'), info['cpu_capability'], "
            "info['onednn_max_cpu_isa'], info['native_bf16'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "AVX2", "AVX2", "False"]


def test_machine_info_records_what_ran():
    info = machine_info("cpu")
    assert set(info) == {"cpu", "cores", "threads", "cpu_capability", "onednn_max_cpu_isa", "native_bf16", "device",
                         "gpu", "torch"}
    assert info["device"] == "cpu" and info["cores"] >= 1 and info["native_bf16"] == native_bf16("cpu")
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["torch"] == torch.__version__


def test_precision_defaults_agree_everywhere():
    """One default, auto, in the library, the notebooks and `make reproduce`, which pins nothing that changes speed
    by machine; choose_backbone pre-trains as long as PretrainConfig says."""
    assert PRECISIONS[0] == "auto" and params.SCHEMA["precision"].choices == PRECISIONS
    pinned = re.search(r"^PINNED\s*:?=(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    recipe = (REPO / "Makefile").read_text().split("\nreproduce:")[1].split("\n\n")[0]
    assert "precision" not in pinned and "precision" not in recipe and "$(PINNED)" in recipe
    cells = {nb: pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb")) for nb in params.NOTEBOOKS}
    declared = {nb: ast.literal_eval(c["precision"]["default"]) for nb, c in cells.items() if "precision" in c}
    assert declared == {"03_feature_extraction": "auto", "04_training": "auto"} == \
        {nb: params.SCHEMA["precision"].default for nb in declared}  # one setting for every stage
    assert PretrainConfig().precision == "auto"
    for function in (choose_backbone, build_feature_cache, magnifier_for):
        assert inspect.signature(function).parameters["precision"].default == "auto", function.__name__
    assert inspect.signature(choose_backbone).parameters["pretrain_epochs"].default is None  # PretrainConfig's
    assert ast.literal_eval(cells["03_feature_extraction"]["pretrain_epochs"]["default"]) == PretrainConfig.epochs


def test_bf16_trunk_features_stay_close_to_fp32():
    torch.manual_seed(0)
    trunk = ResNet18Trunk().eval()
    images = torch.rand(6, 3, 96, 96)
    fp32 = extract_features(images, trunk, device="cpu", progress=False)
    bf16 = extract_features(images, trunk, device="cpu", progress=False, autocast_dtype=torch.bfloat16)
    relative = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert bf16.dtype == torch.float32 and 0 < relative < 0.02, relative  # measured 0.008 (random weights, 96 px)


def test_training_follows_the_one_precision_setting(cpuinfo):
    """Notebook 04 trains under notebook 03's precision setting: the full model autocasts where it resolves to bf16
    (native only, unless bf16_emulated), the frozen-layer4 head never does."""
    with_bf16, without = cpuinfo
    native = {"cpuinfo": with_bf16, "env": {}, "capability": "AVX512"}
    plain = {"cpuinfo": without, "env": {}, "capability": "AVX2"}
    def dtype(precision, frozen, machine):
        return training_dtype(TrainConfig(precision=precision, frozen_layer4=frozen, device="cpu"), **machine)

    assert dtype("auto", False, native) is torch.bfloat16 and dtype("auto", False, plain) is None
    assert dtype("auto", True, native) is None  # the frozen head trains in fp32
    assert dtype("fp32", False, native) is None
    assert dtype("bf16_emulated", False, plain) is torch.bfloat16
    with pytest.raises(ValueError, match="bf16 is emulated on this CPU"):
        dtype("bf16", False, plain)
    with pytest.raises(ValueError, match="TrainConfig.precision must be one of"):
        TrainConfig(precision="fp16")


def test_a_runs_key_holds_the_precision_as_resolved():
    """Settings that compute the same share a run ('auto' and 'fp32' for the frozen-layer4 head); bf16 does not."""
    import pandas as pd
    index = pd.DataFrame({"dataset": ["d"], "subject": ["s"], "clip": ["c"], "label": [0]})

    def recorded(**settings):
        return run_inputs("features", index, TrainConfig(device="cpu", **settings))["config"]["precision"]

    assert recorded(precision="auto", frozen_layer4=True) == recorded(precision="fp32", frozen_layer4=True) \
        == recorded(precision="bf16_emulated", frozen_layer4=True) == str(torch.float32)
    assert recorded(precision="bf16_emulated") == str(torch.bfloat16)


def test_frozen_layer4_auto_is_resolved_by_the_device():
    assert TrainConfig(device="cpu", frozen_layer4="auto").frozen_layer4 is True
    assert TrainConfig(device="cpu").frozen_layer4 is False  # the library's default: the authors' model
    with pytest.raises(ValueError, match="frozen_layer4 must be True, False or 'auto', got None"):
        TrainConfig(frozen_layer4=None)
