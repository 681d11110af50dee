"""HHA on a synthetic room rendered to depth with known intrinsics and camera pose: gravity within
1 degree, heights within 2 cm (median; 5 cm at the 99th percentile), angles within 2 degrees away from
edges; the uint8 scaling; and the content-keyed cache."""
from __future__ import annotations

import numpy as np
import pytest

from fcnseg.data.hha import back_project, cached_hha, estimate_gravity, hha, hha_geometry, surface_normals
from fcnseg.errors import FcnsegError

K = (200.0, 200.0, 79.5, 59.5)  # fx, fy, cx, cy of a 160 x 120 camera
CAMERA_HEIGHT = 1.4
BOX = ((0.2, 0.0, 2.6), (0.9, 0.55, 3.3))  # (min x, y, z), (max x, y, z) in world metres, y up


def _rotation(pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Camera-to-world rotation: camera x right, y down, z forward; world y up; pitched down, then rolled."""
    base = np.diag([1.0, -1.0, 1.0])  # a level camera
    p, r = -np.radians(pitch_deg), np.radians(roll_deg)
    pitch = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])  # nose down
    roll = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return pitch @ roll @ base


def render_room(pitch: float = 20.0, roll: float = 4.0, size=(120, 160)):
    """Depth (metres), world height of every pixel's point, and the true up vector in the camera frame.

    A floor (y = 0), a back wall (z = 5), side walls (x = -2, x = 2.5), a ceiling (y = 2.8) and a box
    standing on the floor."""
    h, w = size
    fx, fy, cx, cy = K
    v, u = np.mgrid[:h, :w].astype(np.float64)
    rays_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)  # z = 1: t is the depth
    rot = _rotation(pitch, roll)
    rays = rays_cam @ rot.T
    centre = np.array([0.0, CAMERA_HEIGHT, 0.0])
    best = np.full((h, w), np.inf)
    planes = [(1, 0.0), (1, 2.8), (2, 5.0), (0, -2.0), (0, 2.5)]  # (axis, value)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, value in planes:
            t = (value - centre[axis]) / rays[..., axis]
            best = np.where((t > 0) & (t < best), t, best)
        lo, hi = np.array(BOX[0]), np.array(BOX[1])
        t1, t2 = (lo - centre) / rays, (hi - centre) / rays
        near = np.minimum(t1, t2).max(-1)
        far = np.maximum(t1, t2).min(-1)
        hit = (near <= far) & (near > 0)
        best = np.where(hit & (near < best), near, best)
    height = centre[1] + best * rays[..., 1]
    up_cam = rot.T @ np.array([0.0, 1.0, 0.0])
    return best, height, up_cam


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


@pytest.mark.parametrize("pitch,roll", [(20.0, 4.0), (10.0, -8.0), (27.0, 0.0)])
def test_gravity_height_and_angle_of_a_known_room(pitch, roll):
    depth, true_height, up = render_room(pitch, roll)
    geo = hha_geometry(depth, K)
    assert _angle(geo.gravity, up) < 1.0
    err = np.abs(geo.height - true_height)
    assert np.median(err) < 0.02 and np.quantile(err, 0.99) < 0.05
    # angles: horizontal surfaces (floor, box top, ceiling) 0 or 180, walls and box sides 90
    true_normals = surface_normals(back_project(depth, K))[0]
    interior = geo.valid.copy()
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    true_angle = np.degrees(np.arccos(np.clip(true_normals @ up, -1, 1)))
    floor = interior & (true_height < 0.01)
    box_top = interior & (np.abs(true_height - BOX[1][1]) < 0.01) & (np.abs(true_angle) < 5)
    assert floor.sum() > 500 and box_top.sum() > 20
    assert np.quantile(geo.angle[floor], 0.95) < 2.0 and np.quantile(geo.angle[box_top], 0.95) < 2.0
    walls = interior & (np.abs(true_angle - 90) < 5)
    assert walls.sum() > 500 and np.quantile(np.abs(geo.angle[walls] - 90), 0.95) < 2.0


def test_the_first_guess_is_corrected():
    """A camera rolled by 30 degrees: the initial 'camera up' is far off, the estimate is not."""
    depth, _, up = render_room(15.0, 30.0)
    normals, valid = surface_normals(back_project(depth, K))
    assert _angle(np.array([0.0, -1.0, 0.0]), up) > 25
    assert _angle(estimate_gravity(normals, valid), up) < 1.0


def test_hha_channels_are_scaled_like_the_released_images():
    depth, true_height, _ = render_room()
    depth[10:14, 20:30] = 0  # a hole: no measurement
    image = hha(depth, K)
    assert image.dtype == np.uint8 and image.shape == (*depth.shape, 3)
    assert (image[10:14, 20:30] == 0).all()
    has = depth > 0
    disparity = np.clip(np.rint(31000 / np.maximum(depth * 100, 100)), 0, 255)
    assert np.abs(image[..., 0][has].astype(int) - disparity[has]).max() <= 0
    floor = has & (true_height < 0.01)
    assert np.median(image[..., 1][floor]) <= 2  # centimetres above the floor
    assert abs(int(np.median(image[..., 2][floor])) - 38) <= 2  # 0 degrees + 38


def test_bad_depth_and_intrinsics_are_one_line_errors():
    with pytest.raises(FcnsegError, match="negative or non-finite"):
        hha(np.full((8, 8), np.nan), K)
    with pytest.raises(FcnsegError, match="intrinsics"):
        hha(np.ones((8, 8)), (0, 1, 2, 3))
    with pytest.raises(FcnsegError, match=r"\(H, W\)"):
        hha(np.ones((8, 8, 3)), K)
    with pytest.raises(FcnsegError, match="too few"):
        hha(np.zeros((8, 8)), K)


def test_cache_is_keyed_by_the_files_content(tmp_path):
    from PIL import Image

    depth, _, _ = render_room(size=(60, 80))
    path = tmp_path / "d.png"
    Image.fromarray((depth * 1000).astype(np.uint16)).save(path)
    cache = tmp_path / "cache"
    k2 = (100.0, 100.0, 39.5, 29.5)
    first = cached_hha(path, cache, k2)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".png"
    assert np.array_equal(cached_hha(path, cache, k2), first)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(entries[0])  # tamper: the cache is what is returned
    assert cached_hha(path, cache, k2).shape == (4, 4, 3)
    Image.fromarray((depth * 1000 + 10).astype(np.uint16)).save(path)  # new content: a new entry
    second = cached_hha(path, cache, k2)
    assert len(list(cache.iterdir())) == 2 and second.shape == first.shape
    assert not list(cache.glob(".*"))  # atomic writes leave no temporaries


def _nyud_layout(root, n: int = 2):
    """Small synthetic RGB-D frames in the NYUDv2 layout: rendered rooms, random colours and labels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    names = [f"{i + 1:04d}" for i in range(n)]
    for sub in ("image", "depth", "label40"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        depth, _, _ = render_room(15.0 + 5 * i, 2.0, size=(60, 80))
        Image.fromarray((depth * 1000).astype(np.uint16)).save(root / "depth" / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / "image" / f"{name}.png")
        Image.fromarray(rng.integers(0, 41, (60, 80), dtype=np.uint8)).save(root / "label40" / f"{name}.png")
    (root / "train.txt").write_text("\n".join(names) + "\n")
    (root / "test.txt").write_text(names[0] + "\n")
    return root


def test_nyudv2_yields_hha_and_rgb_hha_from_the_cache(tmp_path):
    import torch
    from PIL import Image

    from fcnseg.record import IMAGENET_MEAN, IMAGENET_STD
    from fcnseg.data import build_dataset
    from fcnseg.data.io import read_depth

    root = _nyud_layout(tmp_path / "nyud")
    cache, k = tmp_path / "hha", (100.0, 100.0, 39.5, 29.5)
    rgb = build_dataset("nyudv2", root, "train")
    ds = build_dataset("nyudv2", root, "train", modality="hha", hha_cache=cache, intrinsics=k)
    image, mask = ds[1]
    assert image.shape == (3, 60, 80) and mask.shape == (60, 80) and len(list(cache.iterdir())) == 1
    expected = hha(render_room(20.0, 2.0, size=(60, 80))[0], k)
    depth_read = hha(read_depth(root / "depth" / "0002.png"), k)
    assert np.array_equal(np.asarray(Image.open(next(cache.iterdir()))), depth_read)
    # the file holds whole millimetres: that rounding tilts a few finite-difference normals, nothing else
    diff = np.abs(depth_read.astype(int) - expected.astype(int))
    assert np.median(diff) <= 1 and np.quantile(diff, 0.95) <= 3
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image, (torch.from_numpy(depth_read).permute(2, 0, 1).float() / 255 - mean) / std)
    both = build_dataset("nyudv2", root, "train", modality="rgbhha", hha_cache=cache, intrinsics=k)
    six, _ = both[1]
    assert six.shape == (6, 60, 80) and len(both.mean) == 6
    torch.testing.assert_close(six[:3], rgb[1][0])
    torch.testing.assert_close(six[3:], image)
    assert len(list(cache.iterdir())) == 1  # the entry is reused across modalities
    both[0]
    assert len(list(cache.iterdir())) == 2  # one entry per depth file


def test_nyudv2_refuses_unknown_modalities(tmp_path):
    from fcnseg.data import build_dataset

    with pytest.raises(FcnsegError, match="valid: rgb, rgbd, hha, rgbhha"):
        build_dataset("nyudv2", _nyud_layout(tmp_path / "nyud", 1), "train", modality="hhx")
