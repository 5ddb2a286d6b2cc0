"""The oracle, a positive control on synthetic data and never a method: each clip gets the one magnified factor
slot whose magnified displacement (factor x the clip's true peak displacement) is nearest a target fixed in
advance. It reads the synthetic truth only, never labels; sweep.run_oracle trains it as a one-slot variant on the
same folds, seeds and settings as the single factors, so "oracle minus best single factor" asks whether choosing
the factor per clip can pay on these data at all.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

ORACLE_TARGET_PX = 6.0
"""The magnified peak displacement, in px at the clip's own resolution, that the oracle aims at: each clip gets the
factor whose factor x peak_px is nearest it. Fixed before any run (never tuned on results); other targets are a
sensitivity analysis, reported as such."""

ORACLE_VARIANT = "oracle factor (truth)"  # the variant name of the oracle at ORACLE_TARGET_PX
CONTROL_NOTE = "positive control: factor chosen from the synthetic truth, not a method"
TIE_TOL = 1e-9  # distances this close (relative to the target) count as a tie, which the smaller factor wins


def oracle_name(target_px: float, primary: float = ORACLE_TARGET_PX) -> str:
    """The variant name of the oracle at target_px: ORACLE_VARIANT at the fixed target, else with the target."""
    return ORACLE_VARIANT if float(target_px) == float(primary) else f"{ORACLE_VARIANT[:-1]}, T = {target_px:g} px)"


def is_control(variant: str) -> bool:
    """Whether a variant is an oracle (a positive control reading the truth), not a method."""
    return str(variant).startswith(ORACLE_VARIANT[:-1])


def oracle_slots(peak_px, factors, target_px=ORACLE_TARGET_PX) -> np.ndarray:
    """Per clip, the index into `factors` of the magnified slot (factor > 1; factor 1 is the unmagnified frame)
    whose factor x peak_px is nearest target_px; ties go to the smaller factor. peak_px [N] (the true peak
    displacement in px at each clip's resolution) -> int [N]; a list of targets -> int [T, N]."""
    peak = np.asarray(peak_px, dtype=float).ravel()
    factors = np.asarray(factors, dtype=float).ravel()
    targets = np.asarray(target_px, dtype=float)
    if not np.isfinite(peak).all() or (peak < 0).any():
        raise ValueError("oracle_slots: peak_px must be finite and >= 0")
    if targets.ndim > 1 or not np.isfinite(targets).all() or (targets <= 0).any():
        raise ValueError(f"oracle_slots: target_px must be a number > 0 or a list of them, got {target_px!r}")
    magnified = np.flatnonzero(factors > 1)
    if not len(magnified):
        raise ValueError(f"oracle_slots: factors {factors.tolist()} hold no magnified factor (> 1)")
    magnified = magnified[np.argsort(factors[magnified], kind="stable")]  # smaller factors first: they win ties
    t = np.atleast_1d(targets)[:, None, None]  # T, 1, 1
    distance = np.abs(factors[magnified][None, None] * peak[None, :, None] - t)  # T, N, K'
    nearest = distance <= distance.min(2, keepdims=True) + TIE_TOL * t
    slots = magnified[nearest.argmax(2)]  # the first, i.e. the smallest, nearest factor
    return slots if targets.ndim else slots[0]


def oracle_choice(truth: pd.DataFrame, factors, target_px=ORACLE_TARGET_PX) -> pd.DataFrame:
    """The oracle's choice per clip of a truth table (subject, clip, peak_px; e.g. data.truth_for(index)), in its
    row order: subject, clip, peak_px, target_px, slot (into factors) and factor. A list of targets stacks
    one block of rows per target."""
    if truth is None or "peak_px" not in truth:
        raise ValueError("oracle_choice: needs the synthetic truth (a table with subject, clip and peak_px)")
    targets = np.atleast_1d(np.asarray(target_px, dtype=float))
    slots = oracle_slots(truth["peak_px"], factors, targets)
    factors = np.asarray(factors, dtype=float).ravel()
    base = truth[["subject", "clip", "peak_px"]].astype({"subject": str, "clip": str}).reset_index(drop=True)
    return pd.concat([base.assign(target_px=t, slot=s, factor=factors[s]) for t, s in zip(targets, slots)],
                     ignore_index=True)
