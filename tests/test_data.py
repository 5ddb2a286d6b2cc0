"""amanlib.data: readers on the real coding sheets, the MEGC2019 composite against the organisers' file,
bad-input errors, frame selection, apex estimation, face cropping and the synthetic datasets."""
import hashlib
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest
import torch

from amanlib.data import (COLUMNS, MACRO_CLASSES, FaceNotFoundError, HaarFaceDetector, casme2_5class,
                          class_counts, clip_frame_paths, crop_clip, crop_faces, estimate_apex, fill_apex,
                          load_clip_frames, make_synthetic, make_synthetic_macro, megc2019_composite, read_casme2,
                          synthetic_root,
                          read_gt, read_samm, read_smic, read_truth, samm_5class, select_frames, square_box,
                          validate_against_gt)
from amanlib.data.faces import render_faces, sample_face

CASME2 = ("annotations", "CASME2-coding-20140508.xlsx")
SAMM = ("annotations", "SAMM_Micro_FACS_Codes_v2.xlsx")
GT = ("annotations", "combined_3class_gt.csv")
SMIC_FOLDERS = {0: "negative", 1: "positive", 2: "surprise"}
CASME2_HEADER = ["Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None, "Action Units",
                 "Estimated Emotion"]


def write_xlsx(path, rows, preamble=()):
    book = openpyxl.Workbook()
    for row in list(preamble) + list(rows):
        book.active.append(row)
    book.save(path)
    return path


def touch_frames(folder, numbers, pattern):
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        (folder / pattern.format(n)).touch()


def fake_smic_tree(root, gt_csv, padded=False):
    """The SMIC-HS release layout (HS/s1/micro/negative/s1_ne_01/imageN.bmp) for every SMIC clip of the gt."""
    gt = pd.read_csv(gt_csv, header=None, names=["dataset", "subject", "clip", "label"], dtype=str)
    for _, row in gt[gt["dataset"] == "smic"].iterrows():
        number = int(row["subject"][1:])
        subject = f"s{number:02d}" if padded else f"s{number}"
        clip = subject + row["clip"][row["clip"].index("_"):]
        start = 10000 * number
        touch_frames(root / "HS" / subject / "micro" / SMIC_FOLDERS[int(row["label"])] / clip, range(start, start + 3),
                     "image{:06d}.bmp")
    return root


@pytest.fixture(scope="module")
def real_tables():
    from conftest import reference_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_casme2(reference_path(*CASME2)), read_samm(reference_path(*SAMM))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The default synthetic set (12 subjects x 8 clips), generated once for the module."""
    root = tmp_path_factory.mktemp("synthetic")
    df = make_synthetic(root, seed=0)
    return synthetic_root(root, seed=0), df, read_truth(synthetic_root(root, seed=0))


# Readers on the real sheets

def test_read_casme2_real_sheet(reference):
    with pytest.warns(UserWarning, match=r"sub04/EP12_01f has apex '/'.*set to NA"):
        df = read_casme2(reference(*CASME2))
    assert list(df.columns) == COLUMNS
    assert len(df) == 255 and df["subject"].nunique() == 26
    first = df.iloc[0]
    assert (first["subject"], first["clip"], first["onset"], first["apex"], first["offset"]) == \
        ("sub01", "EP02_01f", 46, 59, 86)
    assert df["apex"].isna().sum() == 1 and df["label"].isna().all()
    assert df["emotion"].value_counts()["disgust"] == 63


def test_read_samm_real_sheet_finds_header(reference):
    df = read_samm(reference(*SAMM))
    assert len(df) == 159 and df["subject"].nunique() == 29
    first = df.iloc[0]
    assert (first["subject"], first["clip"], first["onset"], first["apex"], first["offset"], first["emotion"]) == \
        ("006", "006_1_2", 5562, 5588, 5632, "Anger")


def test_megc2019_composite_equals_gt_clip_by_clip(reference, real_tables, tmp_path):
    casme2, samm = real_tables
    smic = read_smic(fake_smic_tree(tmp_path, reference(*GT)))
    composite = megc2019_composite(casme2, samm, smic)
    assert len(composite) == 442 and composite["subject"].nunique() == 68
    counts = class_counts(composite)
    expected = pd.DataFrame({"negative": [88, 92, 70], "positive": [32, 26, 51], "surprise": [25, 15, 43],
                             "clips": [145, 133, 164], "subjects": [24, 28, 16]}, index=["casme2", "samm", "smic"])
    pd.testing.assert_frame_equal(counts.loc[expected.index], expected, check_names=False, check_dtype=False,
                                  check_index_type=False)
    report = validate_against_gt(composite, reference(*GT))
    assert report.ok, str(report)
    gt = read_gt(reference(*GT))  # same rows, same order, once SAMM subjects are padded as in its folders
    ours = composite[["dataset", "subject", "clip", "label"]].astype({"label": int}).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, gt.astype({"label": int}), check_dtype=False)
    excluded = casme2[casme2["clip"].isin(["EP12_01f", "EP09_05f"]) & casme2["subject"].isin(["sub04", "sub05"])]
    assert set(excluded["emotion"]) == {"disgust"} and not composite["clip"].isin(excluded["clip"]).any()


def test_validate_against_gt_reports_each_mismatch(reference, real_tables):
    composite = megc2019_composite(*real_tables)  # CASME II and SAMM only: SMIC rows are not compared
    assert validate_against_gt(composite, reference(*GT)).compared == 278
    broken = composite.drop(index=[0]).copy()
    broken.loc[5, "label"] = (broken.loc[5, "label"] + 1) % 3
    extra = broken.iloc[[1]].assign(clip="EP99_99")
    report = validate_against_gt(pd.concat([broken, extra]), reference(*GT))
    assert not report.ok
    assert list(report.missing["clip"]) == ["EP02_01f"]
    assert list(report.extra["clip"]) == ["EP99_99"]
    assert list(report.wrong_label["clip"]) == [composite.loc[5, "clip"]]
    with pytest.raises(ValueError, match="EP99_99"):
        report.raise_if_mismatch()


def test_five_class_protocols(real_tables):
    casme2, samm = real_tables
    c5, s5 = casme2_5class(casme2), samm_5class(samm)
    assert class_counts(c5).loc["casme2"].to_dict() == {"happiness": 32, "surprise": 25, "disgust": 63,
                                                        "repression": 27, "others": 99, "clips": 246, "subjects": 26}
    assert class_counts(s5).loc["samm"].to_dict() == {"anger": 57, "contempt": 12, "happiness": 26, "surprise": 15,
                                                      "others": 26, "clips": 136, "subjects": 27}
    assert list(c5.loc[c5["emotion"] == "repression", "label"].unique()) == [3]


def test_protocol_reports_unknown_emotions_and_wrong_arguments(real_tables):
    casme2, samm = real_tables
    typo = samm.copy()
    typo.loc[0, "emotion"] = "Angry"
    with pytest.warns(UserWarning, match=r"unknown emotion for 1 clip\(s\), dropped: samm 006/006_1_2 \('Angry'\)"):
        assert len(megc2019_composite(samm=typo)) == 132
    with pytest.raises(ValueError, match="the casme2 argument holds dataset"):
        megc2019_composite(casme2=samm)


# Bad input

def test_missing_column_is_named(tmp_path):
    header = ["Subject", "Filename", "OnsetFrame", "OffsetFrame", "Estimated Emotion"]
    sheet = write_xlsx(tmp_path / "bad.xlsx", [header, [1, "EP01_01", 10, 20, "happiness"]])
    with pytest.raises(ValueError, match="ApexFrame"):
        read_casme2(sheet)


def test_bad_apex_is_warned_and_set_to_na(tmp_path):
    sheet = write_xlsx(tmp_path / "apex.xlsx", [CASME2_HEADER, [1, "EP01_01", None, 10, "/", 20, None, "4", "disgust"],
                                                [1, "EP01_02", None, 10, 25, 20, None, "12", "happiness"],
                                                [2, "EP01_03", None, 10, 15, 20, None, "12", "happiness"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_casme2(sheet)
    messages = " | ".join(str(w.message) for w in caught)
    assert "sub01/EP01_01 has apex '/'" in messages and "sub01/EP01_02 has apex 25 outside [10, 20]" in messages
    assert df["apex"].isna().tolist() == [True, True, False]


def test_missing_frames_raise_or_drop(tmp_path):
    sheet = write_xlsx(tmp_path / "c.xlsx", [CASME2_HEADER, [1, "EP01_01", None, 10, 12, 14, None, "12", "happiness"],
                                             [1, "EP01_02", None, 10, 12, 14, None, "12", "happiness"],
                                             [2, "EP02_01", None, 5, 6, 7, None, "4", "disgust"]])
    root = tmp_path / "Cropped"
    touch_frames(root / "sub01" / "EP01_01", range(10, 15), "reg_img{}.jpg")
    touch_frames(root / "sub01" / "EP01_02", [10, 11, 12, 14], "reg_img{}.jpg")  # frame 13 missing
    with pytest.raises(FileNotFoundError, match=r"sub01/EP01_02: frame\(s\) 13 .* missing in .*EP01_02"):
        read_casme2(sheet, root)
    with pytest.warns(UserWarning, match=r"dropped 2 clip\(s\)(.|\n)*EP01_02(.|\n)*sub02/EP02_01: frames folder"):
        df = read_casme2(sheet, root, on_missing="drop")
    assert df["clip"].tolist() == ["EP01_01"] and df["frames_dir"][0] == str(root / "sub01" / "EP01_01")
    with pytest.raises(FileNotFoundError, match="frames root"):
        read_casme2(sheet, tmp_path / "nowhere")


def test_samm_layout_and_header_search(tmp_path):
    header = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame", "Duration",
              "Micro", "Action Units", "Estimated Emotion", "Objective Classes", "Notes"]
    sheet = tmp_path / "samm.xlsx"
    write_xlsx(sheet, [header, ["006", "006_1_2", 1, 100, 102, 104, 5, "Micro", "4", "Anger", 3, None]],
               preamble=[["SAMM Dataset"], [], ["Symbol Key:"]])
    book = openpyxl.load_workbook(sheet)
    book.active.title = "MICRO_ONLY"
    book.save(sheet)
    touch_frames(tmp_path / "frames" / "006" / "006_1_2", range(100, 105), "006_{:05d}.jpg")
    df = read_samm(sheet, tmp_path / "frames")
    assert df[["subject", "clip", "onset", "apex", "offset"]].iloc[0].tolist() == ["006", "006_1_2", 100, 102, 104]
    assert [p.name for p in select_frames(df.iloc[0], 3)] == ["006_00100.jpg", "006_00101.jpg", "006_00102.jpg"]
    with pytest.raises(ValueError, match="no sheet 'MICRO'"):
        read_samm(sheet, sheet="MICRO")


def test_read_smic_accepts_padded_and_unpadded_subjects(tmp_path):
    for name in ("s1", "s02"):
        touch_frames(tmp_path / "HS" / name / "micro" / "positive" / f"{name}_po_01", range(7, 10), "image{:06d}.bmp")
    df = read_smic(tmp_path)
    assert df[["subject", "clip", "onset", "offset"]].values.tolist() == [["s01", "s01_po_01", 7, 9],
                                                                         ["s02", "s02_po_01", 7, 9]]
    assert df["apex"].isna().all() and (df["emotion"] == "positive").all()
    (tmp_path / "HS" / "s1" / "micro" / "surprise" / "s1_sur_01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="s01/s01_sur_01: no frames"):
        read_smic(tmp_path / "HS")


# Frames

def test_select_frames_spans_onset_to_apex(synthetic):
    _, df, _ = synthetic
    row = df.iloc[0]
    paths = select_frames(row, 5)
    numbers = [int(p.stem.removeprefix("reg_img")) for p in paths]
    assert numbers[0] == row["onset"] and numbers[-1] == row["apex"] and numbers == sorted(numbers)
    assert np.ptp(np.diff(numbers)) <= 1  # evenly spaced up to rounding
    no_apex = row.copy()
    no_apex["apex"] = pd.NA
    with pytest.raises(ValueError, match="has no apex: fill it"):
        select_frames(no_apex, 5)


def test_load_clip_frames(synthetic, tmp_path):
    _, df, _ = synthetic
    paths = clip_frame_paths(df.iloc[0])
    frames = load_clip_frames(paths[:4], size=(64, 48))
    assert frames.shape == (4, 3, 64, 48) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0.05
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_clip_frames([tmp_path / "nope.jpg"])


def test_estimate_apex_on_clean_clips(tmp_path):
    df = make_synthetic(tmp_path, seed=5, n_subjects=3, clips_per_subject=4, drift_px=0.0, blink_prob=0.0,
                        flicker=0.0, subject_peak_px=(0.8, 2.0))
    filled = fill_apex(df.assign(apex=pd.array([pd.NA] * len(df), dtype="Int64")), progress=False)
    errors = (filled["apex"] - df["apex"]).abs()
    assert (errors <= 1).mean() >= 0.9, errors.tolist()
    middle = fill_apex(df.assign(apex=pd.array([pd.NA] * len(df), dtype="Int64")), method="middle", progress=False)
    assert (middle["apex"] == (df["onset"] + df["offset"]) // 2).all()


def test_estimate_apex_with_nuisances(synthetic):
    _, df, truth = synthetic
    clear = df.merge(truth, on=["subject", "clip", "onset", "apex", "offset"]).query("peak_px >= 0.8")
    hits = [abs(estimate_apex(load_clip_frames(clip_frame_paths(r))) - (r["apex"] - r["onset"])) <= 2
            for _, r in clear.iterrows()]
    assert len(hits) >= 20 and np.mean(hits) >= 0.6
    assert estimate_apex(torch.zeros(7, 3, 8, 8), method="middle") == 3


# Synthetic data

def test_synthetic_defaults(synthetic):
    root, df, truth = synthetic
    assert df["subject"].nunique() >= 12 and len(df) >= 90 and set(df["label_name"]) == {"negative", "positive",
                                                                                           "surprise"}
    assert (df["dataset"] == "synthetic").all() and df["frames_dir"].notna().all()
    lengths = df["offset"] - df["onset"] + 1
    assert lengths.between(15, 25).all()
    assert (df["onset"] < df["apex"]).all() and (df["apex"] < df["offset"]).all()
    image = cv2.imread(str(clip_frame_paths(df.iloc[0])[0]))
    assert image.shape[0] >= 128 and image.shape[1] >= 128
    sheet = pd.read_excel(root / "CASME2-coding-synthetic.xlsx")
    assert list(sheet.columns) == ["Subject", "Filename", "Unnamed: 2", "OnsetFrame", "ApexFrame", "OffsetFrame",
                                   "Unnamed: 6", "Action Units", "Estimated Emotion"]
    assert set(sheet["Estimated Emotion"]) <= {"happiness", "surprise", "disgust", "repression"}


def test_synthetic_motion_is_micro_and_subject_specific(synthetic):
    _, _, truth = synthetic
    assert truth["peak_px"].between(0.2, 2.0).all()
    assert truth["peak_px"].min() < 0.5 and truth["peak_px"].max() > 1.2
    per_subject = truth.groupby("subject")["subject_peak_px"].first()
    assert per_subject.max() / per_subject.min() > 3
    assert truth["blink_frame"].notna().any() and truth["blink_frame"].isna().any()
    assert (truth["drift_px"] <= 0.3 + 1e-9).all() and truth["drift_px"].max() > 0.1


def test_synthetic_actions_move_the_right_region(synthetic):
    _, df, truth = synthetic
    rows = df.merge(truth[["subject", "clip", "blink_frame"]], on=["subject", "clip"])
    rows = rows[rows["blink_frame"].isna()]  # a blink moves the eye region whatever the class
    brow, mouth = (slice(36, 50), slice(24, 104)), (slice(80, 100), slice(24, 104))  # rows, columns at 128 px
    ratio = {}
    for emotion, group in rows.groupby("emotion"):
        diffs = torch.stack([(lambda f: (f[1] - f[0]).abs().mean(0))(load_clip_frames(select_frames(r, 2)))
                             for _, r in group.iterrows()])  # clips, H, W
        ratio[emotion] = float(diffs[:, mouth[0], mouth[1]].mean() / diffs[:, brow[0], brow[1]].mean())
    assert ratio["happiness"] > 1.15 and ratio["repression"] > 1.15, ratio  # mouth moves more than brows
    assert ratio["surprise"] < 0.6 and ratio["disgust"] < 0.85, ratio  # brows move more than the mouth


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg")) + [root / "synthetic_truth.csv"]}


def test_synthetic_is_deterministic_and_cached(tmp_path):
    small = dict(n_subjects=2, clips_per_subject=3, frames=8, frames_jitter=1)
    a = make_synthetic(tmp_path / "a", seed=3, **small)
    b = make_synthetic(tmp_path / "b", seed=3, **small)
    c = make_synthetic(tmp_path / "c", seed=4, **small)
    folder = synthetic_root(tmp_path / "a", seed=3, **small)
    assert folder.name == synthetic_root(tmp_path / "b", seed=3, **small).name  # the key: seed and config only
    assert _digest(folder) == _digest(synthetic_root(tmp_path / "b", seed=3, **small)) \
        != _digest(synthetic_root(tmp_path / "c", seed=4, **small))
    pd.testing.assert_frame_equal(a.drop(columns="frames_dir"), b.drop(columns="frames_dir"))
    stamp = (folder / "done.json").stat().st_mtime_ns
    make_synthetic(tmp_path / "a", seed=3, **small)
    assert (folder / "done.json").stat().st_mtime_ns == stamp  # cached: nothing rewritten
    again = make_synthetic(tmp_path / "a", seed=4, **small)  # another seed: a folder of its own beside the first
    assert synthetic_root(tmp_path / "a", seed=4, **small) != folder and (folder / "done.json").exists()
    assert set(again["frames_dir"]).isdisjoint(a["frames_dir"]) and len(again) == len(c)
    with pytest.raises(TypeError, match="n_subject"):
        make_synthetic(tmp_path / "e", n_subject=3)


def test_a_killed_generation_is_repaired_by_the_next_call(tmp_path, monkeypatch):
    import amanlib.data.synthetic as synthetic
    small = dict(n_subjects=2, clips_per_subject=2, frames=8, frames_jitter=1)
    real = synthetic._write_sheet

    def killed(*args):
        raise KeyboardInterrupt  # the process dies after the frames, before the sheet and the stamp

    monkeypatch.setattr(synthetic, "_write_sheet", killed)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path, seed=1, **small)
    folder = synthetic_root(tmp_path, seed=1, **small)
    assert list(folder.rglob("*.jpg")) and not (folder / "done.json").exists()
    monkeypatch.setattr(synthetic, "_write_sheet", real)
    df = make_synthetic(tmp_path, seed=1, **small)
    assert len(df) == 4 and (folder / "done.json").exists()
    fresh = make_synthetic(tmp_path / "fresh", seed=1, **small)
    assert _digest(folder) == _digest(synthetic_root(tmp_path / "fresh", seed=1, **small))
    pd.testing.assert_frame_equal(df.drop(columns="frames_dir"), fresh.drop(columns="frames_dir"))


def test_synthetic_honours_the_label_protocol(tmp_path):
    small = dict(n_subjects=2, clips_per_subject=6, frames=8, frames_jitter=1)
    three = make_synthetic(tmp_path, seed=0, **small)
    five = make_synthetic(tmp_path, seed=0, label_protocol="casme2_5class", **small)
    assert set(three["label_name"]) == {"negative", "positive", "surprise"}
    assert set(five["label_name"]) <= {"happiness", "surprise", "disgust", "repression", "others"}
    assert set(five["label_name"]) != set(three["label_name"]) and len(five) == len(three)
    with pytest.raises(ValueError, match="samm_5class"):
        make_synthetic(tmp_path, seed=0, label_protocol="samm_5class", **small)


def test_synthetic_macro(tmp_path):
    df = make_synthetic_macro(tmp_path, seed=1, n_subjects=2, variants=1, neutral_per_subject=2)
    assert list(df.columns) == ["path", "subject", "emotion", "label", "label_name", "intensity_px"]
    assert len(df) == 2 * (3 * 3 + 2) and set(df["label_name"]) == set(MACRO_CLASSES)
    assert (df["label"] == df["label_name"].map(MACRO_CLASSES.index)).all()
    assert df.loc[df["label_name"] != "neutral", "intensity_px"].min() > 2.0
    assert all(Path(p).is_file() for p in df["path"])
    again = make_synthetic_macro(tmp_path / "again", seed=1, n_subjects=2, variants=1, neutral_per_subject=2)
    assert [Path(p).read_bytes() for p in df["path"]] == [Path(p).read_bytes() for p in again["path"]]


# Face crop

def _raw_clip(tmp_path, synthetic, index=0, offset=(60, 90)):
    """A synthetic clip pasted into a larger frame, as a raw (uncropped) release would have it."""
    _, df, _ = synthetic
    row = df.iloc[index]
    folder = tmp_path / "raw" / row["subject"] / row["clip"]
    folder.mkdir(parents=True)
    for path in clip_frame_paths(row):
        face = cv2.resize(cv2.imread(str(path)), (200, 200))
        canvas = np.full((360, 420, 3), 90, np.uint8)
        canvas[offset[0]:offset[0] + 200, offset[1]:offset[1] + 200] = face
        cv2.imwrite(str(folder / path.name.removeprefix("reg_")), canvas)
    raw = row.copy()
    raw["frames_dir"] = str(folder)
    return raw, offset


def test_haar_detector_ships_and_finds_synthetic_faces():
    detector = HaarFaceDetector()
    assert detector.path.is_file() and detector.path.suffix == ".xml"
    faces = render_faces([sample_face(np.random.default_rng([0, 0, s])) for s in range(4)], 128)[:, 0]
    found = [detector((f.permute(1, 2, 0).numpy()[..., ::-1] * 255).astype(np.uint8)) for f in faces]
    assert all(box is not None and box[2] > 64 for box in found), found
    assert detector(np.full((128, 128), 128, np.uint8)) is None


def test_crop_faces_with_haar(tmp_path, synthetic):
    row, (top, left) = _raw_clip(tmp_path, synthetic)
    out = crop_faces(pd.DataFrame([row]), tmp_path / "crops", margin=0.1, size=96, progress=False)
    crops = clip_frame_paths(out.iloc[0])
    assert len(crops) == row["offset"] - row["onset"] + 1
    assert all(cv2.imread(str(p)).shape == (96, 96, 3) for p in crops)
    x0, y0, x1, y1 = json.loads((Path(out["frames_dir"][0]) / "crop.json").read_text())["box"]
    assert abs((x0 + x1) / 2 - (left + 100)) < 25 and abs((y0 + y1) / 2 - (top + 100)) < 25
    assert x1 - x0 == y1 - y0


def test_crop_clip_logic_with_injected_detector(tmp_path):
    frames = []
    for k in range(3):
        image = np.zeros((100, 120, 3), np.uint8)
        image[20:60, 30:70] = 50 + 50 * k
        frames.append(tmp_path / f"img{k}.png")
        cv2.imwrite(str(frames[-1]), image)
    calls = []

    def detector(image):
        calls.append(image.shape)
        return 30, 20, 40, 40

    outputs = crop_clip(frames, tmp_path / "out", detector, margin=0.25, name="sub01/EP01_01")
    assert calls == [(100, 120, 3)]  # detected once, on the onset
    crops = [cv2.imread(str(p)) for p in outputs]
    assert all(c.shape == (60, 60, 3) for c in crops)  # 40 px box + 25 % margin each side
    assert [int(c[30, 30, 0]) for c in crops] == [50, 100, 150]
    crop_clip(frames, tmp_path / "out", detector, margin=0.25)
    assert len(calls) == 1  # cached
    crop_clip(frames, tmp_path / "out", detector, margin=0.3)
    assert len(calls) == 2  # other settings: redone
    with pytest.raises(FaceNotFoundError, match=r"sub01/EP01_01: no face found in onset frame .*img0.png"):
        crop_clip(frames, tmp_path / "none", lambda image: None, name="sub01/EP01_01")


def test_square_box_stays_inside_the_image():
    assert square_box((0, 0, 40, 20), 0.5, (100, 100)) == (0, 0, 80, 80)
    assert square_box((80, 70, 20, 20), 0.5, (100, 100)) == (60, 60, 100, 100)
    assert square_box((10, 10, 200, 200), 0.5, (120, 90)) == (0, 30, 90, 120)


def test_the_regimes_write_the_same_layout_and_differ_only_in_their_motion(tmp_path):
    """narrow and wide (issue 20) change only the documented motion fields; both write CASME II's layout, and the
    wide set's true motion spans its wider range."""
    from amanlib.data import SYNTHETIC_REGIMES, SyntheticConfig, regime_of, synthetic_config, synthetic_root
    from amanlib.data.synthetic import resolve_config
    from dataclasses import asdict
    narrow, wide = asdict(synthetic_config("narrow")), asdict(synthetic_config("wide"))
    assert {k for k in narrow if narrow[k] != wide[k]} == set(SYNTHETIC_REGIMES["wide"])
    assert synthetic_config("narrow") == SyntheticConfig()  # the default: its cache keys and frames stay as they were
    assert [regime_of(synthetic_config(r, n_subjects=3)) for r in ("narrow", "wide")] == ["narrow", "wide"]
    assert regime_of(SyntheticConfig(max_peak_px=3.0)) == "custom"
    with pytest.raises(ValueError, match="regime or a config, not both"):
        resolve_config(SyntheticConfig(), "wide")
    with pytest.raises(ValueError, match="one of \\('narrow', 'wide'\\)"):
        synthetic_config("adaptive")
    small = dict(n_subjects=3, clips_per_subject=3, frames=8, frames_jitter=1, size=64)
    tables = {r: make_synthetic(tmp_path, regime=r, **small) for r in ("narrow", "wide")}
    assert list(tables["narrow"].columns) == list(tables["wide"].columns)
    for r, table in tables.items():
        root = synthetic_root(tmp_path, regime=r, **small)
        assert root == Path(table["frames_dir"].iloc[0]).parents[2]
        assert sorted(p.relative_to(root / "Cropped").parts[:2] for p in (root / "Cropped").glob("sub*/EP*")) == \
            sorted((s, c) for s, c in zip(table["subject"], table["clip"]))
        peak = read_truth(root)["peak_px"]
        lo, hi = (SYNTHETIC_REGIMES[r]["subject_peak_px"][0] * SYNTHETIC_REGIMES[r]["clip_peak_jitter"][0],
                  SYNTHETIC_REGIMES[r]["max_peak_px"])
        assert lo <= peak.min() and peak.max() <= hi


def test_clip_row_names_the_parameter_and_the_range():
    """`-p clip 99` on a 9-clip table (issue 22): one line naming the parameter and the rows, not pandas' error."""
    from amanlib.data import clip_row
    index = pd.DataFrame({"onset": [0, 0, 0], "apex": [3, 9, 5], "clip": ["a", "b", "c"]})
    truth = pd.DataFrame({"peak_px": [0.5, 0.2, 1.5]})
    assert clip_row(index, None, truth)["clip"] == "c" and clip_row(index, 1)["clip"] == "b"
    with pytest.raises(ValueError, match=r"clip 99 is not a row of the clip table \(rows 0-2, 3 clips\)"):
        clip_row(index, 99)


def test_the_demo_clip_is_the_one_with_the_largest_motion(tmp_path):
    """clip None in notebook 02: on synthetic data the clip with the largest true motion; without a truth the clip
    whose apex differs most from its onset, which on clean clips is a large motion (it was the clip with the most
    frames to its apex, whatever its motion)."""
    from amanlib.data import clip_row, largest_motion_clip, truth_for
    df = make_synthetic(tmp_path, seed=3, n_subjects=3, clips_per_subject=4, drift_px=0.0, blink_prob=0.0,
                        flicker=0.0, subject_peak_px=(0.3, 4.0), max_peak_px=8.0)
    truth = truth_for(df)
    assert clip_row(df, None, truth)["clip"] == truth.loc[truth["peak_px"].idxmax(), "clip"]
    assert clip_row(df, None, truth)["subject"] == truth.loc[truth["peak_px"].idxmax(), "subject"]
    measured = largest_motion_clip(df, progress=False)
    assert truth["peak_px"].iloc[measured] > truth["peak_px"].median()
    assert clip_row(df, 2, truth)["clip"] == df.iloc[2]["clip"]
