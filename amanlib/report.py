"""How results are shown: the tables and sentences notebooks 04 and 05 display, and README's blocks (`amanlib readme`),
each rendered from a results folder's metrics.json (results.py says where things are and writes them)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .oracle import is_control
from .results import OPTIMISTIC, LOSOResult, aman_runs, read_metrics
from .runtime import atomic_write


def comparisons_text(comparisons, n_subjects: int | None = None) -> str:
    """In words, per metric: which variants AMAN beats and which beat it (95% CI excluding zero), and how many the
    data cannot tell apart from it. `comparisons`: metrics.json's list or its DataFrame. With fewer than
    stats.MIN_SUBJECTS subjects it says so instead, and concludes nothing."""
    from .stats import too_few_subjects
    warning = too_few_subjects(n_subjects)
    if warning:
        return warning + "."
    def said(rows) -> str:
        return "; ".join(f"{r.b} ({r.diff:+.3f}, CI {r.ci[0]:+.3f} to {r.ci[1]:+.3f}, p {r.p_value:.3g})" for r in rows)

    lines = []
    table = pd.DataFrame(comparisons)
    controls = table[table["b"].map(is_control)]  # the oracle reads the truth: stated apart, never beaten or lost to
    for metric, part in table.drop(controls.index).groupby("metric", sort=False):
        above = [r for r in part.itertuples() if r.ci[0] > 0]
        below = [r for r in part.itertuples() if r.ci[1] < 0]
        a, unclear = part["a"].iloc[0], len(part) - len(above) - len(below)
        lines.append(f"**{metric.upper()}**: {a} scores higher than " + (said(above) if above else "no variant")
                     + " and lower than " + (said(below) if below else "no variant")
                     + f", each with a 95% CI excluding zero; for the other {unclear} variants the data cannot tell "
                     "the difference from zero.")
    for metric, part in controls.groupby("metric", sort=False):
        lines.append(f"**{metric.upper()}, against the positive control** (each clip's factor chosen from the "
                     f"synthetic truth, not a method): {part['a'].iloc[0]} minus " + said(part.itertuples()) + ".")
    return "\n\n".join(lines)


def _score(scores: dict, metric: str = "uf1") -> str:
    """A mean with its 95% CI, as metrics.json's ablations hold them: 0.512 [0.470, 0.553]."""
    return f"{scores[metric]:.3f} [{scores[metric + '_ci'][0]:.3f}, {scores[metric + '_ci'][1]:.3f}]"


def variant_table(metrics: dict) -> pd.DataFrame:
    """Per variant: mean UF1/UAR with 95% CIs, and the difference to AMAN with its CI and p-value; the oracle is
    named a positive control."""
    diffs = {(c["b"], c["metric"]): c for c in metrics["comparisons"]}
    rows = []
    for variant, a in metrics["ablations"].items():
        row = {"variant": f"{variant}: positive control" if is_control(variant) else variant}
        for m in ("uf1", "uar"):
            row[m.upper()] = _score(a, m)
            c = diffs.get((variant, m))
            row[f"AMAN - variant, {m.upper()}"] = f"{_diff(c)}, p {c['p_value']:.3g}" if c else ""
        rows.append(row)
    return pd.DataFrame(rows)


def by_motion_frame(metrics: dict) -> pd.DataFrame | None:
    """metrics.json's `by_motion` as a long table (variant, bin, px_lo, px_hi, n_clips, accuracy, accuracy_ci_lo,
    accuracy_ci_hi, best_single_factor), as stats.accuracy_by_motion returned it; None on real data."""
    record = metrics.get("by_motion")
    if not record:
        return None
    best = record["best_single_factor_by_bin"]
    return pd.DataFrame([{"variant": v, "bin": b, "px_lo": record["bins"][b]["px"][0],
                          "px_hi": record["bins"][b]["px"][1], "n_clips": e["n_clips"], "accuracy": e["accuracy"],
                          "accuracy_ci_lo": e["ci"][0], "accuracy_ci_hi": e["ci"][1],
                          "best_single_factor": best.get(b) == v}
                         for v, per_bin in record["variants"].items() for b, e in per_bin.items()])


def by_motion_table(metrics: dict) -> pd.DataFrame | None:
    """Accuracy by true motion for display: a row per variant (the oracle named a positive control), a column per
    bin (its px range and clips), cells 'mean [95% CI]', the best single factor of each bin starred."""
    frame = by_motion_frame(metrics)
    if frame is None:
        return None
    column = {b: f"{b} motion ({e['px'][0]:.2f}-{e['px'][1]:.2f} px, {e['n_clips']} clips)"
              for b, e in metrics["by_motion"]["bins"].items()}
    cells = frame.assign(
        variant=frame["variant"].map(lambda v: f"{v}: positive control" if is_control(v) else v),
        column=frame["bin"].map(column),
        cell=[f"{r.accuracy:.3f} [{r.accuracy_ci_lo:.3f}, {r.accuracy_ci_hi:.3f}]" + (" *" if r.best_single_factor
                                                                                   else "")
              for r in frame.itertuples()])
    return cells.pivot(index="variant", columns="column", values="cell").reindex(
        index=list(dict.fromkeys(cells["variant"])), columns=list(column.values()))


def oracle_text(oracle: dict | None) -> str:
    """The positive control in words: the oracle's target and choices, and the oracle minus the best single factor."""
    if not oracle:
        return "No oracle: it needs the synthetic truth and the single-factor variants."
    diffs = "; ".join(f"{c['metric'].upper()} {c['diff']:+.3f} (95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}, "
                      f"p {c['p_value']:.3g})" for c in oracle["minus_best_single_factor"])
    chosen = ", ".join(f"x{f}: {n}" for f, n in oracle["chosen_factors"].items())
    lines = [f"**Positive control, not a method**: `{oracle['variant']}` gives each clip the magnified factor whose "
             f"factor x true peak displacement is nearest {oracle['target_px']:g} px (fixed in advance; clips per "
             f"factor: {chosen}). Oracle minus the best single factor ({oracle['best_single_factor']}, chosen on the "
             f"same test data, which is conservative for the oracle): {diffs}."]
    for e in oracle.get("sensitivity", []):
        c = next(c for c in e["minus_best_single_factor"] if c["metric"] == "uf1")
        lines.append(f"Sensitivity, target {e['target_px']:g} px: UF1 minus {oracle['best_single_factor']} "
                     f"{c['diff']:+.3f} (95% CI {c['ci'][0]:+.3f} to {c['ci'][1]:+.3f}).")
    return "\n\n".join(lines)


def readme_table(metrics: dict) -> str:
    """README's results block, rendered from metrics.json: the run in one line, the table of variants, the
    half-width of the key comparison, the mechanism check and the method."""
    table = variant_table(metrics)
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    rows = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in table.itertuples(index=False))
    regime = f", {metrics['synthetic_regime']} regime" if metrics.get("synthetic_regime") else ""
    run = (f"{metrics['model']} on {metrics['dataset']}{regime} ({metrics['clips']} clips, "
           f"{metrics['subjects']} subjects, "
           f"label protocol {metrics['label_protocol']}), epoch selection {metrics['epoch_selection']}"
           f"{' (' + OPTIMISTIC + ')' if metrics['optimistic'] else ''}, backbone "
           f"{metrics['backbone']}, magnifier {metrics['magnifier']} at factors {metrics['factors']}, "
           f"{metrics['n_frames']} frames, training seeds {metrics['seeds']}.")
    from .stats import mechanism_text, too_few_subjects
    warning = too_few_subjects(metrics["subjects"])
    notes = [run] + ([warning + "."] if warning else []) + [(head + rows).rstrip("\n")]
    key = [c for c in metrics["comparisons"] if c["b"] == "no magnification" and c["metric"] == "uf1"]
    if key:
        half = (key[0]["ci"][1] - key[0]["ci"][0]) / 2
        notes.append(f"AMAN minus no magnification, UF1: {key[0]['diff']:+.3f}, 95% CI half-width {half:.3f}.")
    if metrics["comparisons"]:
        notes.append(comparisons_text(metrics["comparisons"], metrics["subjects"]))
    if metrics.get("mechanism"):
        notes.append(f"Mechanism check: {mechanism_text(metrics['mechanism'], metrics['subjects'])}")
    notes.append(metrics["method"])
    return "\n\n".join(notes) + "\n"


def _diff(c: dict) -> str:
    return f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"


def regime_verdict(metrics: dict) -> str:
    """One regime's answer to AMAN's claim in a paragraph, UF1 differences with 95% CIs: AMAN against the best single
    factor, no magnification and the oracle; the oracle against the best single factor (can adapting pay at all?);
    the best single factor per tertile of true motion; the mechanism check."""
    uf1 = {c["b"]: c for c in metrics["comparisons"] if c["metric"] == "uf1"}
    from .stats import single_factors
    best = max(single_factors(metrics["ablations"]), key=lambda v: metrics["ablations"][v]["uf1"])
    said = [f"AMAN minus the best single factor ({best}) {_diff(uf1[best])}"]
    if "no magnification" in uf1:
        said.append(f"minus no magnification {_diff(uf1['no magnification'])}")
    oracle = metrics.get("oracle")
    if oracle:
        said.append(f"minus the oracle {_diff(uf1[oracle['variant']])}")
        control = next(c for c in oracle["minus_best_single_factor"] if c["metric"] == "uf1")
        said.append(f"oracle (target {oracle['target_px']:g} px) minus {oracle['best_single_factor']} {_diff(control)}")
    by_motion = metrics.get("by_motion")
    if by_motion:
        said.append("best single factor by tertile of true motion: " + ", ".join(
            f"{b} ({by_motion['bins'][b]['px'][0]:.2f}-{by_motion['bins'][b]['px'][1]:.2f} px) "
            f"{v.replace('single factor ', 'x')}" for b, v in by_motion["best_single_factor_by_bin"].items()))
    if metrics.get("mechanism"):
        m = metrics["mechanism"]
        said.append(f"mechanism rho undefined ({m['undefined']})" if m.get("undefined") else
                    f"mechanism rho {m['spearman_r']:+.2f} [{m['ci'][0]:+.2f}, {m['ci'][1]:+.2f}]")
    regime = metrics.get("synthetic_regime") or metrics["dataset"]
    if metrics.get("magnifier", "learning") != "learning":
        regime += f", {metrics['magnifier']} magnification"
    return f"**{regime}** ({metrics['clips']} clips, {metrics['subjects']} subjects; UF1): " + "; ".join(said) + "."


def folder_comparison(results_dir, other_dir, variant: str = "AMAN", label=lambda m: m["magnifier"],
                      n_resamples: int = 2000, n_permutations: int = 10000) -> dict:
    """`variant` of the results folder `other_dir` minus the same variant of `results_dir`, trained on the same clips
    with the same seeds: UF1 and UAR with the paired subject-and-seed bootstrap CI and sign-flip p of
    stats.paired_comparisons. label(metrics) names each side (default: its magnifier)."""
    from .stats import paired_comparisons
    tagged, names = [], []
    for folder in (other_dir, results_dir):
        metrics = read_metrics(folder)
        names.append(f"{variant} ({label(metrics)})")
        runs = aman_runs(folder, metrics) if variant == "AMAN" else \
            [LOSOResult.load(Path(folder) / p) for p in metrics["runs"][variant]]
        tagged += [r.predictions.assign(variant=names[-1], seed=r.config["seed"]) for r in runs]
    runs = pd.concat(tagged, ignore_index=True)
    clips = {v: set(map(tuple, g[["seed", "dataset", "subject", "clip"]].astype(str).to_numpy()))
             for v, g in runs.groupby("variant")}
    if len(names) != len(set(names)) or clips[names[0]] != clips[names[1]]:
        raise ValueError(f"{other_dir} and {results_dir} must hold {variant} runs of two kinds on the same clips and "
                         f"seeds (found {names})")
    return {"variant": names[0], "baseline": names[1],
            "comparisons": paired_comparisons(runs, names[0], ("uf1", "uar"), n_resamples, n_permutations)}


def magnifiers_markdown(results_dir) -> str | None:
    """README's magnifiers block: every magnifier against the synthetic truth (results/bench/magnify_truth.csv) and,
    when results/lagrangian holds a run (make reproduce-lagrangian), AMAN with Lagrangian against learning-based
    magnification; None when neither exists."""
    from .magnify.truth_scores import markdown
    results_dir = Path(results_dir)
    bench, other = results_dir / "bench" / "magnify_truth.csv", results_dir / "lagrangian"
    parts = [markdown(bench)] if bench.is_file() else []
    if (other / "metrics.json").is_file():
        parts.append(magnifier_text(folder_comparison(results_dir, other)) + "\n")
    return "\n".join(parts) if parts else None


def magnifier_text(comparison: dict) -> str:
    """README's line for a folder_comparison of two magnifiers."""
    said = "; ".join(f"{c['metric'].upper()} {_diff(c)} (p {c['p_value']:.2g})" for c in comparison["comparisons"])
    return f"**{comparison['variant']} minus {comparison['baseline']}** (95% CI, subjects and seeds resampled): {said}."


GPU_FOLDER = "gpu"
"""The results folder bench/gpu.sh writes on a GPU (the full model), beside the frozen-layer4 default."""


def gpu_markdown(results_dir, n_resamples: int = 2000, n_permutations: int = 10000) -> str | None:
    """README's GPU block when results/gpu holds bench/gpu.sh's run: where and how long its notebooks ran, and per
    variant both folders trained on the same clips and seeds, the full model beside the frozen-layer4 default (UF1,
    95% CI) and their difference (folder_comparison: paired subject-and-seed CI, sign-flip p); None without it."""
    from .timing import per_stage, read
    results_dir = Path(results_dir)
    gpu = results_dir / GPU_FOLDER
    if not (gpu / "metrics.json").is_file():
        return None
    full, frozen, timing = read_metrics(gpu), read_metrics(results_dir), read(gpu)
    spent = f", {sum(per_stage(timing['notebooks']).values()):.0f} s of notebooks" if timing else ""
    where = f" on {timing['machine']} ({timing['date']}{spent})" if timing else ""
    lines = [f"`bench/gpu.sh`'s run in `results/{GPU_FOLDER}`{where}: **{full['model']}** beside the default's "
             f"**{frozen['model']}** on the same clips and seeds (UF1, 95% CI; the difference with the paired "
             "subject-and-seed CI and sign-flip p):", "",
             "| variant | full model | frozen layer4 | full minus frozen (p) |", "|---|---|---|---|"]
    label = lambda m: "full model" if m["model"] == full["model"] else "frozen layer4"  # noqa: E731
    for variant in full["ablations"]:
        if variant in frozen["ablations"]:
            c = next(c for c in folder_comparison(results_dir, gpu, variant, label, n_resamples,
                                                  n_permutations)["comparisons"] if c["metric"] == "uf1")
            lines.append(f"| {variant} | {_score(full['ablations'][variant])} | "
                         f"{_score(frozen['ablations'][variant])} | {_diff(c)} ({c['p_value']:.2g}) |")
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- results table: rendered from results/metrics.json -->", "<!-- end of results table -->"
TIMING_START, TIMING_END = "<!-- timing: rendered from results/timing.json -->", "<!-- end of timing -->"
REGIME_FOLDERS = ("wide", "phase")
"""The results folders beside the default whose verdicts README states after the default's (make reproduce-wide,
make reproduce-phase), each when it holds a run."""
REGIMES_START = ("<!-- regimes: rendered from results/metrics.json, results/wide/metrics.json and "
                 "results/phase/metrics.json -->")


REGIMES_END = "<!-- end of regimes -->"


MAGNIFIERS_START = ("<!-- magnifiers: rendered from results/bench/magnify_truth.csv, results/metrics.json and "
                    "results/lagrangian/metrics.json -->")


MAGNIFIERS_END = "<!-- end of magnifiers -->"


GPU_START = ("<!-- gpu: rendered from results/gpu/metrics.json, results/gpu/timing.json and results/metrics.json "
             "-->")


GPU_END = "<!-- end of gpu -->"


DIFFERENCES_START = "<!-- differences from the authors' code: rendered from amanlib/fidelity.py -->"


DIFFERENCES_END = "<!-- end of differences -->"


def render_readme(readme: str | Path, metrics: dict, timing: dict | None = None, others: list[dict] = (),
                  magnifiers: str | None = None, gpu: str | None = None) -> bool:
    """Replace README's results table, its timing table (when `timing`, a results/timing.json, is given), its
    verdict per synthetic regime (metrics and `others`, e.g. those of REGIME_FOLDERS), its magnifiers and GPU blocks
    (when `magnifiers` or `gpu`, their markdown, is given) and its table of differences from the authors' code (each
    between its markers) by the ones rendered from metrics, timing and amanlib.fidelity; True if README changed."""
    from . import timing as timings
    from .fidelity import differences_markdown
    readme = Path(readme)
    text = new = readme.read_text()
    blocks = [(README_START, README_END, readme_table(metrics)),
              (DIFFERENCES_START, DIFFERENCES_END, differences_markdown()),
              (REGIMES_START, REGIMES_END, "".join(regime_verdict(m) + "\n\n" for m in (metrics, *others)).rstrip()
               + "\n")]
    if timing is not None:
        blocks.append((TIMING_START, TIMING_END, timings.markdown(timing)))
    if magnifiers is not None:
        blocks.append((MAGNIFIERS_START, MAGNIFIERS_END, magnifiers))
    if gpu is not None:
        blocks.append((GPU_START, GPU_END, gpu))
    for start, end, block in blocks:
        if start not in new or end not in new:
            raise ValueError(f"{readme} lacks the markers {start!r} and {end!r}")
        head, rest = new.split(start, 1)
        new = head + start + "\n" + block + end + rest.split(end, 1)[1]
    if new != text:
        atomic_write(readme, lambda tmp: tmp.write_text(new))
    return new != text
