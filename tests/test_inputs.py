"""Strict input reading: every bad frame, checkpoint, MEGC log or spreadsheet is refused with an error naming
the file (and clip, line or key) and what was found; harmless variants of good inputs still load."""
import argparse
import fractions

import cv2
import numpy as np
import openpyxl
import pytest
import torch
from torchvision.models import resnet18, resnet34

from amanlib.data import frame_index, load_clip_frames, read_casme2, read_samm
from amanlib.backbone import ResNet18Trunk, load_fer_checkpoint
from amanlib.magnify.checkpoint import WHERE_TO_GET, load_magnet_state_dict
from amanlib.metrics import read_megc_log
from amanlib.model import AMAN

CASME2_HEADER = ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Estimated Emotion"]
SAMM_HEADER = ["Subject", "Filename", "Onset Frame", "Apex Frame", "Offset Frame", "Estimated Emotion"]


def write_image(path, seed=0):
    """A small noisy colour image in the format the suffix names; returns its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path.read_bytes()


def fer_layout(net, **extra):
    """A state dict saved the way Emotion-FAN's FER+ file is: DataParallel keys inside {'state_dict': ...}."""
    return {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, **extra}


def write_sheet(path, header, rows, sheet_title=None):
    book = openpyxl.Workbook()
    for row in [header, *rows]:
        book.active.append(row)
    if sheet_title:
        book.active.title = sheet_title
    book.save(path)
    return path


# ---------------------------------------------------------------- frames

def test_frame_index_skips_hidden_files(tmp_path):
    for name in ("reg_img112.jpg", "._reg_img113.jpg", ".DS_Store", ".reg_img114.png"):
        (tmp_path / name).touch()
    assert frame_index(tmp_path) == {112: tmp_path / "reg_img112.jpg"}


def test_two_files_for_one_frame_are_an_error_naming_both(tmp_path):
    (tmp_path / "reg_img0110.jpg").touch()
    (tmp_path / "reg_img110.jpg").touch()
    with pytest.raises(ValueError, match=r"reg_img0110\.jpg and .*reg_img110\.jpg are both frame 110"):
        frame_index(tmp_path)


def test_truncated_jpeg_is_an_error_naming_it(tmp_path):
    good = tmp_path / "img1.jpg"
    data = write_image(good)
    padded = tmp_path / "img2.jpg"
    padded.write_bytes(data + b"\x00" * 16 + b"\r\n")
    loaded = load_clip_frames([good, padded])
    expected = torch.from_numpy(cv2.cvtColor(cv2.imread(str(good)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1) / 255
    assert torch.equal(loaded[0], expected) and torch.equal(loaded[1], expected)
    cut = tmp_path / "img3.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"img3\.jpg: corrupt or truncated image"):
        load_clip_frames([good, cut])


def test_truncated_png_is_an_error_naming_it(tmp_path):
    data = write_image(tmp_path / "img1.png")
    cut = tmp_path / "img2.png"
    cut.write_bytes(data[:-12])  # the IEND chunk is gone
    with pytest.raises(ValueError, match=r"img2\.png: corrupt or truncated image"):
        load_clip_frames([cut])


def test_undecodable_image_is_a_value_error_and_a_missing_one_stays_file_not_found(tmp_path):
    junk = tmp_path / "img1.jpg"
    junk.write_bytes(b"not really an image at all")
    with pytest.raises(ValueError, match=r"img1\.jpg: corrupt or truncated image"):
        load_clip_frames([junk])
    with pytest.raises(FileNotFoundError, match=r"img2\.jpg"):
        load_clip_frames([tmp_path / "img2.jpg"])


# ---------------------------------------------------------------- checkpoints

def test_training_checkpoint_with_numpy_scalars_and_args_loads(tmp_path):
    torch.manual_seed(0)
    net = resnet18(num_classes=8)
    path = tmp_path / "Resnet18_FER+_pytorch.pth.tar"
    torch.save(fer_layout(net, epoch=40, best_prec1=np.float64(85.3), step=np.int64(7), lr=np.float32(0.1),
                          args=argparse.Namespace(arch="resnet18", lr=0.1)), path)
    trunk = load_fer_checkpoint(ResNet18Trunk(), path)
    torch.testing.assert_close(trunk.layer3[1].conv2.weight, net.layer3[1].conv2.weight)


def test_foreign_object_in_checkpoint_is_named(tmp_path):
    path = tmp_path / "fer.pth.tar"
    torch.save(fer_layout(resnet18(num_classes=8), ratio=fractions.Fraction(1, 3)), path)
    with pytest.raises(ValueError, match=r"fer\.pth\.tar: holds a fractions\.Fraction object.*"
                                         r"torch\.save\(model\.state_dict\(\)"):
        load_fer_checkpoint(ResNet18Trunk(), path)


def test_not_a_checkpoint_says_so_naming_the_file(tmp_path):
    from amanlib.checkpoints import read_state_dict
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    zipped = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(100)}, zipped)
    zipped.write_bytes(zipped.read_bytes()[:300])
    for path in (text, zipped):
        with pytest.raises(ValueError, match=rf"{path.name} is not a PyTorch checkpoint"):
            read_state_dict(path, "test checkpoint")
    with pytest.raises(FileNotFoundError, match=r"test checkpoint .*absent\.pth"):
        read_state_dict(tmp_path / "absent.pth", "test checkpoint")


def test_check_architecture_reports_missing_unexpected_and_shapes(tmp_path):
    from amanlib.checkpoints import check_architecture
    expected = {"a.weight": torch.Size([2, 3]), "a.bias": torch.Size([2]), "bn.num_batches_tracked": torch.Size([])}
    state = {"a.weight": torch.zeros(2, 4), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"w\.pth: missing keys a\.bias, bn\.num_batches_tracked; unexpected keys "
                                         r"extra\.weight; shapes differ for a\.weight: \(2, 4\) in the file, \(2, 3\) "
                                         r"expected: not a toy net"):
        check_architecture(state, expected, tmp_path / "w.pth", "toy net")
    check_architecture({"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}, expected, "w.pth", "toy net",
                       may_lack=("num_batches_tracked",))


def test_fer_checkpoint_of_resnet34_is_refused(tmp_path):
    path = tmp_path / "resnet34.pth.tar"
    torch.save(fer_layout(resnet34(num_classes=8)), path)
    with pytest.raises(ValueError, match=r"resnet34\.pth\.tar: unexpected keys layer1\.2\.conv1\.weight.*"
                                         r"not a ResNet-18"):
        load_fer_checkpoint(ResNet18Trunk(), path)


def test_old_fer_checkpoint_without_num_batches_tracked_loads(tmp_path):
    torch.manual_seed(1)
    net = resnet18(num_classes=8)
    path = tmp_path / "old.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()
                               if not k.endswith("num_batches_tracked")}}, path)
    trunk = load_fer_checkpoint(ResNet18Trunk(with_layer4=True), path)
    torch.testing.assert_close(trunk.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    AMAN(3, init_layer4_from=path)


def test_aman_checkpoint_with_other_class_count_names_both(tmp_path):
    path = tmp_path / "aman5.pth"
    torch.save(AMAN(5).state_dict(), path)
    with pytest.raises(ValueError, match=r"aman5\.pth: the checkpoint classifies 5 classes .* the model has 3"):
        AMAN(3).load_checkpoint(path)
    with pytest.raises(ValueError, match=r"aman5\.pth: .*5 classes .* the model has 3"):
        AMAN.from_checkpoint(path, num_classes=3)


def test_layer4_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet34\.pth: unexpected keys layer4\.2\..*not a ResNet-18 layer4"):
        AMAN(3).load_layer4(path)


def test_magnet_checkpoint_is_read_by_the_shared_reader(tmp_path):
    path = tmp_path / "mag.pth.tar"
    weights = {"module.encoder.conv1.weight": torch.ones(2, 3)}
    torch.save({"state_dict": weights, "best_loss": np.float64(0.01), "args": argparse.Namespace(lr=1e-4)}, path)
    assert list(load_magnet_state_dict(path)) == ["encoder.conv1.weight"]
    torch.save({"state_dict": weights, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match=r"mag\.pth\.tar: holds a fractions\.Fraction object") as err:
        load_magnet_state_dict(path)
    assert WHERE_TO_GET in str(err.value)


# ---------------------------------------------------------------- MEGC logs

@pytest.mark.parametrize("line", ["EP01_01 1", "casme3 sub01"])
def test_log_line_with_two_fields_that_is_no_header_is_an_error(tmp_path, line):
    path = tmp_path / "log.txt"
    path.write_text(f"casme2 sub01\nEP01_01 1 1\n{line}\nEP01_02 2 2\n")
    with pytest.raises(ValueError, match=rf"log\.txt:3: .*'{line}'"):
        read_megc_log(path)


def test_log_clip_line_before_any_header_is_an_error(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("# a comment\n\nEP01_01 1 1\ncasme2 sub01\nEP01_02 2 2\n")
    with pytest.raises(ValueError, match=r"log\.txt:3: clip line 'EP01_01 1 1' before any"):
        read_megc_log(path)


def test_log_with_utf8_bom_parses(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("casme2 sub01\r\nEP01_01 1 2\r\n", encoding="utf-8-sig")
    df = read_megc_log(path)
    assert df[["dataset", "subject", "clip", "gt", "pred"]].values.tolist() == [["casme2", "sub01", "EP01_01", 1, 2]]


def test_log_clip_twice_in_a_fold_is_an_error_naming_both_lines(tmp_path):
    """A clip counted twice would weigh twice in UF1 (issue 22): the second line is named, with the first."""
    path = tmp_path / "log.txt"
    path.write_text("casme2 sub01\nEP01_01 1 1\nEP01_02 2 2\nEP01_01 1 0\ncasme2 sub02\nEP01_01 0 0\n")
    with pytest.raises(ValueError, match=r"log\.txt:4: clip EP01_01 of fold 'casme2 sub01' is listed again \(first "
                                         r"on line 2\)"):
        read_megc_log(path)
    path.write_text("casme2 sub01\nEP01_01 1 1\ncasme2 sub02\nEP01_01 0 0\n")  # other subjects' clips may share names
    assert len(read_megc_log(path)) == 2


@pytest.mark.parametrize("line", ["EP01_02 1 5", "EP01_02 3 1", "EP01_02 -1 0"])
def test_log_label_outside_the_protocols_classes_is_an_error(tmp_path, line):
    path = tmp_path / "log.txt"
    path.write_text(f"casme2 sub01\nEP01_01 1 1\n{line}\n")
    with pytest.raises(ValueError, match=rf"log\.txt:3: gt and pred must be classes 0 to 2, got '{line}'"):
        read_megc_log(path)
    if "-" not in line:
        assert read_megc_log(path, num_classes=6)["pred"].tolist()[-1] == int(line.split()[2])


def test_an_optimistic_log_is_scored_with_its_mark(tmp_path, capsys):
    from amanlib.cli import main
    path = tmp_path / "log.txt"
    path.write_text("# OPTIMISTIC: epoch chosen on the held-out subject's own accuracy\ncasme2 sub01\nEP01_01 1 1\n"
                    "EP01_02 2 1\n")
    assert read_megc_log(path).attrs["optimistic"] and main(["score", str(path)]) == 0
    assert f"# {path} (OPTIMISTIC" in capsys.readouterr().out
    path.write_text("casme2 sub01\nEP01_01 1 1\nEP01_02 2 1\n")
    assert not read_megc_log(path).attrs["optimistic"] and main(["score", str(path)]) == 0
    assert "OPTIMISTIC" not in capsys.readouterr().out
    assert main(["score", "--classes", "1", str(path)]) == 2 and "number of classes >= 2" in capsys.readouterr().err


def test_log_folder_and_missing_log_are_named(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path.name} is a directory; pass the log files inside it"):
        read_megc_log(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        read_megc_log(tmp_path / "absent.txt")


# ---------------------------------------------------------------- spreadsheets

@pytest.mark.parametrize("reader", [read_casme2, read_samm])
def test_csv_renamed_to_xlsx_is_named(tmp_path, reader):
    path = tmp_path / "coding.xlsx"
    path.write_text("Subject,Filename,OnsetFrame\n1,EP01_01,10\n")
    with pytest.raises(ValueError, match=r"coding\.xlsx: not an Excel workbook .*found text starting 'Subject,"):
        reader(path)


@pytest.mark.parametrize("reader, header, sheet_title", [(read_casme2, CASME2_HEADER, None),
                                                        (read_samm, SAMM_HEADER, "MICRO_ONLY")])
def test_bom_and_spaces_are_stripped_from_sheets(tmp_path, reader, header, sheet_title):
    bom = "\ufeff"
    sheet = write_sheet(tmp_path / "coding.xlsx", [bom + header[0], *header[1:-1], f" {header[-1]}{bom} "],
                        [[f"{bom}006", f" {bom}006_1_2 ", 10, 12, 14, f"{bom}Anger "]], sheet_title)
    df = reader(sheet)
    assert df[["clip", "emotion"]].iloc[0].tolist() == ["006_1_2", "Anger"]
    assert not any(bom in str(v) for v in df[["dataset", "subject", "clip", "emotion"]].iloc[0])
