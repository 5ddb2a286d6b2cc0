"""The GPU command (bench/gpu.sh, issue 23): its CPU dry run end to end, the wheelhouse's package list, the packing."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REFERENCE

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """bench/<name>.py as a module (by path: the repo's wheelhouse/ folder must not shadow bench/wheelhouse.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_pack = bench_module("gpu_pack")
wheelhouse = bench_module("wheelhouse")

PHASES = ["setup", "gpu", "smoke", "full", "checks"]
OUT_FILES = {"log.txt", "phases.tsv", "env.txt", "gpu_checks.json", "gpu_results.tar.gz"}
NOTEBOOKS = ["01_dataset_prep", "02_magnification", "03_feature_extraction", "04_training", "05_confusion_analysis"]


def test_the_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")]).returncode == 0
    shown = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--dry-run" in shown.stdout and "carry" in shown.stdout
    wrong = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--gpu"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr


@pytest.mark.slow
def test_gpu_command_dry_run_end_to_end_on_cpu(tmp_path):
    """bash bench/gpu.sh --dry-run: the device's one command on tiny parameters with device cpu, every phase."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_ROOT": str(tmp_path / "root"), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path), "GPU_BUDGET_S": "780"}  # within pytest's 900 s; about 1.5-3 min is usual
    magnet = REFERENCE / "magnet" / "learning_based_mag.pth.tar"
    if magnet.exists():  # CI has it: the learning magnifier runs, as on the device (wheelhouse/magnet/)
        env["AMANLIB_MAGNET_CHECKPOINT"] = str(magnet)
    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=850)
    out = tmp_path / "out"
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]

    # what comes back from the device: at most 8 plain files of at most 16 MiB, with plain names
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) and (out / name).stat().st_size < 16 * 2 ** 20 for name in files)
    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()[1:]]
    assert [p[0] for p in phases] == PHASES and all(p[1] == "ok" for p in phases), phases
    assert "=== phases (seconds):" in log and "0 phase(s) not ok" in log
    uses_learning = "magnifier: learning" in log
    assert uses_learning == ("AMANLIB_MAGNET_CHECKPOINT" in env or (REPO / "wheelhouse" / "magnet").is_dir())

    checks = json.loads((out / "gpu_checks.json").read_text())
    assert checks["device"] == "cpu" and checks["tiny"] is True
    assert not [k for k, v in checks.items() if isinstance(v, dict) and "error" in v]
    same = checks["agreement"]["cpu_fp32_vs_cpu_fp32"]  # the same device twice: must be bit-identical
    assert same["predictions_identical"] and same["max_logit_diff"] == 0 and same["max_alpha_diff"] == 0
    assert checks["agreement"]["cpu_fp32_side_by_side_vs_alone"]["predictions_identical"]  # the sweep's engine
    bf16 = checks["agreement"]["cpu_bf16_vs_cpu_fp32"]
    assert bf16["ci95"][0] <= bf16["difference"] <= bf16["ci95"][1] and "within_ci" in bf16
    for part, stage in (("speed", "magnifier"), ("speed", "trunk"), ("speed", "train_step"),
                        ("side_by_side", "side_by_side_step"), ("side_by_side", "conv")):
        rows = checks[part][stage]
        assert rows and all(r["images_per_s"] > 0 and 0 < r["share_of_peak"] < 1 for r in rows), stage
    assert "full-model LOSO, one run (AMAN variant)" in checks["paper_estimate"]["groups"]

    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        names = set(tar.getnames())
        metrics = {run: json.load(tar.extractfile(f"results/{run}/metrics.json")) for run in ("gpu_smoke", "gpu")}
        timing = json.load(tar.extractfile("results/gpu_smoke/timing.json"))
    assert {f"results/gpu_smoke/notebooks/{nb}.ipynb" for nb in NOTEBOOKS} <= names
    assert "results/gpu/notebooks/04_training.ipynb" in names  # the dry run's full phase: notebook 04 on the smoke's
    # features with the full model (a CPU would take the frozen-layer4 path); on the device all five run
    assert not [n for n in names if "/work/features" in n or "/work/trunks" in n or n.endswith(".amanlib.lock")]
    assert metrics["gpu_smoke"]["model"] == "AMAN, frozen layer4" and metrics["gpu_smoke"]["clips"] == 9
    assert metrics["gpu"]["model"] == "AMAN"  # the full model, as CUDA's default: layer4 trained per fold
    assert set(metrics["gpu"]["ablations"]) == {"AMAN", "no magnification", "single factor 4", "oracle factor (truth)"}
    assert list(timing["notebooks"]) == NOTEBOOKS and timing["machine_info"]["device"] == "cpu"
    assert not processes_mentioning(str(tmp_path)), "a kernel of the dry run is still running"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = path.read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


# ------------------------------------------------------------------------------------------------- wheelhouse
def lock() -> dict:
    return json.loads(wheelhouse.LOCK.read_text())


def test_wheelhouse_carries_exactly_what_the_device_lacks():
    """The list `make wheelhouse` downloads, computed from its committed resolution (no network) by the same function:
    every runtime dependency of pyproject.toml that the device image lacks and the run needs, with their own
    dependencies, and nothing the device has."""
    requirements = wheelhouse.runtime_requirements()
    roots = wheelhouse.device_roots(requirements)
    resolution = lock()
    assert resolution["roots"] == roots, ("pyproject.toml's dependencies changed since bench/wheelhouse.lock.json "
                                          "was written: run `make wheelhouse`")
    device = wheelhouse.read_device_packages()
    carried = wheelhouse.missing_packages({n: r["requires"] for n, r in resolution["resolution"].items()}, roots,
                                          device)
    assert carried == sorted(resolution["carried"])
    assert not set(carried) & device
    assert not set(carried) & {"torch", "torchvision", "triton"} and not [n for n in carried if n.startswith("nvidia")]
    for requirement in requirements:
        name = wheelhouse.requirement_name(requirement)
        needed = name not in device and name not in wheelhouse.ON_DEVICE and name not in wheelhouse.NOT_NEEDED
        assert (name in carried) == needed, name
    assert {"openpyxl", "plenoptic", "papermill", "ipykernel"} <= set(carried)
    assert {"pyzmq", "tornado", "jupyter-client", "nbclient", "nbformat", "pyrtools", "debugpy"} <= set(carried)
    assert set(wheelhouse.NOT_NEEDED) == {"jupyterlab", "ipywidgets"}
    assert not set(carried) & {"jupyterlab", "ipywidgets"}
    for name in carried:  # a wheel for the device's CPython 3.12 on x86_64 Linux
        wheel = resolution["resolution"][name]["wheel"]
        tags = wheel.removesuffix(".whl").split("-")[-3:]
        python_ok = any(t == "py3" or re.fullmatch(r"cp3(1[0-2]|[0-9])", t) for t in tags[0].split("."))
        assert python_ok and (tags[2] == "any" or "manylinux" in tags[2] and "x86_64" in tags[2]), wheel


def test_device_list_is_normalised_and_names_what_the_issue_says():
    names = wheelhouse.read_device_packages()
    text = (REPO / "bench" / "device_packages.txt").read_text()
    assert text.startswith("#") and "KINDS.md" in text.split("\n\n")[0]
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names)
    assert {"torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "seaborn", "filelock",
            "tqdm", "pyyaml", "opencv-python-headless", "pillow"} <= names
    assert not names & {"papermill", "ipykernel", "ipywidgets", "jupyterlab", "ray", "plenoptic"}


def test_missing_packages_walks_only_into_what_the_device_lacks():
    resolved = {
        "kit-a": ["torch>=2", "numpy", "B_Lib[extra1]>=1"],
        "b-lib": ["c.lib; extra == 'extra1'", "d-lib; extra == 'other'", "colorama; sys_platform == 'win32'",
                  "old-backport; python_version < '3.11'"],
        "c-lib": ["numpy"], "d-lib": [], "colorama": [], "old-backport": [],
        "torch": ["nvidia-cublas", "sympy"], "nvidia-cublas": [], "sympy": [], "numpy": ["never-walked"],
    }
    assert wheelhouse.missing_packages(resolved, ["kit-a", "torch==2.14"], device={"NumPy"}) == ["b-lib", "c-lib",
                                                                                                   "kit-a"]
    assert wheelhouse.missing_packages(resolved, ["kit-a"], device={"numpy"}, on_device=set()) == [
        "b-lib", "c-lib", "kit-a", "nvidia-cublas", "sympy", "torch"]
    with pytest.raises(ValueError, match="e-lib is needed but not in the resolution"):
        wheelhouse.missing_packages({**resolved, "c-lib": ["e-lib"]}, ["kit-a"], device={"numpy"})


# ------------------------------------------------------------------------------------------------- packing
def test_pack_leaves_caches_out_and_shrinks_to_the_limit(tmp_path):
    run = tmp_path / "results" / "gpu"
    for rel, size in [("metrics.json", 10), ("figures/a.png", 10), ("notebooks/04_training.ipynb", 300_000),
                      ("work/runs/x/folds/f.pt", 300_000), ("work/features/k/features.f16", 10_000),
                      ("work/trunks/t.pt", 10), ("work/runs/pooled/p.pt", 10), (".amanlib.lock", 0)]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(os.urandom(size))
    out = tmp_path / "a.tar.gz"

    def names(limit_mib):
        gpu_pack.pack(tmp_path, ["results/gpu", "results/absent"], out, limit_mib)
        with tarfile.open(out) as tar:
            return {n.removeprefix("results/gpu/") for n in tar.getnames()}

    assert names(15) == {"metrics.json", "figures/a.png", "notebooks/04_training.ipynb", "work/runs/x/folds/f.pt"}
    assert names(0.5) == {"metrics.json", "figures/a.png", "notebooks/04_training.ipynb"}
    assert names(0.1) == {"metrics.json", "figures/a.png"}
    assert not list(tmp_path.glob(".*.tmp"))
