"""Reading checkpoint files: one weights-only reader for every state dict the kit loads, and an exact
architecture check, so a wrong or foreign file is refused with an error naming it and what it holds."""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np
import torch

NUMPY_SCALAR_CODES = "?bBhHiIlLqQefdgFDG"  # bool, integer, float and complex scalars (e.g. a saved best_prec1)
KEYS_SHOWN = 3  # how many keys an error lists


def _numpy_scalar_globals() -> list:
    """The globals a pickled numpy scalar needs, under numpy 1 and numpy 2 names alike."""
    scalar = np.float64(0).__reduce__()[0]  # numpy's multiarray.scalar, wherever this numpy keeps it
    names = [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    return [scalar, *names, np.dtype, *{type(np.dtype(code)) for code in NUMPY_SCALAR_CODES}]


def _allowed_globals() -> list:
    """What harmless training checkpoints hold besides tensors and is allowed to unpickle: numpy scalars
    and argparse namespaces (FER+ and the authors' training loops save best_prec1 and args)."""
    return [*_numpy_scalar_globals(), argparse.Namespace]


def _unpickled_global(err: Exception) -> str | None:
    """The name of the global torch's weights-only unpickler refused, read from its message."""
    match = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(err))
    return (match.group(1) or match.group(2)) if match else None


def _first_line(err: Exception) -> str:
    """An exception's type and the first line of its message (torch's run to many paragraphs). torch's advice to
    retry with weights_only=False is not passed on: for a file that is no checkpoint it is wrong, and unsafe."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else ""
    if "weights_only" in line:
        line = "its bytes are not a pickle of tensors"
    return f"{type(err).__name__}: {line}"


def _load(path: Path) -> object:
    """torch.load weights-only with the harmless extras allowed; errors name the file and what it holds."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _unpickled_global(err)
        if name is None:
            raise ValueError(f"{path} is not a PyTorch checkpoint ({_first_line(err)})") from err
        raise ValueError(f"{path}: holds a {name} object, which amanlib does not unpickle (only tensors, numbers, "
                         "numpy scalars and argparse namespaces); re-save the state dict alone with "
                         "torch.save(model.state_dict(), ...)") from err
    except Exception as err:  # torch raises many types for files that are no checkpoint (text, truncated zip)
        raise ValueError(f"{path} is not a PyTorch checkpoint ({_first_line(err)})") from err


def _describe(obj: object) -> str:
    """A short account of what a checkpoint holds instead of a state dict."""
    if isinstance(obj, dict):
        odd = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        return f"a dict with keys {list(obj)[:5]}" + (f", non-tensor entries {odd[:KEYS_SHOWN]}" if odd else "")
    return f"a {type(obj).__name__}"


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (plain, or {'state_dict': ...} beside e.g. epoch, best_prec1, args),
    'module.' prefixes stripped; `what` names the file's role in errors ('FER+ checkpoint', ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    obj = _load(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors or a dict with a 'state_dict' entry of tensors "
                         f"({what}), found {_describe(state)}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _some(keys: list[str]) -> str:
    """The first few keys and how many there are in all, for errors."""
    shown = ", ".join(keys[:KEYS_SHOWN])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > KEYS_SHOWN else "")


def check_architecture(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: str | Path,
                       what: str, may_lack: tuple[str, ...] = ()) -> None:
    """Demand exactly the expected keys with the expected shapes; keys ending in one of `may_lack` (e.g.
    'num_batches_tracked', absent from old files) may be missing. The error names the file, the missing
    and unexpected keys and the first shape that differs."""
    missing = [k for k in expected if k not in state and not k.endswith(may_lack)]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k]]
    problems = ([f"missing keys {_some(missing)}"] if missing else []) + \
               ([f"unexpected keys {_some(unexpected)}"] if unexpected else [])
    if shapes:
        k = shapes[0]
        problems.append(f"shapes differ for {k}: {tuple(state[k].shape)} in the file, {tuple(expected[k])} expected"
                        + (f" (and {len(shapes) - 1} more keys)" if len(shapes) > 1 else ""))
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}: not a {what}")
