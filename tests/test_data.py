"""Datasets on tiny files the tests write: every layout, the paired transforms' alignment, each bad file,
the ``fcnseg data check`` command and class weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.record import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.cli import main
from fcnseg.data import DataFileError, build_dataset, build_transforms, list_datasets
from fcnseg.data.base import IGNORE_INDEX
from fcnseg.data.checks import check_dataset, load_class_weights, median_frequency_weights
from fcnseg.errors import FcnsegError

H, W = 12, 16
RNG = np.random.default_rng(0)


def save_rgb(path: Path, h: int = H, w: int = W, **kw) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **kw)
    return arr


def save_ids(path: Path, values, h: int = H, w: int = W) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.choice(np.asarray(values, dtype=np.uint8), size=(h, w))
    Image.fromarray(arr).save(path)
    return arr


def make_camvid(root: Path, n: int = 3) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            save_rgb(root / split / f"f{i}.png")
            save_ids(root / f"{split}annot" / f"f{i}.png", [0, 3, 10, 11])
    return root


def make_siftflow(root: Path, n: int = 20) -> Path:
    names = [f"scene_{i}" for i in range(n)]
    for name in names:
        save_rgb(root / "images" / f"{name}.jpg")
        save_ids(root / "labels" / f"{name}.png", [0, 1, 33])
    (root / "trainval.txt").write_text("\n".join(names[:-2]) + "\n")
    (root / "test.txt").write_text("\n".join(names[-2:]) + "\n")
    return root


# ---- layouts ---------------------------------------------------------------------------------------------

def test_registry_lists_every_family():
    assert list_datasets() == ["camvid", "camvid32", "folder", "nyudv2", "siftflow", "voc"]
    with pytest.raises(FcnsegError, match="valid names: camvid"):
        build_dataset("cityscapes", ".", "train")


def test_camvid_layout_and_contract(tmp_path):
    root = make_camvid(tmp_path)
    ds = build_dataset("camvid", root, "train")
    assert len(ds) == 3 and ds.names == ["f0", "f1", "f2"] and ds.num_classes == 11
    assert ds.classes[0] == "Sky" and ds.colors[3] == [128, 64, 128] and ds.ignore_index == 255
    assert ds.files[0] == (root / "train" / "f0.png", root / "trainannot" / "f0.png")
    image, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    raw = np.asarray(Image.open(root / "trainannot" / "f0.png"))
    assert torch.equal(mask, torch.from_numpy(np.where(raw == 11, 255, raw).astype(np.int64)))
    pixels = np.asarray(Image.open(root / "train" / "f0.png")).astype(np.float32) / 255
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, expected)
    with pytest.raises(FcnsegError, match="valid splits: train, val, test"):
        build_dataset("camvid", root, "trainval")


def test_camvid32_colour_labels(tmp_path):
    colors = {"Animal": (64, 128, 64), "Road": (128, 64, 128), "Void": (0, 0, 0)}
    (tmp_path / "class_dict.csv").write_text("name,r,g,b\n" + "".join(f"{k},{r},{g},{b}\n" for k, (r, g, b) in colors.items()))
    save_rgb(tmp_path / "train" / "0001.png")
    pick = RNG.integers(0, 3, (H, W))
    table = np.array(list(colors.values()), dtype=np.uint8)
    (tmp_path / "train_labels").mkdir()
    Image.fromarray(table[pick]).save(tmp_path / "train_labels" / "0001_L.png")
    ds = build_dataset("camvid32", tmp_path, "train")
    assert ds.classes == ["Animal", "Road"] and ds.colors == [[64, 128, 64], [128, 64, 128]]
    _, mask = ds[0]
    assert torch.equal(mask, torch.from_numpy(np.array([0, 1, 255])[pick]))


def test_siftflow_splits_are_deterministic_and_disjoint(tmp_path):
    root = make_siftflow(tmp_path)
    trainval = build_dataset("siftflow", root, "trainval")
    train, val = build_dataset("siftflow", root, "train"), build_dataset("siftflow", root, "val")
    assert len(trainval) == 18 and len(val) == 2 and len(train) == 16
    assert set(train.names) | set(val.names) == set(trainval.names) and not set(train.names) & set(val.names)
    assert build_dataset("siftflow", root, "val").names == val.names  # same seed, same split
    assert build_dataset("siftflow", root, "test").names == ["scene_18", "scene_19"]
    (tmp_path / "mine.txt").write_text("scene_3\n")
    assert build_dataset("siftflow", root, "custom", split_list=tmp_path / "mine.txt").names == ["scene_3"]
    _, mask = trainval[0]
    raw = np.asarray(Image.open(root / "labels" / "scene_0.png")).astype(np.int64)
    assert torch.equal(mask, torch.from_numpy(np.where(raw == 0, 255, raw - 1)))
    assert trainval.num_classes == 33 and trainval.classes[0] == "awning"


def test_voc_and_sbd_with_paper_splits(tmp_path):
    from scipy.io import savemat

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    names = ["2007_000001", "2007_000002", "2007_000003"]
    palette = Image.new("P", (1, 1))
    from fcnseg.record import default_palette
    palette.putpalette([c for rgb in default_palette(256) for c in rgb])
    for n in names:
        save_rgb(voc / "JPEGImages" / f"{n}.jpg")
        ids = RNG.choice(np.array([0, 15, 20, 255], np.uint8), (H, W))
        (voc / "SegmentationClass").mkdir(exist_ok=True)
        p = Image.fromarray(ids).convert("P")  # a real palette PNG whose indices are the class ids
        p.putpalette(palette.getpalette())
        p.save(voc / "SegmentationClass" / f"{n}.png")
    (sets / "train.txt").write_text(names[0] + "\n")
    (sets / "val.txt").write_text("\n".join(names[1:]) + "\n")
    # VOC2011 val (2 images) minus SBD train (1 of them) = seg11valid
    sets11 = tmp_path / "VOCdevkit" / "VOC2011" / "ImageSets" / "Segmentation"
    sets11.mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2011" / "JPEGImages").mkdir()
    (sets11 / "val.txt").write_text("\n".join(names[1:]) + "\n")
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    save_rgb(sbd / "img" / "2007_000002.jpg")
    seg = RNG.choice(np.array([0, 1, 20], np.uint8), (H, W))
    savemat(sbd / "cls" / "2007_000002.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1)}})
    (sbd / "train.txt").write_text("2007_000002\n")
    (sbd / "val.txt").write_text("")

    val = build_dataset("voc", tmp_path, "val")
    assert val.names == names[1:] and val.num_classes == 21 and val.classes[15] == "person"
    _, mask = val[0]
    raw = np.asarray(Image.open(voc / "SegmentationClass" / f"{names[1]}.png"))
    assert torch.equal(mask, torch.from_numpy(raw.astype(np.int64)))
    sbd_train = build_dataset("voc", tmp_path, "sbd_train")
    _, mask = sbd_train[0]
    assert torch.equal(mask, torch.from_numpy(seg.astype(np.int64)))
    seg11 = build_dataset("voc", tmp_path, "seg11valid", skip_bad=True)
    assert seg11.names == ["2007_000003"]


def test_nyudv2_rgb_and_rgbd(tmp_path):
    for n in ("0001", "0002"):
        save_rgb(tmp_path / "image" / f"{n}.png")
        save_ids(tmp_path / "label40" / f"{n}.png", [0, 1, 40])
        (tmp_path / "depth").mkdir(exist_ok=True)
        Image.fromarray(np.full((H, W), 2800, np.uint16)).save(tmp_path / "depth" / f"{n}.png")
    (tmp_path / "train.txt").write_text("0001\n0002\n")
    (tmp_path / "test.txt").write_text("0002\n")
    rgb = build_dataset("nyudv2", tmp_path, "train")
    image, mask = rgb[0]
    assert image.shape == (3, H, W) and rgb.num_classes == 40 and set(mask.unique().tolist()) <= {0, 39, 255}
    rgbd = build_dataset("nyudv2", tmp_path, "train", modality="rgbd")
    image, mask = rgbd[0]
    assert image.shape == (4, H, W) and len(rgbd.mean) == 4
    torch.testing.assert_close(image[3], torch.zeros(H, W))  # 2.8 m is the depth mean
    torch.testing.assert_close(image[:3], rgb[0][0])
    train = build_transforms("nyudv2", True, crop_size=(8, 8), mean=rgbd.mean, std=rgbd.std)
    image, mask = train(*rgbd.load(0))
    assert image.shape == (4, 8, 8) and mask.shape == (8, 8)


@pytest.mark.parametrize("mode", ["ids", "palette", "rgb"])
def test_folder_layout(tmp_path, mode):
    lines = ["void 0 0 0", "cat 255 0 0", "dog 0 0 255"] if mode == "rgb" else ["void", "cat", "dog"]
    (tmp_path / "classes.txt").write_text("\n".join(lines) + "\n")
    raw = RNG.choice(np.array([0, 1, 2], np.uint8), (H, W))
    for stem in ("a", "b"):
        save_rgb(tmp_path / "images" / f"{stem}.jpg")
        (tmp_path / "masks").mkdir(exist_ok=True)
        if mode == "rgb":
            Image.fromarray(np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)[raw]).save(tmp_path / "masks" / f"{stem}.png")
        elif mode == "palette":
            p = Image.fromarray(raw).convert("P")
            p.putpalette([0, 0, 0, 10, 200, 10, 200, 10, 10] + [0] * 759)
            p.save(tmp_path / "masks" / f"{stem}.png")
        else:
            Image.fromarray(raw).save(tmp_path / "masks" / f"{stem}.png")
    ds = build_dataset("folder", tmp_path, "all")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2 and ds.names == ["a", "b"]
    _, mask = ds[0]
    assert torch.equal(mask, torch.from_numpy(np.array([255, 0, 1])[raw]))
    assert len(build_dataset("folder", tmp_path, "val")) == 1
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("b\n")
    assert build_dataset("folder", tmp_path, "train").names == ["b"]
    with pytest.raises(FcnsegError, match="valid splits: train"):
        build_dataset("folder", tmp_path, "val")


def test_folder_rgb_mask_with_unknown_colours(tmp_path):
    (tmp_path / "classes.txt").write_text("cat 255 0 0\ndog 0 0 255\n")
    save_rgb(tmp_path / "images" / "a.png")
    mask = np.zeros((H, W, 3), np.uint8)
    mask[..., 0] = 255
    mask[0, :3] = [1, 2, 3]
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DataFileError, match=r"a.png: RGB colours \(1, 2, 3\) are not in the class table \(3 pixels\)"):
        build_dataset("folder", tmp_path, "all")[0]
    (tmp_path / "classes.txt").write_text("cat 255 0 0\ndog\n")
    with pytest.raises(FcnsegError, match="colour on every line or on none"):
        build_dataset("folder", tmp_path, "all")


# ---- transforms ------------------------------------------------------------------------------------------

def block_pair(h: int = 60, w: int = 80, block: int = 10):
    """An image whose colour says its class, and the mask drawn from it."""
    table = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10], [10, 250, 250]], np.uint8)
    ids = RNG.integers(0, len(table), (h // block, w // block)).repeat(block, 0).repeat(block, 1).astype(np.uint8)
    return Image.fromarray(table[ids]), Image.fromarray(ids), table


def classes_from_image(image: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    rgb = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    dist = ((rgb[None] * 255 - torch.from_numpy(table).float()[:, :, None, None]) ** 2).sum(1)
    return dist.argmin(0)


@pytest.mark.parametrize("seed", range(6))
def test_train_transforms_keep_mask_aligned(seed):
    torch.manual_seed(seed)
    image, mask, table = block_pair()
    t = build_transforms("folder", True, crop_size=(48, 64), scale_range=(0.5, 2.0), jitter=0.0)
    x, y = t(image, mask)
    assert x.shape == (3, 48, 64) and y.shape == (48, 64) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4, 255}  # nearest neighbour only: no blended ids
    labelled = y != 255
    # away from block edges (where bilinear blends colours) the image's colour must name the mask's class
    m = y.float()[None, None]
    interior = (torch.nn.functional.max_pool2d(m, 3, 1, 1) == -torch.nn.functional.max_pool2d(-m, 3, 1, 1))[0, 0]
    interior &= labelled
    assert interior.sum() > 200
    assert torch.equal(classes_from_image(x, table)[interior], y[interior])
    if (~labelled).any():  # padding: ignore in the mask, black (fill 0) in the image
        black = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(x[:, ~labelled].mean(1), black, atol=1e-3, rtol=0)


def test_flip_and_jitter_are_paired_exactly():
    image, mask, table = block_pair()
    t = build_transforms("camvid", True, crop_size=(60, 80), scale_range=(1.0, 1.0), jitter=0.3)
    for seed in range(4):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        flipped = torch.equal(y, torch.from_numpy(np.array(mask)[:, ::-1].copy()).long())
        assert flipped or torch.equal(y, torch.from_numpy(np.array(mask)).long())
        # jitter changes colours but never which class a block shows (the blocks are far apart in colour)
        assert (classes_from_image(x, table) == y).float().mean() > 0.9


def test_the_training_crop_pads_masks_with_the_ignore_index_and_images_with_zero():
    image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    mask = Image.fromarray(np.ones((20, 30), np.uint8))
    t = build_transforms("folder", train=True, crop_size=(40, 50), scale_range=(1.0, 1.0), flip=False, jitter=0)
    x, m = t(image, mask)
    assert x.shape == (3, 40, 50) and m.shape == (40, 50)
    assert int((m == 1).sum()) == 20 * 30 and int((m == IGNORE_INDEX).sum()) == 40 * 50 - 20 * 30
    pad = m == IGNORE_INDEX
    black = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, pad], black[:, None].expand(3, int(pad.sum())))


def test_eval_preset_keeps_resolution_and_presets_exist():
    image, mask, _ = block_pair(37, 53, 1)
    x, y = build_transforms("voc", False)(image, mask)
    assert x.shape == (3, 37, 53) and torch.equal(y, torch.from_numpy(np.array(mask)).long())
    for name in list_datasets():
        build_transforms(name, True)
    with pytest.raises(FcnsegError, match="no transform preset"):
        build_transforms("nope", True)


def test_camvid_train_preset_defaults():
    image, mask, _ = block_pair(360, 480, 40)
    x, y = build_transforms("camvid", True)(image, mask)
    assert x.shape == (3, 360, 480) and y.shape == (360, 480)


# ---- bad files -------------------------------------------------------------------------------------------

@pytest.fixture
def data_bad_camvid(tmp_path):
    return make_bad_camvid(tmp_path / "camvid")


def make_bad_camvid(root: Path) -> Path:
    """A CamVid folder with one file of every bad kind (plus two good pairs)."""
    root = make_camvid(root, n=2)
    tr, an = root / "train", root / "trainannot"
    (tr / "empty.png").write_bytes(b"")
    save_ids(an / "empty.png", [0])
    buf = (tr / "f0.png").read_bytes()
    (tr / "trunc.png").write_bytes(buf[: len(buf) // 2])
    save_ids(an / "trunc.png", [0])
    save_rgb(tr / "trunc_jpeg.png", 64, 64, format="JPEG")
    jbuf = (tr / "trunc_jpeg.png").read_bytes()
    (tr / "trunc_jpeg.png").write_bytes(jbuf[: len(jbuf) * 2 // 3])
    save_ids(an / "trunc_jpeg.png", [0], 64, 64)
    (tr / "garbage.png").write_bytes(b"this is not an image at all")
    save_ids(an / "garbage.png", [0])
    save_rgb(tr / "size.png")
    save_ids(an / "size.png", [0], H + 1, W)
    save_rgb(tr / "values.png")
    save_ids(an / "values.png", [0, 12, 200])
    save_rgb(tr / "colour.png")
    Image.fromarray(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(an / "colour.png")
    save_rgb(tr / "nomask.png")
    save_ids(an / "noimage.png", [0])
    return root


EXPECTED_LINES = {
    "empty.png": "empty image file (0 bytes)",
    "trunc.png": "image",  # Pillow says "truncated" or "broken PNG" depending on where the cut falls
    "trunc_jpeg.png": "truncated image",
    "garbage.png": "unreadable image",
    "size.png": f"image is {W}x{H} but its mask",
    "values.png": "mask values 12, 200 are outside the classes and ignore index (valid values: 0-11, 255)",
    "colour.png": "colour image; camvid expects single-channel class ids",
    "nomask.png": "missing mask for sample 'nomask'",
    "noimage.png": "mask has no image",
}


def test_each_bad_file_is_one_line_naming_it(data_bad_camvid):
    ds = build_dataset("camvid", data_bad_camvid, "train", skip_bad=True)
    report = check_dataset(ds)
    assert report.good == 2 and len(report.problems) == len(EXPECTED_LINES)
    for name, text in EXPECTED_LINES.items():
        hits = [p for p in report.problems if Path(p.split(": ", 1)[0]).name == name]
        assert len(hits) == 1 and text in hits[0] and "\n" not in hits[0], (name, hits)
    assert report.counts_by_kind()["missing"] == 2


def test_bad_file_stops_training_unless_skipped(data_bad_camvid):
    with pytest.raises(DataFileError, match=r"noimage.png: mask has no image .* \(and 1 more problems\).*skip_bad=True"):
        build_dataset("camvid", data_bad_camvid, "train")
    ds = build_dataset("camvid", data_bad_camvid, "train", skip_bad=True)
    strict = build_dataset("camvid", data_bad_camvid, "train", skip_bad=True)
    strict.skip_bad = False
    bad = ds.names.index("values")
    with pytest.raises(DataFileError, match=r"values.png: mask values 12, 200"):
        strict[bad]
    with pytest.warns(UserWarning, match="skipped bad sample"):
        image, mask = ds[bad]
    assert image.shape == (3, H, W) and len(ds.skipped) >= 1


def test_bad_file_in_a_worker_gives_the_same_one_line_error(data_bad_camvid):
    ds = build_dataset("camvid", data_bad_camvid, "train", skip_bad=True)
    ds.skip_bad = False
    ds.files, ds.names = [ds.files[ds.names.index("size")]], ["size"]
    batches = iter(torch.utils.data.DataLoader(ds, num_workers=1, multiprocessing_context="fork"))
    try:
        with pytest.raises(DataFileError) as info:
            next(batches)
    finally:
        batches._shutdown_workers()  # else a later garbage collection waits 5 s for the worker
    assert str(info.value).endswith(f"size.png: image is {W}x{H} but its mask "
                                    f"{data_bad_camvid}/trainannot/size.png is {W}x{H + 1} (after EXIF orientation)")
    assert "\n" not in str(info.value)


def test_exif_orientation_is_applied_before_the_size_check(tmp_path):
    root = make_camvid(tmp_path, n=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: W x H on disk, H x W upright
    Image.fromarray(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "train" / "rot.jpg", exif=exif)
    save_ids(root / "trainannot" / "rot.png", [0], h=W, w=H)
    ds = build_dataset("camvid", root, "train")
    image, mask = ds[ds.names.index("rot")]
    assert image.shape == (3, W, H) and mask.shape == (W, H)


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    root = make_camvid(tmp_path, n=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(DataFileError, match="f0.png: image refused by Pillow's decompression-bomb limit.*MAX_IMAGE_PIXELS"):
        build_dataset("camvid", root, "train")[0]


def test_truncated_images_are_never_accepted(tmp_path, monkeypatch):
    from PIL import ImageFile

    root = make_camvid(tmp_path, n=1)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(FcnsegError, match="LOAD_TRUNCATED_IMAGES"):
        build_dataset("camvid", root, "train")[0]


# ---- fcnseg data check -----------------------------------------------------------------------------------

def test_check_command_clean_and_dirty(tmp_path, data_bad_camvid, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = make_camvid(tmp_path / "clean", n=2)
    assert main(["data", "check", "--dataset", "camvid", "--root", str(clean), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "checked 2 pairs of camvid val: 2 good, 0 problems" in out
    assert "class weights (median frequency): " in out
    assert list(tmp_path.glob("*.json")) == []  # nothing written unless asked
    assert main(["data", "check", "--dataset", "camvid", "--root", str(clean), "--split", "val",
                 "--weights-json", str(tmp_path / "cw.json")]) == 0
    written = json.loads((tmp_path / "cw.json").read_text())
    assert written["classes"][0] == "Sky" and len(written["class_weights"]) == 11
    assert load_class_weights(tmp_path / "cw.json", written["classes"]) == written["class_weights"]

    code = main(["data", "check", "--dataset", "camvid", "--root", str(data_bad_camvid), "--split", "train",
                 "--weights-json", str(tmp_path / "w.json")])
    out = capsys.readouterr().out
    assert code == 1 and (tmp_path / "w.json").is_file()
    lines = out.splitlines()
    assert sum(1 for ln in lines if ": " in ln and str(data_bad_camvid) in ln.split(": ", 1)[0]) == len(EXPECTED_LINES)
    assert f"{len(EXPECTED_LINES)} problems" in out and "Traceback" not in out

    assert main(["data", "check", "--dataset", "camvid", "--root", str(tmp_path / "nowhere"), "--split", "train"]) == 1
    assert "no such dataset directory" in capsys.readouterr().err


def test_median_frequency_weights_by_hand():
    # class 0: 30 px in images totalling 100 px; class 1: 10 px in 50 px; class 2: 5 px in 50; class 3: absent
    weights = median_frequency_weights(np.array([30, 10, 5, 0]), np.array([100, 50, 50, 0]))
    freq = [0.3, 0.2, 0.1]
    assert weights == pytest.approx([0.2 / f for f in freq] + [0.0])
