import pandas as pd
import pytest

from amanlib.metrics import accuracy, megc_scores, read_megc_log, uar, uf1, write_megc_log
from conftest import reference_path


def test_small_values_by_hand():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # per-class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 p=1 r=1/2 -> 2/3
    assert uf1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert uar(y_true, y_pred) == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)


def test_ststnet_published_uf1():
    scores = megc_scores(read_megc_log(reference_path("megc_logs", "ststnet_log.txt")))
    assert list(scores.index) == ["full", "smic", "casme2", "samm"]
    assert scores.loc["full", "n"] == 442
    for subset, published in {"full": 0.7353, "smic": 0.6801, "casme2": 0.8382, "samm": 0.6588}.items():
        assert scores.loc[subset, "uf1"] == pytest.approx(published, abs=5e-5), subset
    assert scores.loc["full", "uar"] == pytest.approx(0.7186, abs=5e-5)


def test_capsulenet_published_scores():
    scores = megc_scores(read_megc_log(reference_path("megc_logs", "capsulenet_log.txt")))
    assert scores.loc["full", "n"] == 435
    assert scores.loc["full", "uf1"] == pytest.approx(0.6520, abs=5e-5)
    assert scores.loc["full", "uar"] == pytest.approx(0.6506, abs=5e-5)


def test_log_round_trip(tmp_path):
    df = read_megc_log(reference_path("megc_logs", "ststnet_log.txt"))
    back = read_megc_log(write_megc_log(df, tmp_path / "log.txt"))
    pd.testing.assert_frame_equal(back, df)
    assert list(df.columns) == ["dataset", "subject", "clip", "gt", "pred"]
    assert df.subject.nunique() == 68


def test_bad_logs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("casme2 sub01\nEP02_01f 1 x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_megc_log(bad)
    bad.write_text("casme2 sub01\nEP02_01f 1 1 1\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_megc_log(bad)
    with pytest.raises(ValueError, match="'pred'"):
        write_megc_log(pd.DataFrame({"dataset": [], "subject": [], "clip": [], "gt": []}), tmp_path / "x.txt")
