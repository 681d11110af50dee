"""The folder dataset: ignore/void value mapping, explicit split lists, split messages, and ``data check`` weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.data import build_dataset
from fcnseg.data.folder import split_source
from fcnseg.errors import FcnsegError

H, W = 6, 8


def make_folder(root: Path, n: int = 4, values=(0, 1, 2, 11), classes="a\nb\nc\n") -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        ids = np.array(values, dtype=np.uint8)[np.arange(H * W).reshape(H, W) % len(values)]
        Image.fromarray(ids).save(root / "masks" / f"s{i}.png")
    (root / "classes.txt").write_text(classes)
    return root


def test_void_value_is_refused_then_mapped_by_kwarg_or_classes_txt(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(FcnsegError, match="mask values 11 are outside"):
        build_dataset("folder", root, "all").load(0)
    ds = build_dataset("folder", root, "all", ignore_value=11)
    mask = np.asarray(ds.load(0)[1])
    assert ds.classes == ["a", "b", "c"]
    assert set(np.unique(mask)) == {0, 1, 2, 255} and (mask == 255).sum() == H * W // 4

    (root / "classes.txt").write_text("a\nb\nc\nignore_value: 11\n")
    np.testing.assert_array_equal(np.asarray(build_dataset("folder", root, "all").load(0)[1]), mask)
    with pytest.raises(FcnsegError, match="disagrees with 'ignore_value: 11'"):
        build_dataset("folder", root, "all", ignore_value=10)
    with pytest.raises(FcnsegError, match="ignore_value 1 is class 'b'"):
        (root / "classes.txt").write_text("a\nb\nc\n")
        build_dataset("folder", root, "all", ignore_value=1)


def test_explicit_split_lists_and_the_split_source(tmp_path):
    root = make_folder(tmp_path / "d", values=(0, 1))
    held = build_dataset("folder", root, "val")
    assert len(held) == 1 and "automatic 10% val part" in held.split_source
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("s0\ns2\n")
    (root / "splits" / "val.txt").write_text("s3\n")
    assert build_dataset("folder", root, "train").names == ["s0", "s2"]
    val = build_dataset("folder", root, "val")
    assert val.names == ["s3"] and val.split_source == str(root / "splits" / "val.txt")
    assert split_source(root, "train") == str(root / "splits" / "train.txt")
    with pytest.raises(FcnsegError, match="valid splits: train, val"):
        build_dataset("folder", root, "all")


def test_check_says_the_split_and_writes_weights_only_when_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "d")
    args = ["data", "check", "--dataset", "folder", "--root", str(root), "--split", "train", "--no-progress"]
    assert main(args + ["--ignore-value", "11"]) == 0
    out = capsys.readouterr().out
    assert "scanning split 'train' of folder (automatic 90% train part" in out
    assert list(tmp_path.glob("*.json")) == []
    assert main(args + ["--ignore-value", "11", "--weights-json", str(tmp_path / "w.json")]) == 0
    assert (tmp_path / "w.json").is_file()

    # every pair bad: problems listed, no all-zero weights file
    assert main(args + ["--weights-json", str(tmp_path / "bad.json")]) == 1
    captured = capsys.readouterr()
    assert "mask values 11 are outside" in captured.out
    assert "no class weights written" in captured.err and not (tmp_path / "bad.json").exists()


# ---- training a folder dataset: the defaults, --ignore-value, the VGG warning ---------------------------

def test_train_defaults_are_the_cpu_recipe_and_ignore_value_reaches_the_dataset(tmp_path, capsys):
    assert main(["train", "--dataset", "folder", "--root", str(tmp_path), "--ignore-value", "11",
                 "--print-config"]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"] == "fcn8s_efficientnet_lite0" and cfg["pretrained"] is True
    assert cfg["crop_size"] == [384, 384] and cfg["epochs"] == 15
    assert cfg["dataset_kwargs"] == {"ignore_value": 11}


def test_an_untrained_vgg_warns_once(tmp_path, capsys):
    args = ["train", "--dataset", "folder", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]
    assert main(args + ["--model", "fcn8s_vgg16"]) == 1  # the missing root stops it after the warning
    err = capsys.readouterr().err
    assert err.count("fcnseg: warning: fcn8s_vgg16 from random weights") == 1
    assert "no such dataset directory" in err
    assert main(args + ["--model", "fcn8s_vgg16", "--pretrained"]) == 1
    assert "warning" not in capsys.readouterr().err
