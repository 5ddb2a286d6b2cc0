"""Datasets: CASME II, SAMM and SMIC-HS read from their own files, the MEGC2019 composite and 5-class
protocols, frame selection and apex estimation, face cropping, and synthetic stand-in datasets."""
from .composite import (CASME2_5CLASS, MEGC2019, MEGC2019_EXCLUDED, SAMM_5CLASS, GTReport, Protocol,
                        apply_protocol, casme2_5class, class_counts, megc2019_3class, megc2019_composite, read_gt,
                        samm_5class, validate_against_gt)
from .facecrop import FaceNotFoundError, HaarFaceDetector, crop_clip, crop_faces, square_box
from .frames import (clip_frame_paths, clip_row, estimate_apex, fill_apex, largest_motion_clip, load_clip_frames,
                     select_frame_numbers, select_frames)
from .readers import COLUMNS, check_frames, frame_index, read_casme2, read_samm, read_smic
from .sources import DATASETS, LABEL_PROTOCOLS, Sources, load_dataset
from .synthetic import (MACRO_CLASSES, REGIMES, SYNTHETIC_REGIMES, MacroConfig, MagnifiedTruth, SyntheticConfig,
                        apex_truth, make_synthetic, make_synthetic_macro, read_truth, regime_of, render_magnified_truth,
                        synthetic_config, synthetic_root, truth_for)

__all__ = [
    "DATASETS", "LABEL_PROTOCOLS", "Sources", "load_dataset",
    "COLUMNS", "read_casme2", "read_samm", "read_smic", "check_frames", "frame_index",
    "Protocol", "MEGC2019", "MEGC2019_EXCLUDED", "CASME2_5CLASS", "SAMM_5CLASS", "apply_protocol",
    "megc2019_3class", "megc2019_composite", "casme2_5class", "samm_5class", "class_counts",
    "read_gt", "validate_against_gt", "GTReport",
    "clip_frame_paths", "clip_row", "select_frame_numbers", "select_frames", "estimate_apex", "fill_apex",
    "largest_motion_clip",
    "load_clip_frames",
    "HaarFaceDetector", "FaceNotFoundError", "square_box", "crop_clip", "crop_faces",
    "SyntheticConfig", "MacroConfig", "MACRO_CLASSES", "make_synthetic", "make_synthetic_macro", "read_truth",
    "synthetic_root", "truth_for", "REGIMES", "SYNTHETIC_REGIMES", "synthetic_config", "regime_of",
    "render_magnified_truth", "MagnifiedTruth", "apex_truth",
]
