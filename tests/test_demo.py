"""``fcnseg demo``: sample frames from --camvid (or the default copy), a one-line error when there are none."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import demo, main
from fcnseg.errors import FcnsegError

from tiny_models import random_image


def test_frames_from_a_camvid_folder_are_segmented(tmp_path, tiny_ckpt, capsys):
    camvid = tmp_path / "camvid"
    (camvid / "val").mkdir(parents=True)
    for i, (h, w) in enumerate([(36, 48), (40, 30), (33, 41), (20, 20)]):
        random_image(h, w, i).save(camvid / "val" / f"f{i}.png")
    out = tmp_path / "out"
    assert main(["demo", "--camvid", str(camvid), "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("f*.png")) == ["f0.png", "f1.png", "f2.png"]  # the first three
    assert np.asarray(Image.open(out / "f1.png")).shape == (40, 30) and (out / "legend.png").is_file()
    assert "no CamVid copy" not in capsys.readouterr().err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_camvid_folder_without_frames_is_one_line(tmp_path, tiny_ckpt, capsys, make):
    camvid = tmp_path / "camvid"
    if make == "empty":
        (camvid / "val").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["demo", "--camvid", str(camvid), "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--camvid {camvid}" in err and not out.exists()
    assert ("no such folder" if make == "missing" else "no CamVid frames") in err


def test_without_a_local_copy_the_download_failure_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEFAULT_CAMVID", tmp_path / "nowhere")

    def offline(url, dest, **kw):  # nothing is fetched in tests
        raise FcnsegError(f"{url}: network unreachable")

    monkeypatch.setattr("fcnseg.data.download.fetch", offline)
    out = tmp_path / "out"
    assert main(["demo", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"no CamVid copy at {tmp_path / 'nowhere'} (--camvid DIR names one)")
    assert "network unreachable" in err[-1] and "pass --camvid DIR" in err[-1] and not out.exists()
