"""Face cropping for SAMM and raw releases: detect on the onset, one square box for the whole clip, cached.

Detector: OpenCV's frontal-face Haar cascade. It ships inside opencv-python-headless 4.x (already a
dependency; pinned <5 because the 5.0 wheels dropped the cascades), so nothing is downloaded at run time;
it is deterministic and takes milliseconds on a CPU, and only one frame per clip is examined. The
micro-expression sets are frontal faces under controlled light, the case it handles well. dlib with its
landmark models would allow alignment, but it is a heavy compiled dependency with ~100 MB of models, and
AMAN works on cropped, unaligned frames (as in the CASME II Cropped release), so alignment is not needed.
Keeping one box per clip matters: re-detecting per frame would make the box jitter by more than the
micro-expression moves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd

from ..runtime import progress_bar
from .frames import clip_frame_paths

Box = tuple[int, int, int, int]  # x, y, width, height
Detector = Callable[[np.ndarray], "Box | None"]
CACHE_NAME = "crop.json"


class FaceNotFoundError(RuntimeError):
    """The detector found no face in a clip's onset frame."""


class HaarFaceDetector:
    """Largest frontal face found by OpenCV's bundled Haar cascade, as (x, y, w, h), or None."""

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", scale_factor: float = 1.1,
                 min_neighbors: int = 5, min_size_frac: float = 0.2):
        folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if folder is None:
            raise RuntimeError(f"OpenCV {cv2.__version__} ships no Haar cascades (cv2.data); install "
                               "opencv-python-headless>=4.8,<5")
        self.path = Path(folder) / cascade
        if not self.path.is_file():
            raise FileNotFoundError(f"Haar cascade {self.path} is missing from the OpenCV installation")
        self.classifier = cv2.CascadeClassifier(str(self.path))
        if self.classifier.empty():
            raise RuntimeError(f"OpenCV could not load the Haar cascade {self.path}")
        self.scale_factor, self.min_neighbors, self.min_size_frac = scale_factor, min_neighbors, min_size_frac

    def __call__(self, image: np.ndarray) -> Box | None:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        side = int(min(gray.shape) * self.min_size_frac)
        faces = self.classifier.detectMultiScale(cv2.equalizeHist(gray), scaleFactor=self.scale_factor,
                                                 minNeighbors=self.min_neighbors, minSize=(side, side))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return int(x), int(y), int(w), int(h)


def square_box(box: Box, margin: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Square (x0, y0, x1, y1) around a detection, `margin` of its size added on each side, moved (and
    if need be shrunk) to lie inside an image of `shape` (H, W, ...)."""
    x, y, w, h = box
    height, width = shape[:2]
    side = min(int(round(max(w, h) * (1 + 2 * margin))), height, width)
    x0 = int(round(x + w / 2 - side / 2))
    y0 = int(round(y + h / 2 - side / 2))
    x0, y0 = min(max(x0, 0), width - side), min(max(y0, 0), height - side)
    return x0, y0, x0 + side, y0 + side


def crop_clip(paths: Sequence[str | Path], out_dir: str | Path, detector: Detector | None = None,
              margin: float = 0.15, size: int | None = None, name: str = "clip") -> list[Path]:
    """Crop every frame of a clip with the box found on its first (onset) frame; files keep their names.
    Cached: when out_dir holds a finished crop with the same settings, nothing is read or written."""
    out_dir = Path(out_dir)
    outputs = [out_dir / Path(p).name for p in paths]
    settings = {"margin": margin, "size": size, "frames": [Path(p).name for p in paths]}
    cache = out_dir / CACHE_NAME
    if cache.is_file():
        done = json.loads(cache.read_text())
        if {k: done.get(k) for k in settings} == settings and all(p.is_file() for p in outputs):
            return outputs
    onset = cv2.imread(str(paths[0]), cv2.IMREAD_COLOR)
    if onset is None:
        raise FileNotFoundError(f"{name}: cannot read onset frame {paths[0]}")
    box = (detector or HaarFaceDetector())(onset)
    if box is None:
        raise FaceNotFoundError(f"{name}: no face found in onset frame {paths[0]}")
    x0, y0, x1, y1 = square_box(box, margin, onset.shape)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, dst in zip(paths, outputs):
        image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise FileNotFoundError(f"{name}: cannot read frame {src}")
        if image.shape[:2] != onset.shape[:2]:
            raise ValueError(f"{name}: frame {src} is {image.shape[:2]}, the onset is {onset.shape[:2]}")
        crop = image[y0:y1, x0:x1]
        if size is not None:
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        if not cv2.imwrite(str(dst), crop):
            raise OSError(f"{name}: could not write {dst}")
    cache.write_text(json.dumps(settings | {"box": [x0, y0, x1, y1], "detected": list(box)}))
    return outputs


def crop_faces(df: pd.DataFrame, out_root: str | Path, detector: Detector | None = None, margin: float = 0.15,
               size: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Crop every clip of a table (onset..offset frames) to out_root/<subject>/<clip>/ and return the table
    with frames_dir pointing there. Clips cropped before with the same settings are skipped."""
    detector = detector or HaarFaceDetector()
    out = df.copy()
    folders = []
    for _, row in progress_bar(df.iterrows(), total=len(df), desc="cropping faces", disable=not progress):
        folder = Path(out_root) / str(row["subject"]) / str(row["clip"])
        crop_clip(clip_frame_paths(row), folder, detector, margin, size,
                  name=f"{row['dataset']} clip {row['subject']}/{row['clip']}")
        folders.append(str(folder))
    out["frames_dir"] = pd.Series(folders, index=out.index, dtype="string")
    return out
