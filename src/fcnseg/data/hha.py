"""HHA depth encoding (Gupta et al., ECCV 2014): horizontal disparity, height above ground, angle with gravity.

From a depth map (metres, 0 = no measurement) and pinhole intrinsics:

1. back-project every pixel to a camera-frame point (x right, y down, z forward);
2. surface normals from the two tangents, each a one-sided difference taken on the side with the
   smaller depth step, so that normals at an occlusion edge belong to the surface they lie on;
   oriented towards the camera;
3. gravity as Gupta et al. (CVPR 2013, used by the ECCV 2014 HHA paper) estimate it: start from the
   camera's up axis; repeatedly take the normals within ``d`` degrees of parallel to the current
   estimate (floors, table tops, ceilings) and those within ``d`` of perpendicular (walls), and pick
   the direction most aligned with the first set and most perpendicular to the second (the
   eigenvector of the smallest eigenvalue of ``sum_perp n n^T - sum_par n n^T``); ``d`` = 45 degrees
   for 5 iterations, then 15 degrees for 5;
4. height of every point above the lowest point along gravity, and the angle between its normal and
   the gravity (up) direction.

``hha()`` scales the channels to 0-255 as Gupta et al.'s released HHA images do: disparity
``31000 / max(depth_cm, 100)``, height in centimetres, angle in degrees + 38 (so -38..217 fits); all
clipped to 0..255. Pixels without depth (and without a normal) are 0 in every channel. Depth is used
as measured: no hole filling, no smoothing (Gupta et al. fill holes first; do that before calling).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FcnsegError

#: Kinect intrinsics of the NYU Depth v2 toolbox (fx, fy, cx, cy), for its 640 x 480 frames
NYUDV2_INTRINSICS = (518.857901, 519.469611, 325.582449, 253.736166)
#: bump when the encoding changes, so that cached HHA images are recomputed
HHA_VERSION = 1


@dataclass(frozen=True)
class HHAGeometry:
    """The float quantities behind an HHA image, all (H, W) except ``gravity`` (3,), camera frame."""

    points: np.ndarray  # (H, W, 3) metres
    normals: np.ndarray  # (H, W, 3) unit, towards the camera; 0 where invalid
    valid: np.ndarray  # (H, W) bool: depth and a normal
    gravity: np.ndarray  # (3,) unit "up" vector
    height: np.ndarray  # (H, W) metres above the lowest valid point
    angle: np.ndarray  # (H, W) degrees between normal and up


def _check_depth(depth: np.ndarray, intrinsics) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2 or min(depth.shape) < 3:
        raise FcnsegError(f"depth map must be (H, W) with H, W >= 3; got shape {depth.shape}")
    if len(intrinsics) != 4 or not all(np.isfinite(v) for v in intrinsics) or intrinsics[0] <= 0 or intrinsics[1] <= 0:
        raise FcnsegError(f"intrinsics must be (fx, fy, cx, cy) with positive focal lengths; got {tuple(intrinsics)}")
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise FcnsegError("depth map has negative or non-finite values; use metres with 0 for no measurement")
    return depth


def back_project(depth: np.ndarray, intrinsics) -> np.ndarray:
    """(H, W, 3) camera-frame points in metres: x right, y down, z forward (depth)."""
    depth = _check_depth(depth, intrinsics)
    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[:depth.shape[0], :depth.shape[1]].astype(np.float64)
    return np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], axis=-1)


def _tangent(points: np.ndarray, has: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One-sided difference along ``axis`` on the side with the smaller depth step, and where it exists."""
    fwd = np.zeros_like(points)
    bwd = np.zeros_like(points)
    ok_f = np.zeros(has.shape, bool)
    ok_b = np.zeros(has.shape, bool)
    n = points.shape[axis]
    lo = [slice(None)] * 2
    hi = [slice(None)] * 2
    lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
    diff = points[tuple(hi)] - points[tuple(lo)]
    both = has[tuple(hi)] & has[tuple(lo)]
    fwd[tuple(lo)], ok_f[tuple(lo)] = diff, both  # P[i+1] - P[i] at i
    bwd[tuple(hi)], ok_b[tuple(hi)] = diff, both  # P[i] - P[i-1] at i
    step_f = np.where(ok_f, np.abs(fwd[..., 2]), np.inf)
    step_b = np.where(ok_b, np.abs(bwd[..., 2]), np.inf)
    use_f = step_f <= step_b
    return np.where(use_f[..., None], fwd, bwd), ok_f | ok_b


def surface_normals(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (H, W, 3) facing the camera, and where they are defined (depth there and at a neighbour
    along both axes)."""
    has = points[..., 2] > 0
    tu, ok_u = _tangent(points, has, 1)
    tv, ok_v = _tangent(points, has, 0)
    n = np.cross(tu, tv)
    norm = np.linalg.norm(n, axis=-1)
    valid = has & ok_u & ok_v & (norm > 0)
    n = np.where(valid[..., None], n / np.where(norm > 0, norm, 1)[..., None], 0)
    facing_away = (n * points).sum(-1) > 0  # normals point back towards the camera centre
    n[facing_away] *= -1
    return n, valid


def estimate_gravity(normals: np.ndarray, valid: np.ndarray, schedule=((45.0, 5), (15.0, 5)),
                     initial=(0.0, -1.0, 0.0)) -> np.ndarray:
    """The unit "up" direction (camera frame) from surface normals, by Gupta et al.'s iterative estimate."""
    n = normals[valid].reshape(-1, 3)
    if len(n) < 3:
        raise FcnsegError("too few valid depth pixels to estimate the gravity direction")
    g = np.asarray(initial, dtype=np.float64)
    g = g / np.linalg.norm(g)
    for degrees, iterations in schedule:
        for _ in range(iterations):
            cos = n @ g
            par = n[np.abs(cos) > np.cos(np.radians(degrees))]  # within d of parallel (either sign)
            perp = n[np.abs(cos) < np.sin(np.radians(degrees))]  # within d of perpendicular
            if len(par) + len(perp) == 0:
                break
            m = perp.T @ perp - par.T @ par
            _, vecs = np.linalg.eigh(m)
            new = vecs[:, 0]  # smallest eigenvalue: along the parallel set, across the perpendicular set
            g = new if new @ g >= 0 else -new
    return g


def hha_geometry(depth: np.ndarray, intrinsics=NYUDV2_INTRINSICS) -> HHAGeometry:
    """Points, normals, gravity, height and angle of a depth map (metres, 0 = no measurement)."""
    points = back_project(depth, intrinsics)
    normals, valid = surface_normals(points)
    g = estimate_gravity(normals, valid)
    up = points @ g
    has = points[..., 2] > 0
    height = np.where(has, up - up[has].min(), 0)
    angle = np.where(valid, np.degrees(np.arccos(np.clip(normals @ g, -1, 1))), 0)
    return HHAGeometry(points, normals, valid, g, height, angle)


def hha(depth: np.ndarray, intrinsics=NYUDV2_INTRINSICS) -> np.ndarray:
    """The HHA image (H, W, 3) uint8: disparity, height above ground, angle with gravity (see module doc)."""
    geo = hha_geometry(depth, intrinsics)
    has = geo.points[..., 2] > 0
    depth_cm = np.maximum(geo.points[..., 2] * 100, 100)
    channels = [np.where(has, 31000 / depth_cm, 0), np.where(has, geo.height * 100, 0),
                np.where(geo.valid, geo.angle + 128 - 90, 0)]
    return np.clip(np.rint(np.stack(channels, -1)), 0, 255).astype(np.uint8)


def cached_hha(depth_path: str | Path, cache_dir: str | Path, intrinsics=NYUDV2_INTRINSICS,
               read=None) -> np.ndarray:
    """``hha`` of a depth file, computed once: cached as ``cache_dir/<sha256>.png`` keyed by the file's
    bytes, the intrinsics and ``HHA_VERSION`` (so an edited file or a new encoding is recomputed).
    ``read(path) -> metres`` reads the depth (default: ``io.read_depth``, 16-bit PNG in millimetres)."""
    from PIL import Image

    from ..files import atomic_write
    from .io import READABLE_FORMATS, DataFileError, read_depth

    depth_path = Path(depth_path)
    try:
        content = depth_path.read_bytes()
    except OSError as e:
        raise DataFileError(f"{depth_path}: unreadable depth map ({e.strerror or e})") from None
    key = hashlib.sha256(content + repr((tuple(float(v) for v in intrinsics), HHA_VERSION)).encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.png"
    if path.is_file():
        try:
            with Image.open(path, formats=READABLE_FORMATS) as im:
                return np.asarray(im.convert("RGB"))
        except OSError:
            pass  # a damaged cache entry is recomputed and replaced
    image = hha((read or read_depth)(depth_path), intrinsics)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return image
