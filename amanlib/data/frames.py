"""Frames of a clip: paths, the onset..apex selection AMAN uses, apex estimation and loading as tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torchvision.transforms.functional import gaussian_blur

from ..runtime import progress_bar
from .readers import frame_index

ApexMethod = Literal["diff", "middle"]
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # start-of-image + first marker; end-of-image marker
PNG_START, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"  # signature; IEND chunk type and its CRC
IMAGE_PADDING = b"\x00 \t\r\n"  # what some writers append after the end marker


def _clip_name(row: Mapping) -> str:
    return f"{row['dataset']} clip {row['subject']}/{row['clip']}"


def _frames_dir(row: Mapping) -> Path:
    folder = row["frames_dir"]
    if folder is None or pd.isna(folder):
        raise ValueError(f"{_clip_name(row)} has no frames_dir: read the dataset with frames_root=...")
    return Path(folder)


def _paths_for(row: Mapping, numbers: Sequence[int]) -> list[Path]:
    folder = _frames_dir(row)
    if not folder.is_dir():
        raise FileNotFoundError(f"{_clip_name(row)}: frames folder {folder} does not exist")
    index = frame_index(folder)
    missing = sorted({n for n in numbers if n not in index})
    if missing:
        raise FileNotFoundError(f"{_clip_name(row)}: frame(s) {missing[:5]} missing in {folder}")
    return [index[n] for n in numbers]


def clip_frame_paths(row: Mapping) -> list[Path]:
    """All frame paths of a clip, onset to offset inclusive."""
    return _paths_for(row, range(int(row["onset"]), int(row["offset"]) + 1))


def select_frame_numbers(onset: int, apex: int, n: int) -> np.ndarray:
    """n frame numbers evenly spaced from onset to apex inclusive (rounded; repeats when apex - onset < n - 1)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if apex < onset:
        raise ValueError(f"apex {apex} is before onset {onset}")
    return np.rint(np.linspace(onset, apex, n)).astype(int)


def select_frames(row: Mapping, n: int = 10) -> list[Path]:
    """n frame paths evenly spaced from onset to apex inclusive (AMAN aggregates about 10-11 such frames).
    A clip without apex (SMIC) needs fill_apex first."""
    apex = row["apex"]
    if apex is None or pd.isna(apex):
        raise ValueError(f"{_clip_name(row)} has no apex: fill it with amanlib.data.fill_apex(df) first")
    return _paths_for(row, select_frame_numbers(int(row["onset"]), int(apex), n).tolist())


def _truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker or a PNG without its IEND chunk (trailing padding allowed)."""
    end = data.rstrip(IMAGE_PADDING)
    if data.startswith(JPEG_START):
        return not end.endswith(JPEG_END)
    return data.startswith(PNG_START) and not end.endswith(PNG_END)


def _read_image(path: Path) -> np.ndarray:
    """An image file as BGR uint8 [H, W, 3], decoded by OpenCV; a truncated or undecodable file is an error
    naming it (cv2.imread would decode a truncated JPEG half grey with only a warning)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    if not data:
        raise ValueError(f"{path}: corrupt or truncated image (the file is empty)")
    if _truncated(data):
        raise ValueError(f"{path}: corrupt or truncated image (it does not end with its format's end marker; "
                         f"{len(data)} bytes)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: corrupt or truncated image (OpenCV cannot decode its {len(data)} bytes)")
    return image


def load_clip_frames(paths: Sequence[str | Path], size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Images -> float tensor [N, 3, H, W] in [0, 1], RGB (grey images, e.g. SAMM, repeated to 3 channels);
    `size` (H, W) or an int for square resizes each image (area averaging when shrinking)."""
    if isinstance(size, int):
        size = (size, size)
    images = []
    for path in paths:
        image = _read_image(Path(path))
        if size is not None and image.shape[:2] != tuple(size):
            shrink = size[0] < image.shape[0] and size[1] < image.shape[1]
            image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    if not images:
        raise ValueError("load_clip_frames: no paths given")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"frames differ in size {sorted(shapes)}; pass size=... (first frame {paths[0]})")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)  # N, 3, H, W


def change_from_onset(frames: torch.Tensor, sigma: float = 1.0, top: float = 0.02) -> torch.Tensor:
    """How much each frame [N, C, H, W] differs from the first (the onset), [N]: frames greyed, lightly blurred
    (`sigma` px, against sensor noise) and divided by their mean (against illumination flicker); the mean of the
    largest `top` fraction of absolute pixel differences, because a micro-expression moves a small part of the face."""
    gray = frames.float().mean(dim=1, keepdim=True) if frames.dim() == 4 else frames.float().unsqueeze(1)  # N,1,H,W
    radius = max(1, int(round(3 * sigma)))
    gray = gaussian_blur(gray, kernel_size=2 * radius + 1, sigma=sigma)
    gray = gray / gray.mean(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    diff = (gray - gray[:1]).abs().flatten(1)  # N, H*W
    return diff.topk(max(1, int(diff.shape[1] * top)), dim=1).values.mean(dim=1)


def largest_motion_clip(index: pd.DataFrame, size: int = 128, progress: bool = True) -> int:
    """Row number of the clip whose apex frame differs most from its onset (change_from_onset, frames read shrunk
    to size x size): the clip where a magnifier has the most to show."""
    rows = progress_bar(list(index.itertuples(index=False)), desc="finding the clip with the largest motion",
                        disable=not progress)
    change = [float(change_from_onset(load_clip_frames(_paths_for(row._asdict(), [int(row.onset), int(row.apex)]),
                                                       size=size))[1]) for row in rows]
    return int(np.argmax(change))


def clip_row(index: pd.DataFrame, clip: int | None, truth: pd.DataFrame | None = None) -> pd.Series:
    """The clip table's row number `clip`, or an error naming the parameter and range. None: the clip with the
    largest apex motion, read from `truth` (the synthetic truth, rows as the table's) when given, else measured
    (largest_motion_clip)."""
    if clip is None:
        return index.iloc[int(np.argmax(truth["peak_px"].to_numpy())) if truth is not None
                          else largest_motion_clip(index)]
    if not 0 <= clip < len(index):
        raise ValueError(f"clip {clip} is not a row of the clip table (rows 0-{len(index) - 1}, {len(index)} clips); "
                         "choose one of them, or None for the clip with the largest apex motion")
    return index.iloc[clip]


def estimate_apex(frames: torch.Tensor | Sequence[str | Path], method: ApexMethod = "diff",
                  sigma: float = 1.0, top: float = 0.02) -> int:
    """Index (0 = onset) of the apex frame of a clip given its onset..offset frames.

    'diff': the frame that differs most from the onset frame (change_from_onset). It finds the apex when the
    motion stands out over head drift and noise (default synthetic set: within 2 frames for 80% of clips peaking
    above 1.2 px, 71% at 0.8-1.2 px, 21% below 0.5 px) and a blink can win instead.
    'middle': the middle frame, (N - 1) // 2, the usual fallback for SMIC.
    """
    if method not in ("diff", "middle"):
        raise ValueError(f"method must be 'diff' or 'middle', not {method!r}")
    n = len(frames)
    if n == 0:
        raise ValueError("estimate_apex: no frames given")
    if method == "middle":
        return (n - 1) // 2
    if not isinstance(frames, torch.Tensor):
        frames = load_clip_frames(frames)
    return int(torch.argmax(change_from_onset(frames, sigma, top)))


def fill_apex(df: pd.DataFrame, method: ApexMethod = "diff", size: int = 128, progress: bool = True,
              **options) -> pd.DataFrame:
    """Copy of a clip table with every missing apex estimated from the frames (see estimate_apex, which gets
    `options`); frames are read shrunk to size x size, plenty to find the apex and much faster."""
    out = df.copy()
    todo = out.index[out["apex"].isna()]
    for i in progress_bar(todo, desc="estimating apex", disable=not progress or len(todo) == 0):
        row = out.loc[i]
        if method == "middle":
            index = (int(row["offset"]) - int(row["onset"])) // 2
        else:
            index = estimate_apex(load_clip_frames(clip_frame_paths(row), size=size), method, **options)
        out.at[i, "apex"] = int(row["onset"]) + index
    return out
