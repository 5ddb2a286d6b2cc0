"""The wheels the GPU machine lacks: amanlib's runtime dependencies for CPython 3.12 on manylinux x86_64, less what the
device image already holds (bench/device_packages.txt), downloaded into wheelhouse/ for `bash bench/gpu.sh`.

The device (see bench/gpu.sh) has no network: its own python3 (3.12) holds torch, torchvision, numpy, pandas, ...
but not papermill, Jupyter's kernel or plenoptic. Steps:
1. resolve pyproject's [project] dependencies (less torch and torchvision, which the device has, and less NOT_NEEDED)
   with `pip install --dry-run --report` for CPython 3.12, manylinux x86_64, wheels only;
2. `missing_packages`: walk that resolution from the kit's requirements, never into a package the device already
   holds (it comes with its own dependencies) nor into torch/torchvision (plenoptic's wheel is needed, torch not);
3. `pip download --no-deps` exactly those pinned versions into wheelhouse/ (stale wheels removed), copy the
   authors' magnification checkpoint beside them (wheelhouse/magnet/, the device cannot download it), write
   wheelhouse/requirements.txt and bench/wheelhouse.lock.json (the resolution, read by tests/test_gpu_command.py),
   and print the list, the total size and the size of what travels with the repo (limit 64 MiB).

    python bench/wheelhouse.py                     # make wheelhouse
    python bench/wheelhouse.py --resolve-only      # steps 1-2 and the lock file, nothing downloaded
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_LIST = REPO / "bench" / "device_packages.txt"
LOCK = REPO / "bench" / "wheelhouse.lock.json"
WHEELHOUSE = REPO / "wheelhouse"
MIB = 2 ** 20
TRAVEL_LIMIT = 64 * MIB  # the working tree plus carried paths, per device call

PYTHON_VERSION = "3.12"  # the device's python3 is 3.12.3
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")
MARKER_ENV = {"python_version": PYTHON_VERSION, "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "implementation_version": "3.12.3", "platform_release": "", "platform_version": ""}

ON_DEVICE = {"torch": "the device's own torch 2.11 (CUDA build) is what the run must use",
             "torchvision": "the device's own torchvision 0.26, built against its torch"}
"""Never carried, and never walked into: plenoptic requires torch, but its own wheel is all it needs there."""
NOT_NEEDED = {
    "jupyterlab": "papermill runs the notebooks in a kernel (ipykernel); JupyterLab, the editor, is not used",
    "ipywidgets": "only notebook 02's interactive view imports it, under show_widgets, which headless runs set "
                  "False; progress bars are text (AMANLIB_PROGRESS=text)",
}
"""Runtime dependencies of pyproject.toml that the headless GPU run does not use: not carried."""


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of -_. as '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ('ipykernel>=6.29,<7' -> 'ipykernel')."""
    return normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def read_device_packages(path: str | Path = DEVICE_LIST) -> set[str]:
    """The device image's package names (one per line, '#' comments), normalised."""
    return {normalise(line.split("#")[0].strip()) for line in Path(path).read_text().splitlines()
            if line.split("#")[0].strip()}


def runtime_requirements(pyproject: str | Path = REPO / "pyproject.toml") -> list[str]:
    """pyproject.toml's [project] dependencies, as written."""
    import tomllib  # Python 3.11+
    return list(tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"])


def device_roots(requirements: list[str]) -> list[str]:
    """The requirements the device run needs resolved: all but ON_DEVICE and NOT_NEEDED."""
    return [r for r in requirements if requirement_name(r) not in ON_DEVICE and requirement_name(r) not in NOT_NEEDED]


def _edges(requires: list[str], extras: set[str]) -> list[tuple[str, set[str]]]:
    """(name, extras asked for) of each requirement whose marker holds on the device with these extras."""
    from packaging.requirements import Requirement
    out = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({**MARKER_ENV, "extra": e})
                                              for e in (extras or {""})):
            continue
        out.append((normalise(req.name), set(req.extras)))
    return out


def missing_packages(resolved: dict[str, list[str]], roots: list[str], device: set[str],
                     on_device: set[str] = frozenset(ON_DEVICE)) -> list[str]:
    """The packages to carry: those reachable from `roots` (requirement strings) through `resolved` (normalised
    name -> its requirement strings, Requires-Dist, as the resolver chose them) that the device lacks. The walk
    does not go into a package the device holds (`device`, or `on_device`: torch, torchvision), since that one
    comes with its own dependencies. A root or dependency missing from `resolved` is a ValueError (the
    resolution is stale: run `make wheelhouse`)."""
    device = {normalise(n) for n in device} | {normalise(n) for n in on_device}
    resolved = {normalise(k): v for k, v in resolved.items()}
    todo = [(requirement_name(r), set(re.findall(r"\[([^\]]*)\]", r)[0].replace(" ", "").split(","))
             if "[" in r.split(";")[0] else set()) for r in roots]
    seen: dict[str, set[str]] = {}
    while todo:
        name, extras = todo.pop()
        if name in device:
            continue
        if name not in resolved:
            raise ValueError(f"{name} is needed but not in the resolution (stale? run `make wheelhouse`)")
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        todo += [(dep, more) for dep, more in _edges(resolved[name], seen[name]) if dep not in device]
    return sorted(seen)


def pip(*args: str, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args] + (["--quiet"] if quiet else [])
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def target_flags() -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def resolve(roots: list[str]) -> dict[str, dict]:
    """pip's resolution of `roots` for the device: normalised name -> {name, version, requires, wheel}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-installed", "--report", str(report), "--target", str(Path(tmp) / "t"),
            *target_flags(), *roots)
        items = json.loads(report.read_text())["install"]
    return {normalise(i["metadata"]["name"]): {
        "name": i["metadata"]["name"], "version": i["metadata"]["version"],
        "requires": i["metadata"].get("requires_dist", []),
        "wheel": i["download_info"]["url"].rsplit("/", 1)[-1]} for i in items}


def write_lock(resolution: dict[str, dict], requirements: list[str], roots: list[str], device: set[str],
               missing: list[str], path: Path = LOCK) -> None:
    lock = {"comment": "written by bench/wheelhouse.py (make wheelhouse): the resolution of amanlib's runtime "
                       f"dependencies for CPython {PYTHON_VERSION} manylinux x86_64; tests/test_gpu_command.py "
                       "reads it",
            "pyproject_dependencies": requirements, "roots": roots, "not_needed": NOT_NEEDED, "on_device": ON_DEVICE,
            "carried": {n: resolution[n]["version"] for n in missing},
            "resolution": {n: {k: v for k, v in r.items() if k != "name"} for n, r in sorted(resolution.items())}}
    path.write_text(json.dumps(lock, indent=1) + "\n")


def wheel_name(filename: str) -> str:
    return normalise(filename.split("-")[0])


def download(resolution: dict[str, dict], missing: list[str], dest: Path = WHEELHOUSE) -> list[Path]:
    """`pip download --no-deps` of the pinned versions into dest; wheels of anything else there are removed."""
    dest.mkdir(exist_ok=True)
    pins = [f"{resolution[n]['name']}=={resolution[n]['version']}" for n in missing]
    pip("download", "--no-deps", "-d", str(dest), *target_flags(), *pins)
    keep = {n: resolution[n]["version"] for n in missing}
    wheels = []
    for whl in sorted(dest.glob("*.whl")):
        name, version = wheel_name(whl.name), whl.name.split("-")[1]
        if keep.get(name) != version and normalise(keep.get(name, "")) != normalise(version):
            whl.unlink()  # a stale wheel: two versions of one package stop the whole install
            continue
        wheels.append(whl)
    got = {wheel_name(w.name) for w in wheels}
    if got != set(missing):
        raise SystemExit(f"wheelhouse: no cp{PYTHON_VERSION.replace('.', '')} manylinux wheel for "
                         f"{sorted(set(missing) - got)}")
    (dest / "requirements.txt").write_text("".join(f"{p}\n" for p in pins))
    return wheels


MAGNET_NAME = "learning_based_mag.pth.tar"


def copy_magnet(dest: Path = WHEELHOUSE / "magnet") -> Path | None:
    """The authors' magnification checkpoint where the kit looks for it (magnify.default_checkpoint_path:
    $AMANLIB_MAGNET_CHECKPOINT, else ~/.cache/amanlib), verified by its SHA-256, into dest: the device cannot
    download it."""
    sys.path.insert(0, str(REPO))
    from amanlib.magnify.checkpoint import MAGNET_SHA256, default_checkpoint_path, sha256_of
    source = default_checkpoint_path()
    if source.is_file() and sha256_of(source) == MAGNET_SHA256:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / MAGNET_NAME)
        return dest / MAGNET_NAME
    state = "does not have the checkpoint's SHA-256" if source.is_file() else "does not exist"
    print(f"wheelhouse: WARNING: the learning magnifier's checkpoint {source} {state} (set AMANLIB_MAGNET_CHECKPOINT):"
          " bench/gpu.sh will fall back to the Eulerian magnifier", file=sys.stderr)
    return None


def tracked_bytes(repo: Path = REPO) -> int:
    """Bytes of the files git tracks (what travels besides untracked, not ignored files and carried paths)."""
    files = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True).stdout
    return sum((repo / f).stat().st_size for f in files.decode().split("\0") if f and (repo / f).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolve-only", action="store_true", help="resolve and write the lock file, download nothing")
    ap.add_argument("--dest", type=Path, default=WHEELHOUSE)
    args = ap.parse_args(argv)
    requirements = runtime_requirements()
    roots = device_roots(requirements)
    device = read_device_packages()
    resolution = resolve(roots)
    missing = missing_packages({n: r["requires"] for n, r in resolution.items()}, roots, device)
    write_lock(resolution, requirements, roots, device, missing)
    skipped = {**{n: f"on the device ({ON_DEVICE[n]})" for n in ON_DEVICE}, **NOT_NEEDED}
    print(f"not carried: {'; '.join(f'{n}: {why}' for n, why in skipped.items())}")
    print(f"{len(resolution)} packages resolved for CPython {PYTHON_VERSION}; {len(missing)} missing from the device")
    if args.resolve_only:
        print("\n".join(f"  {resolution[n]['name']}=={resolution[n]['version']}" for n in missing))
        return missing
    wheels = download(resolution, missing, args.dest)
    magnet = copy_magnet(args.dest / "magnet")
    for whl in wheels:
        print(f"  {whl.stat().st_size / MIB:6.2f} MiB  {whl.name}")
    if magnet:
        print(f"  {magnet.stat().st_size / MIB:6.2f} MiB  magnet/{magnet.name} (the learning magnifier's checkpoint)")
    total, repo = folder_bytes(args.dest), tracked_bytes()
    print(f"wheelhouse: {len(wheels)} wheels, {total / MIB:.1f} MiB in {args.dest}; with the repo's tracked files "
          f"({repo / MIB:.1f} MiB) {(total + repo) / MIB:.1f} MiB travel of the {TRAVEL_LIMIT / MIB:.0f} MiB limit "
          "(untracked, not ignored files travel too)")
    if total + repo > TRAVEL_LIMIT:
        raise SystemExit("wheelhouse: too large to travel with the repo")
    return missing


if __name__ == "__main__":
    main()
