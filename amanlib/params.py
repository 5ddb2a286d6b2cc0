"""The notebooks' parameters: one typed entry per name, checked before any work starts.

`validate(values, notebooks)` checks what a run passes (`amanlib run-notebooks`), `check(notebook, globals())`
is what each notebook's first code cell calls so an interactive run in JupyterLab is checked the same way, and
`declared(notebook)` gives a notebook's parameters with their defaults (a test compares it with the notebooks'
parameters cells). Every problem is reported as "name (notebooks): expected ..., got ..." in one ValueError.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import importlib.util
import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, get_args

import torch

from .backbone import BACKBONES
from .data.frames import ApexMethod
from .data.sources import DATASETS, LABEL_PROTOCOLS, source_problems
from .data.synthetic import REGIMES
from .executors import EXECUTORS, setting_problems
from .fidelity import FIDELITIES, PRESETS, preset_name
from .magnify import METHODS as MAGNIFIERS
from .runtime import PRECISIONS, device_available, mps_available, resolve_precision
from .train import EPOCH_SELECTIONS, SINGLE_FACTOR, VARIANT_NAMES, TrainConfig

logger = logging.getLogger(__name__)

NOTEBOOKS = ("01_dataset_prep", "02_magnification", "03_feature_extraction", "04_training", "05_confusion_analysis")
_DATA, _MAG, _FEAT, _TRAIN, _CONF = NOTEBOOKS


class Kind(str, enum.Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STR = "str"
    PATH = "path"
    FLOATS = "list of floats"
    INTS = "list of integers"
    STRS = "list of str"
    CHOICE = "choice"


class PathRole(str, enum.Enum):
    FILE = "file"  # must exist and be a file
    FOLDER = "folder"  # must exist and be a folder
    OUTPUT = "output"  # a folder the notebooks create: may be absent, must not be (under) a file, must be writable


@dataclass(frozen=True)
class Param:
    """One notebook parameter. `rule` is an extra condition on an otherwise well-typed value, described by
    `rule_text`; `expect` replaces the generated description of what is expected."""
    name: str
    kind: Kind
    default: Any
    notebooks: tuple[str, ...]
    help: str
    none_ok: bool = False
    min: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] = ()
    path: PathRole | None = None
    pattern: str | None = None
    expect: str = ""
    rule: Callable[[Any], bool] | None = None
    rule_text: str = ""
    absent_ok_when: str | None = None  # PATH: may be absent when this bool parameter is true (it is created there)

    @property
    def expected(self) -> str:
        """What a valid value is, in words: "an integer >= 1", "None or an existing file", ..."""
        text = self.expect or _describe_kind(self)
        if self.rule_text:
            text += f", {self.rule_text}"
        return f"None or {text}" if self.none_ok else text


def _bound(p: Param) -> str:
    if p.min is None:
        return ""
    return f" {'>' if p.min_exclusive else '>='} {p.min:g}"


def _alternatives(choices: Iterable[str]) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _describe_kind(p: Param) -> str:
    if p.kind is Kind.INT:
        return f"an integer{_bound(p)}"
    if p.kind is Kind.FLOAT:
        return f"a finite number{_bound(p)}"
    if p.kind is Kind.BOOL:
        return f"true, false or {_alternatives(p.choices)}" if p.choices else "true or false"
    if p.kind is Kind.CHOICE:
        return f"one of {_alternatives(p.choices)}"
    if p.kind is Kind.FLOATS:
        return f"a non-empty list of finite numbers{_bound(p)}"
    if p.kind is Kind.INTS:
        return f"a non-empty list of integers{_bound(p)}"
    if p.kind is Kind.STRS:
        return f"a non-empty list, each one of {_alternatives(p.choices)}" if p.choices else "a non-empty list of text"
    if p.kind is Kind.PATH:
        text = {PathRole.FILE: "an existing file", PathRole.FOLDER: "an existing folder",
                PathRole.OUTPUT: "a writable folder (created when absent)"}[p.path]
        if p.absent_ok_when:
            text += f" (or, with {p.absent_ok_when} true, where to download it)"
        return text
    return "text"


def _factors_magnify(factors) -> bool:
    """None, or factors without repeats of which at least 2 magnify (with one, AMAN is that single factor)."""
    return factors is None or (len(set(factors)) == len(factors) and sum(f != 1 for f in factors) >= 2)


def _variant_names(names) -> bool:
    """Names of train.ablation_variants' variants, without repeats (which factors exist is checked by notebook 04)."""
    return len(set(names)) == len(names) and all(n in VARIANT_NAMES or SINGLE_FACTOR.fullmatch(n) for n in names)


def _training(name: str, help: str) -> Param:
    """A notebook-04 parameter that is a TrainConfig field: its default and range are the field's."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    kind = Kind.INT if f.type == "int" else Kind.FLOAT
    return Param(name, kind, f.default, (_TRAIN,), help, min=f.metadata["min"],
                 min_exclusive=f.metadata.get("exclusive", False))


def _optional_path(name: str, role: PathRole, notebooks: tuple[str, ...], help: str, **kw) -> Param:
    """An input path, None by default; when given it must exist (a file or a folder as `role` says)."""
    return Param(name, Kind.PATH, None, notebooks, help, none_ok=True, path=role, **kw)


# Shared names mean the same in every notebook that declares them.
_ALL = NOTEBOOKS
_MAGNET = (_MAG, _FEAT)
_PARAMS = [
    # 01_dataset_prep
    Param("data_seed", Kind.INT, 0, (_DATA,), "seed of the synthetic set: its subjects, faces and clips", min=0),
    Param("dataset", Kind.CHOICE, "synthetic", (_DATA,), "the generated synthetic set or a real one (paths below)",
          choices=DATASETS),
    Param("label_protocol", Kind.CHOICE, "megc2019_3class", (_DATA,),
          "classes: MEGC2019's 3 classes, or CASME II's / SAMM's 5 classes",
          choices=tuple(LABEL_PROTOCOLS)),
    Param("results_dir", Kind.PATH, "../results", _ALL, "output folder: figures, metrics.json, caches",
          path=PathRole.OUTPUT),
    Param("data_dir", Kind.PATH, "../data", (_DATA, _FEAT), "where the synthetic sets are written",
          path=PathRole.OUTPUT),
    Param("synthetic_subjects", Kind.INT, 32, (_DATA,), "subjects in the synthetic set", min=2),
    Param("synthetic_clips_per_subject", Kind.INT, 9, (_DATA,), "clips per subject in the synthetic set", min=1),
    Param("synthetic_regime", Kind.CHOICE, "narrow", (_DATA,),
          "range of motion of the synthetic set: narrow (about 0.3-2 px) or wide (about 0.1-8 px; README: the "
          "synthetic regimes)", choices=REGIMES),
    _optional_path("casme2_coding", PathRole.FILE, (_DATA,),
                   "CASME II coding sheet, e.g. .../CASME2-coding-20140508.xlsx"),
    _optional_path("casme2_frames", PathRole.FOLDER, (_DATA,), "CASME II frames, e.g. .../CASME2/Cropped"),
    _optional_path("samm_codes", PathRole.FILE, (_DATA,),
                   "SAMM codes sheet, e.g. .../SAMM_Micro_FACS_Codes_v2.xlsx"),
    _optional_path("samm_frames", PathRole.FOLDER, (_DATA,),
                   "SAMM frames, e.g. .../SAMM (folders 006/006_1_2/...)"),
    _optional_path("smic_hs", PathRole.FOLDER, (_DATA,), "SMIC-HS release folder, e.g. .../SMIC/HS"),
    _optional_path("gt_csv", PathRole.FILE, (_DATA,),
                   "MEGC2019 combined_3class_gt.csv, to check the composite clip by clip"),
    Param("apex_method", Kind.CHOICE, "diff", (_DATA,),
          "apex estimate for SMIC, which has none: the frame most different from the onset, or the middle",
          choices=get_args(ApexMethod)),
    Param("n_strips", Kind.INT, 4, (_DATA,), "clips shown as onset/apex/offset strips", min=0),
    # 02_magnification
    Param("clip", Kind.INT, None, (_MAG,),
          "row of the clip table; None: the clip with the largest apex motion (the synthetic truth's, else measured)",
          none_ok=True, min=0, expect="an integer >= 0 (a row of the clip table)"),
    Param("methods", Kind.STRS, ["learning", "eulerian", "phase"], (_MAG,), "magnifiers compared",
          choices=MAGNIFIERS),
    Param("sweep_factors", Kind.FLOATS, [1, 2, 4, 6, 8, 10, 12], (_MAG,),
          "magnification factors of the sweep (1: the unmagnified frame)", min=1),
    _optional_path("magnet_checkpoint", PathRole.FILE, _MAGNET,
                   "authors' magnification checkpoint; None: $AMANLIB_MAGNET_CHECKPOINT or "
                   "~/.cache/amanlib/learning_based_mag.pth.tar", absent_ok_when="download_magnet"),
    Param("download_magnet", Kind.BOOL, True, _MAGNET, "fetch (and verify) the authors' checkpoint when it is absent"),
    Param("device", Kind.STR, "auto", (_MAG, _FEAT, _TRAIN), "torch device; auto: CUDA, then MPS, then CPU",
          pattern=r"auto|cpu|mps|cuda(:[0-9]+)?", expect="'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"),
    Param("show_widgets", Kind.BOOL, True, (_MAG,), "interactive widgets in JupyterLab (False in headless runs)"),
    # 03_feature_extraction
    Param("magnifier", Kind.CHOICE, "learning", (_FEAT,), "magnification method of the features",
          choices=MAGNIFIERS),
    Param("factors", Kind.FLOATS, None, (_FEAT,),
          "magnification factors; None: 5 factors over 2-12 (the paper has 9: e.g. [2, 3.25, 4.5, ..., 12])",
          none_ok=True, min=1, rule=_factors_magnify,
          rule_text="no factor twice and at least 2 factors != 1 (factor 1 is the unmagnified frame; with one "
                    "magnified factor AMAN is that single factor)"),
    Param("include_unmagnified", Kind.BOOL, True, (_FEAT,), "add the factor-1 slot, for the no-magnification ablation"),
    Param("n_frames", Kind.INT, 2, (_FEAT,), "frames after the onset up to the apex (about 10-11 on real data)", min=1),
    Param("mag_size", Kind.INT, None, (_FEAT,), "magnify at this square size; None: each clip's own size",
          none_ok=True, min=32),
    Param("backbone", Kind.CHOICE, "auto", (_FEAT,),
          "trunk: auto (FER+ when given, cached or downloadable, else synthetic_macro), fer, synthetic_macro or "
          "random",
          choices=BACKBONES),
    _optional_path("fer_checkpoint", PathRole.FILE, (_FEAT,),
                   "FER+ ResNet-18 of Emotion-FAN (Resnet18_FER+_pytorch.pth.tar)"),
    Param("download_fer", Kind.BOOL, True, (_FEAT,),
          "backbone auto: fetch (and verify) the paper's FER+ file into ~/.cache/amanlib when it is absent"),
    Param("precision", Kind.CHOICE, "auto", (_FEAT, _TRAIN),
          "compute dtype of every stage (03: pre-training, magnifier, trunk; 04: the full model's training, the "
          "frozen-layer4 head always fp32): auto (bf16 where the device has it natively, else fp32), fp32, bf16 "
          "(refused where it would be emulated) or bf16_emulated (bf16 anyway)", choices=PRECISIONS),
    Param("fidelity", Kind.CHOICE, "auto", (_FEAT, _TRAIN),
          "the authors' BatchNorm and layer4 choices (authors), the kit's (kit), or auto: authors on real data, "
          "kit on the synthetic set (README: Fidelity to the authors' code)", choices=FIDELITIES),
    Param("trunk_seed", Kind.INT, 0, (_FEAT,), "seed of the trunk: its synthetic pre-training, or a random trunk's "
          "weights (notebook 04's seeds seed the heads)", min=0),
    Param("pretrain_epochs", Kind.INT, 6, (_FEAT,), "epochs of the kit's synthetic macro-expression pre-training",
          min=1),
    Param("feature_batch_size", Kind.INT, 64, (_FEAT,), "images per batch when computing trunk features", min=1),
    # 04_training
    Param("epoch_selection", Kind.CHOICE, "fixed", (_TRAIN,),
          "which epoch counts: fixed (the last), inner_val, paper (best on the test subject: optimistic)",
          choices=EPOCH_SELECTIONS),
    _training("epochs", "training epochs per fold"),
    _training("batch_size", "clips per training step"),
    _training("lr", "RMSprop learning rate"),
    Param("frozen_layer4", Kind.BOOL, "auto", (_TRAIN,), "true: layer4 pre-trained and frozen (the CPU fast path); "
          "auto: frozen on a CPU, the full model on an accelerator", choices=("auto",)),
    Param("seeds", Kind.INTS, [0, 1, 2, 3, 4], (_TRAIN,), "training seeds: every variant is trained once per seed",
          min=0, rule=lambda v: len(set(v)) == len(v), rule_text="without repeats"),
    Param("variants", Kind.STRS, None, (_TRAIN,),
          "variants to train, by name: AMAN, magnification attention only, frame attention only, no magnification, "
          "single factor F (a factor of the features, e.g. 'single factor 12'); a single factor among them brings the "
          "oracle on the synthetic set; ['AMAN']: AMAN alone; None: all", none_ok=True, rule=_variant_names,
          rule_text="names without repeats, each AMAN, magnification attention only, frame attention only, "
                    "no magnification or single factor F"),
    # 03 and 04: where the work runs
    Param("executor", Kind.CHOICE, "local", (_FEAT, _TRAIN),
          "local: this process; ray: Ray tasks (clips, folds, sweep chunks) on a local instance or ray_address",
          choices=EXECUTORS),
    Param("ray_address", Kind.STR, None, (_FEAT, _TRAIN),
          "None: start a local Ray instance; 'auto': the cluster `ray start` runs here; 'ray://host:port'",
          none_ok=True, pattern=r"auto|(ray://)?[^\s:]+:[0-9]+", expect="'auto', 'ray://host:port' or 'host:port'"),
    Param("cpus_per_task", Kind.FLOAT, 1, (_FEAT, _TRAIN), "CPU cores per Ray task (its torch threads)", min=0,
          min_exclusive=True),
    Param("gpus_per_task", Kind.FLOAT, 0, (_FEAT, _TRAIN), "GPUs per Ray task; fractions share a GPU (0.25: four "
          "folds per GPU)", min=0),
    # 05_confusion_analysis
    _optional_path("other_logs", PathRole.FOLDER, (_CONF,),
                   "folder of other methods' MEGC2019 logs (*.txt) to score"),
]
SCHEMA: dict[str, Param] = {p.name: p for p in _PARAMS}
EXECUTOR_SETTINGS = ("executor", "ray_address", "cpus_per_task", "gpus_per_task")

# Old names: {old: {notebook: new name there}}. An old name no notebook declares any more is an error that
# names its successors; one still declared elsewhere (batch_size in 04, factors in 03) is noted.
RENAMED = {
    "protocol": {_DATA: "label_protocol", _TRAIN: "epoch_selection"},
    "batch_size": {_FEAT: "feature_batch_size"},
    "factors": {_MAG: "sweep_factors"},
    "seed": {_DATA: "data_seed", _FEAT: "trunk_seed"},
    "amp": {_TRAIN: "precision"},
    "ablations": {_TRAIN: "variants"},
}


def _notebook(name: str | os.PathLike) -> str:
    """A schema notebook from its name, file name or path ("04_training", "04_training.ipynb")."""
    stem = Path(name).name.removesuffix(".ipynb")
    if stem not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {str(name)!r}; the notebooks are {', '.join(NOTEBOOKS)}")
    return stem


def declared(notebook: str) -> dict[str, Any]:
    """The parameters `notebook` declares, name -> default (a fresh copy)."""
    nb = _notebook(notebook)
    return {p.name: copy.deepcopy(p.default) for p in _PARAMS if nb in p.notebooks}


_TYPES = {Kind.INT: "int", Kind.FLOAT: "float", Kind.BOOL: "bool", Kind.STR: "str", Kind.PATH: "str",
          Kind.CHOICE: "str", Kind.FLOATS: "list[float]", Kind.INTS: "list[int]", Kind.STRS: "list[str]"}


def annotation(p: Param) -> str:
    """A parameter's type as its notebook cell annotates it (papermill --help-notebook shows it); an optional one
    quoted, so the cell needs no import and papermill still reads it."""
    kind = '"Union[bool, str]"' if p.kind is Kind.BOOL and p.choices else _TYPES[p.kind]
    return f'"Optional[{_TYPES[p.kind]}]"' if p.none_ok else kind


def _literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return f"[{', '.join(_literal(v) for v in value)}]"
    return repr(value)


def parameters_cell(notebook: str) -> str:
    """The source of a notebook's parameters cell, all of it from this schema: per parameter `name: type = default
    # help` (and the choices). `python -m amanlib.params` writes it into the notebooks."""
    nb = _notebook(notebook)
    lines = []
    for p in (p for p in _PARAMS if nb in p.notebooks):
        listed = all(c in p.help for c in p.choices)
        choices = f" ({' | '.join(p.choices)})" if p.choices and not listed else ""
        lines.append(f"{p.name}: {annotation(p)} = {_literal(p.default)}  # {p.help}{choices}")
    return "\n".join(lines)


def write_parameters_cells(folder: str | os.PathLike) -> list[Path]:
    """Rewrite the parameters cell of each schema notebook in `folder` from parameters_cell; -> the files changed."""
    changed = []
    for nb in NOTEBOOKS:
        path = Path(folder) / f"{nb}.ipynb"
        book = json.loads(path.read_text())
        cell = next(c for c in book["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        source = parameters_cell(nb).splitlines(keepends=True)
        if cell["source"] != source:
            cell["source"] = source
            path.write_text(json.dumps(book, indent=1, ensure_ascii=True) + "\n")
            changed.append(path)
    return changed


class _Invalid(Exception):
    """A value that is not what the parameter expects; `detail` adds why (", which does not exist")."""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v, p: Param):
    """A finite real within p's bound, as a plain int or float; _Invalid otherwise (bools are not numbers)."""
    if _is_int(v):
        v = int(v)  # exact, however large; where a float is expected it must fit in one
        if p.kind is not Kind.INT:
            try:
                float(v)
            except OverflowError:
                raise _Invalid from None
    elif isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
        v = float(v)
    else:
        raise _Invalid
    if p.min is not None and (v <= p.min if p.min_exclusive else v < p.min):
        raise _Invalid
    return v


def _not_creatable(path: Path) -> str:
    """Why `path` (absent) cannot be created, or "" when its first existing ancestor is a writable folder."""
    existing = next(a for a in path.parents if a.exists())
    if not existing.is_dir():
        return f"but {str(existing)!r} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"but {str(existing)!r} is not writable"
    return ""


def _path(v, p: Param, flags: Mapping[str, Any]) -> str:
    """The path made absolute (relative to the current folder, `~` expanded), checked against p.path."""
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise _Invalid
    path = Path(os.path.abspath(Path(os.fspath(v)).expanduser()))
    got = f"got {str(path)!r}"
    if not path.exists():
        if p.path is PathRole.OUTPUT or (p.absent_ok_when and flags.get(p.absent_ok_when) is True):
            why = _not_creatable(path)
            if why:
                raise _Invalid(f"{got}, {why}")
            return str(path)
        raise _Invalid(f"{got}, which does not exist")
    if p.path in (PathRole.FOLDER, PathRole.OUTPUT) and not path.is_dir():
        raise _Invalid(f"{got}, which is a file")
    if p.path is PathRole.FILE and path.is_dir():
        raise _Invalid(f"{got}, which is a folder")
    if p.path is PathRole.OUTPUT and not os.access(path, os.W_OK | os.X_OK):
        raise _Invalid(f"{got}, which is not writable")
    return str(path)


def _convert(p: Param, v, flags: Mapping[str, Any]):
    """v checked against p and normalised (plain ints/floats, lists, absolute paths); _Invalid otherwise."""
    if v is None:
        if p.none_ok:
            return None
        raise _Invalid
    if p.kind is Kind.INT:
        if not _is_int(v):
            raise _Invalid
        out = _number(v, p)
    elif p.kind is Kind.FLOAT:
        out = _number(v, p)
    elif p.kind is Kind.BOOL:
        if not isinstance(v, bool) and not (isinstance(v, str) and v in p.choices):
            raise _Invalid
        out = v
    elif p.kind in (Kind.STR, Kind.CHOICE):
        if not isinstance(v, str) or (p.choices and v not in p.choices) \
                or (p.pattern and not re.fullmatch(p.pattern, v)):
            raise _Invalid
        out = v
    elif p.kind in (Kind.FLOATS, Kind.INTS, Kind.STRS):
        if not isinstance(v, (list, tuple)) or not v:
            raise _Invalid
        item_kind = {Kind.FLOATS: Kind.FLOAT, Kind.INTS: Kind.INT}.get(p.kind, Kind.CHOICE if p.choices else Kind.STR)
        item = Param(p.name, item_kind,
                     None, p.notebooks, p.help, min=p.min, min_exclusive=p.min_exclusive, choices=p.choices)
        out = [_convert(item, x, flags) for x in v]
    elif p.kind is Kind.PATH:
        return _path(v, p, flags)
    else:  # pragma: no cover - every Kind is handled above
        raise AssertionError(p.kind)
    if p.rule and not p.rule(out):
        raise _Invalid
    return out


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _where(readers: list[str], selected: list[str]) -> str:
    """The notebooks reading a parameter, "all notebooks" when that is every one of three or more."""
    return "all notebooks" if len(readers) >= 3 and readers == selected else ", ".join(readers)


def _problem(p: Param, value, where: str, detail: str = "") -> str:
    return f"{p.name} ({where}): expected {p.expected}, {detail or f'got {_shown(value)}'}"


def _unknown(name, value, candidates: Iterable[str]) -> str:
    head = f"{name}: unknown parameter (got {_shown(value)})"
    if name in RENAMED:
        targets = RENAMED[name]
        renamed = ", ".join(f"{new} in {nb}" for nb, new in targets.items())
        fits = [new for new in targets.values() if _accepts(SCHEMA[new], value)]
        hint = f" ({_shown(value)} is a value of {fits[0]})" if len(targets) > 1 and len(fits) == 1 else ""
        return f"{head}; it was renamed: {renamed}{hint}"
    close = difflib.get_close_matches(str(name), sorted(set(candidates)), n=3, cutoff=0.55)
    if close:
        where = [f"{c} ({', '.join(SCHEMA[c].notebooks)})" if c in SCHEMA else c for c in close]
        return f"{head}; did you mean {' or '.join(where)}?"
    return f"{head}; no notebook declares it (their parameters are listed in amanlib/params.py)"


def _accepts(p: Param, value) -> bool:
    try:
        _convert(p, value, {})
    except _Invalid:
        return False
    return True


def _cross_checks(effective: Mapping[str, Any], readers: Mapping[str, list[str]], selected: list[str]) -> list[str]:
    """Rules between parameters, on the values a run will use (given, else default). `effective` holds only
    parameters read by the run that passed their own checks."""
    problems = []

    def where(name):
        return _where(readers[name], selected)

    dataset = effective.get("dataset")
    if dataset in DATASETS:
        for name, text in source_problems(dataset, effective.get("label_protocol", "megc2019_3class"), effective):
            problems.append(f"{name} ({where(name)}): {text}")
    if effective.get("backbone") == "fer" and "fer_checkpoint" in effective and effective["fer_checkpoint"] is None:
        problems.append(f"backbone ({where('backbone')}): 'fer' needs fer_checkpoint (the FER+ ResNet-18 file), "
                        "which is not given")
    given = {name: effective[name] for name in EXECUTOR_SETTINGS if name in effective}
    for name, text in setting_problems(**given):  # a value that failed its own check is absent: not judged twice
        problems.append(f"{name} ({where(name)}): {text}")
    if effective.get("executor") == "ray" and importlib.util.find_spec("ray") is None:
        problems.append(f"executor ({where('executor')}): 'ray' needs the ray package: pip install -e '.[ray]'")
    device = effective.get("device")
    if isinstance(device, str) and device != "auto" and not device_available(device):
        problems.append(f"device ({where('device')}): {device!r} is not on this machine (CUDA devices: "
                        f"{torch.cuda.device_count()}, MPS: {mps_available()}); use 'auto' or 'cpu'")
    if effective.get("precision") == "bf16":  # refused before any work where the device would emulate it
        try:
            resolve_precision("bf16", effective.get("device", "auto"))
        except ValueError as e:
            problems.append(f"precision ({where('precision')}): {e}")
    fidelity = effective.get("fidelity")
    if effective.get("backbone") == "random" and fidelity in FIDELITIES \
            and PRESETS[preset_name(fidelity, dataset == "synthetic")].layer4_init == "backbone":
        problems.append(f"fidelity ({where('fidelity')}): {fidelity!r} is the kit's preset here, which starts layer4 "
                        "from the trunk's checkpoint, but backbone 'random' has none; pass fidelity 'authors' (random "
                        "layer4) or another backbone")
    return problems


def _validate(values: Mapping, notebooks: Iterable[str], custom: Mapping[str, Iterable[str]],
              log: Callable[[str], Any]) -> dict:
    custom = {nb: set(names) for nb, names in custom.items()}
    selected = [nb if nb in custom else _notebook(nb) for nb in notebooks]
    reads = {nb: set(custom[nb]) if nb in custom else set(declared(nb)) for nb in selected}
    readers = {name: [nb for nb in selected if name in reads[nb]] for name in set(SCHEMA).union(*reads.values())}
    flags = {name: values.get(name, SCHEMA[name].default) for name in SCHEMA if SCHEMA[name].kind is Kind.BOOL}
    out, problems, notes, bad = {}, [], [], set()
    for name, value in values.items():
        if name not in readers:
            problems.append(_unknown(name, value, readers))
            continue
        renamed_here = {nb: new for nb, new in RENAMED.get(name, {}).items() if nb in selected}
        also = "".join(f"; in {nb} it is now {new}" for nb, new in renamed_here.items())
        if not readers[name]:
            notes.append(f"note: {name} is read only by {', '.join(SCHEMA[name].notebooks)}, which this run does "
                         f"not include: dropped{also}")
            continue
        if also:
            notes.append(f"note: {name} goes to {', '.join(readers[name])} only{also}")
        if name not in SCHEMA:  # a parameter of a notebook outside the schema (a notebooks folder of one's own)
            out[name] = value
            continue
        try:
            out[name] = _convert(SCHEMA[name], value, flags)
        except _Invalid as e:
            problems.append(_problem(SCHEMA[name], value, _where(readers[name], selected), e.detail))
            bad.add(name)
    effective = {name: out.get(name, SCHEMA[name].default) for name in SCHEMA
                 if readers[name] and name not in bad}
    problems += _cross_checks(effective, readers, selected)
    for note in notes:
        log(note)
    if problems:
        raise ValueError("; ".join(problems))
    return out


def validate(values: Mapping[str, Any], notebooks: Iterable[str], *, custom: Mapping[str, Iterable[str]] | None = None,
             log: Callable[[str], Any] | None = None) -> dict:
    """The parameters of a run over `notebooks`, checked; returns the values to pass (paths made absolute,
    relative to the current folder; numbers as plain int/float).

    Raises one ValueError listing every problem ("; "-separated), each naming the parameter, the notebooks
    that read it, what is expected and the value given. A name no notebook declares is an error (with the
    close names, or the new names of a renamed one); a name only notebooks outside `notebooks` read is dropped
    with a note sent to `log` (default: this module's logger, at warning level). `custom` maps the names of
    notebooks outside the schema (a notebooks folder of one's own) to the parameters their cells declare:
    names the schema knows are checked by it, the others are passed as given.
    """
    return _validate(values, notebooks, custom or {}, log or logger.warning)


def check(notebook: str, values: Mapping[str, Any]) -> None:
    """For a notebook's first code cell: `params.check("04_training", globals())` checks the parameters that
    notebook declares (relative paths against the notebook's folder) and raises the same ValueError as
    `validate`; then it claims the results folder for this kernel's cells (notebooks.claim_results_folder), so a
    notebook run in JupyterLab or by papermill and a run-notebooks run never write one folder at once."""
    nb = _notebook(notebook)
    names = declared(nb)
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"{nb}: {', '.join(missing)} not set; its parameters cell must define "
                         f"{'it' if len(missing) == 1 else 'them'}")
    _validate({name: values[name] for name in names}, [nb], {}, logger.warning)
    if "results_dir" in names:
        from .notebooks import claim_results_folder  # notebooks imports this module
        claim_results_folder(values["results_dir"])


if __name__ == "__main__":
    for written in write_parameters_cells(Path(__file__).resolve().parents[1] / "notebooks"):
        print(f"wrote {written}")
