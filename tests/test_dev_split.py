"""The shipped dev splits: dev and fit carved from train, disjoint from each other, from the guard frames and from val;
CamVid's dev made of whole contiguous stretches; a dev list that does not match the data refused in one line."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.data import build_dataset
from fcnseg.data.base import holdout_split
from fcnseg.data.dev import dev_names, guard_names, split_digests
from fcnseg.errors import FcnsegError

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "camvid"


def _frame(name: str) -> tuple[str, int]:
    seq, num = name.rsplit("_", 1)
    return seq, int(re.sub(r"\D", "", num))


def _fake_camvid(root: Path, extra: list[str], drop: str | None = None) -> Path:
    """A CamVid layout whose train folder holds the dev list, the guard frames and ``extra`` (tiny 4x6 images)."""
    names = [n for n in dev_names("camvid") + guard_names("camvid") + extra if n != drop]
    for split, split_names in (("train", names), ("val", ["0016E5_07959"])):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for n in split_names:
            Image.new("RGB", (6, 4)).save(root / split / f"{n}.png")
            Image.fromarray(np.full((4, 6), 3, np.uint8)).save(root / f"{split}annot" / f"{n}.png")
    return root


def test_camvid_dev_and_fit_partition_train_less_the_guard(tmp_path: Path) -> None:
    extra = ["0001TP_006690", "0006R0_f00930", "0016E5_04350"]
    root = _fake_camvid(tmp_path / "camvid", extra)
    dev = build_dataset("camvid", root, "dev")
    fit = build_dataset("camvid", root, "fit")
    assert dev.names == dev_names("camvid") and len(dev.names) == 36
    assert fit.names == sorted(extra)  # the guard frames are in neither
    assert not set(guard_names("camvid")) & (set(dev.names) | set(fit.names))
    assert [p.name for p, _ in dev.files] == [f"{n}.png" for n in dev.names]
    image, mask = dev[0]
    assert tuple(mask.shape) == (4, 6) and int(mask[0, 0]) == 3


def test_a_dev_list_that_does_not_match_the_data_is_refused(tmp_path: Path) -> None:
    root = _fake_camvid(tmp_path / "camvid", [], drop=dev_names("camvid")[5])
    with pytest.raises(FcnsegError, match=r"1 of the 36 dev samples \(e\.g\. '.*'\) are not in its 'train' split"):
        build_dataset("camvid", root, "fit")


def test_camvid_dev_is_whole_stretches_with_one_guard_frame_between_dev_and_fit() -> None:
    dev, guard = dev_names("camvid"), guard_names("camvid")
    by_seq: dict[str, list[int]] = {}
    for n in dev:
        seq, f = _frame(n)
        by_seq.setdefault(seq, []).append(f)
    assert sorted(by_seq) == ["0001TP", "0006R0", "0016E5"]
    for seq, frames in by_seq.items():
        steps = set(np.diff(sorted(frames)).tolist())
        assert steps <= {29, 30, 31}, (seq, steps)  # CamVid's 1 s steps (one frame is 901): one stretch each
        (g,) = [_frame(n)[1] for n in guard if n.startswith(seq)]
        assert min(abs(g - min(frames)), abs(g - max(frames))) in (29, 30, 31)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="the real CamVid (../shared/datasets/camvid) is not here")
def test_on_the_real_camvid_dev_frames_have_no_fit_neighbour_within_a_second() -> None:
    dev = build_dataset("camvid", CAMVID, "dev")
    fit = build_dataset("camvid", CAMVID, "fit")
    val = build_dataset("camvid", CAMVID, "val")
    assert (len(dev.names), len(fit.names)) == (36, 328)
    assert not (set(dev.names) & set(fit.names)) and not (set(dev.names) & set(val.names))
    fit_frames = [_frame(n) for n in fit.names]
    for n in dev.names:
        seq, f = _frame(n)
        assert all(abs(f - g) > 31 for s, g in fit_frames if s == seq), n


def test_siftflow_dev_is_a_tenth_of_trainval_outside_the_val_holdout(tmp_path: Path) -> None:
    dev = dev_names("siftflow")
    assert len(dev) == 249 and len(set(dev)) == 249
    # a stand-in trainval of 2486 names with the dev names at positions the default holdout (0.1, seed 0) leaves
    # in train, as they are in the real list
    val_positions = {int(n) for n in holdout_split([str(i) for i in range(2486)], "val", 0.1, 0)}
    dev_iter, names = iter(dev), []
    for i in range(2486):
        names.append(f"other_{i}" if i in val_positions or len(names) - len(val_positions & set(range(i))) >= 249
                     else next(dev_iter))
    assert sum(n in set(dev) for n in names) == 249
    root = tmp_path / "siftflow"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "trainval.txt").write_text("\n".join(names) + "\n")
    jpg, png = root / "one.jpg", root / "one.png"
    Image.new("RGB", (2, 2)).save(jpg)
    Image.fromarray(np.ones((2, 2), np.uint8)).save(png)
    for n in names:
        (root / "images" / f"{n}.jpg").write_bytes(jpg.read_bytes())
        (root / "labels" / f"{n}.png").write_bytes(png.read_bytes())
    got = {s: build_dataset("siftflow", root, s).names for s in ("train", "val", "dev", "fit")}
    assert got["dev"] == dev
    assert got["fit"] == [n for n in got["train"] if n not in set(dev)] and len(got["fit"]) == 2237 - 249
    assert not set(got["val"]) & set(dev)
    # another holdout seed moves dev samples into val: refused, not silently shrunk
    with pytest.raises(FcnsegError, match=r"dev samples .* are not in its 'train' split here"):
        build_dataset("siftflow", root, "fit", seed=1)


def test_the_digests_name_each_shipped_list() -> None:
    digests = split_digests("camvid")
    assert set(digests) == {"camvid_dev.txt", "camvid_guard.txt"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests.values())
    with pytest.raises(FcnsegError, match="voc has no shipped dev split; datasets with one: camvid, siftflow"):
        split_digests("voc")
