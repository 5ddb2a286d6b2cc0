"""Pack bench/gpu.sh's results folders into one .tar.gz under $OUT (the device returns at most 8 files, 16 MiB each).

Paths in the archive are relative to --root (results/gpu/..., results/gpu_smoke/...), so `tar -xzf` in the repo's
root puts them in place. Caches that are large and rebuilt from the rest are left out (features, trunks, pooled
features, synthetic data); if the archive is still over --limit-mib the work/ folders go too, then the executed
notebooks (figures, metrics.json and timing.json always stay). Written to a temporary name, then renamed.

    python bench/gpu_pack.py --root . --out $OUT/gpu_results.tar.gz results/gpu_smoke results/gpu
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

ALWAYS_OUT = ("work/features", "work/trunks", "work/runs/pooled", "data")
LEVELS = ((), ("work",), ("work", "notebooks"))  # left out in addition, step by step, while too large
SKIP_NAMES = {".amanlib.lock", "__pycache__"}


def _left_out(rel: Path, extra: tuple[str, ...]) -> bool:
    parts = rel.parts[2:]  # below results/<run>/
    text = "/".join(parts)
    return bool(SKIP_NAMES & set(rel.parts)) or any(text == p or text.startswith(p + "/") for p in ALWAYS_OUT + extra)


def pack(root: Path, folders: list[str], out: Path, limit_mib: float = 15.0) -> dict:
    """Write out; returns {'bytes', 'left_out', 'files'}."""
    tmp = out.with_name(f".{out.name}.tmp")
    for extra in LEVELS:
        count = 0
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for folder in folders:
                base = root / folder
                if not base.is_dir():
                    continue
                for path in sorted(base.rglob("*")):
                    rel = path.relative_to(root)
                    if not path.is_file() or _left_out(rel, extra):
                        continue
                    try:
                        tar.add(path, arcname=str(rel), recursive=False)
                        count += 1
                    except OSError as e:  # a file removed or cut while a run writes: skip it
                        print(f"gpu_pack: skipped {rel}: {e}", file=sys.stderr)
        size = tmp.stat().st_size
        if size <= limit_mib * 2 ** 20:
            break
    os.replace(tmp, out)
    return {"bytes": size, "left_out": list(ALWAYS_OUT + extra), "files": count}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="results folders, relative to --root")
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit-mib", type=float, default=15.0)
    args = ap.parse_args(argv)
    done = pack(args.root, args.folders, args.out, args.limit_mib)
    print(f"gpu_pack: {args.out} {done['bytes'] / 2 ** 20:.2f} MiB, {done['files']} files "
          f"(left out: {', '.join(done['left_out'])})")
    return done


if __name__ == "__main__":
    main()
