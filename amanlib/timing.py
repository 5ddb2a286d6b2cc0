"""Seconds per notebook and per stage of a run, read back from the executed notebooks (papermill times every
cell; a cell's `stage:<name>` tag says what it computes), kept in results_dir/timing.json for README."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .runtime import machine_info

STAGES = ("setup", "data", "magnification demo", "pre-training", "magnification + features", "training",
          "statistics", "figures")
"""What a run spends its time on; 'setup' is kernel start, imports, parameter checks and untagged cells."""
TAG = "stage:"
TIMING_FILE = "timing.json"


def cell_stage(cell: dict) -> str:
    """The stage a notebook cell belongs to: its `stage:<name>` tag, else setup; an unknown name is an error."""
    tags = [t[len(TAG):] for t in cell.get("metadata", {}).get("tags", []) if t.startswith(TAG)]
    if len(tags) > 1 or (tags and tags[0] not in STAGES):
        raise ValueError(f"cell tags {tags}: expected at most one stage, one of {STAGES}")
    return tags[0] if tags else "setup"


def notebook_stages(executed: str | Path, seconds: float) -> dict[str, float]:
    """Seconds per stage of one executed notebook that took `seconds` in all; what no cell accounts for
    (kernel start, writing the notebook) is setup."""
    book = json.loads(Path(executed).read_text(encoding="utf-8"))
    spent = dict.fromkeys(STAGES, 0.0)
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            spent[cell_stage(cell)] += cell.get("metadata", {}).get("papermill", {}).get("duration") or 0.0
    spent["setup"] += max(0.0, seconds - sum(spent.values()))
    return {stage: s for stage, s in spent.items() if s > 0}


def machine(info: dict | None = None) -> str:
    """A machine in a line from runtime.machine_info (default this one on CPU): CPU model, the cores this process
    may use, torch's CPU capability, oneDNN's ISA cap when set, whether bf16 was native, GPU if any."""
    info = info or machine_info("cpu")
    isa = f", ONEDNN_MAX_CPU_ISA={info['onednn_max_cpu_isa']}" if info["onednn_max_cpu_isa"] else ""
    on = "" if info["device"] == "cpu" else f" on {info['device']}"
    bf16 = f"{'native bf16' if info['native_bf16'] else 'no native bf16 (fp32)'}{on}"
    return f"{info['cpu']}, {info['cores']} cores, CPU capability {info['cpu_capability']}{isa}, {bf16}, " \
           f"{info['gpu'] or 'no GPU'}"


def record(results_dir: str | Path, stages: dict[str, dict[str, float]], device: str = "auto") -> dict:
    """Write results_dir/timing.json: the date, the machine the run's `device` parameter ran on (a line for
    README and runtime.machine_info's fields) and seconds per notebook and stage."""
    from .results import save_json
    info = machine_info(device)
    timing = {"date": time.strftime("%Y-%m-%d"), "machine": machine(info), "machine_info": info,
              "notebooks": {name: {s: round(v, 1) for s, v in spent.items()} for name, spent in stages.items()}}
    save_json(timing, Path(results_dir) / TIMING_FILE)
    return timing


def read(results_dir: str | Path) -> dict | None:
    """results_dir/timing.json as record wrote it; None when absent."""
    path = Path(results_dir) / TIMING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def per_stage(stages: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds per stage summed over notebooks, in STAGES order."""
    return {s: sum(spent.get(s, 0.0) for spent in stages.values()) for s in STAGES
            if any(s in spent for spent in stages.values())}


def _seconds(value: float) -> str:
    """Whole seconds, or tenths below 10 s (a stage of 0.2 s is not 0)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def table(stages: dict[str, dict[str, float]]) -> str:
    """Plain-text table for the terminal: seconds per notebook (split by stage), then per stage, and the total."""
    lines = [f"{'notebook':<24} {'seconds':>8}  of which"]
    for name, spent in stages.items():
        split = ", ".join(f"{s} {_seconds(v)}" for s, v in spent.items())
        lines.append(f"{name:<24} {sum(spent.values()):>8.0f}  {split}")
    lines += ["", f"{'stage':<24} {'seconds':>8}"]
    lines += [f"{s:<24} {_seconds(v):>8}" for s, v in per_stage(stages).items()]
    total = sum(sum(spent.values()) for spent in stages.values())
    return "\n".join(lines + [f"{'total':<24} {total:>8.0f}"])


def markdown(timing: dict) -> str:
    """README's timing table from timing.json: seconds per stage and notebook, with the date and machine."""
    stages = timing["notebooks"]
    columns = list(per_stage(stages))
    lines = [f"Seconds of notebook time of the last `make reproduce` run committed to `results/` "
             f"({timing['date']}, {timing['machine']}):", "",
             "| notebook | " + " | ".join(columns) + " | total |", "|---|" + "---:|" * (len(columns) + 1)]
    for name, spent in stages.items():
        cells = [_seconds(spent[c]) if c in spent else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(spent.values()):.0f} |")
    totals = per_stage(stages)
    lines.append("| **total** | " + " | ".join(_seconds(totals[c]) for c in columns)
                 + f" | **{sum(totals.values()):.0f}** |")
    return "\n".join(lines) + "\n"
