"""Output places checked before work, exclusive and all-or-nothing writes, one-line write errors, file modes,
stale temporaries, control characters in messages, and two concurrent predict runs into one folder."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.files import atomic_write, clean_stale_temps
from fcnseg.weights.checkpoint import save_checkpoint
from fcnseg.cli import main
from fcnseg.errors import FcnsegError, OutputExistsError, OutputWriteError, printable, show_path
from fcnseg.files import output_dir, output_file, write_group
from tiny_models import random_image, tiny_checkpoint, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _mode_for_new_files() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture
def unwritable(tmp_path):
    """A folder in which no file can be created, for root too (immutable) where chattr works."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make an unwritable folder")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcnseg: error: ") and "Traceback" not in err, err
    return lines[0]


# ---- checks before work ----------------------------------------------------------------------------------

def test_output_dir_and_file_refuse_the_wrong_kind_and_create_nothing(tmp_path):
    a_file = tmp_path / "f.png"
    a_file.write_bytes(b"x")
    with pytest.raises(FcnsegError, match=r"--out .*f\.png: is a file, but a folder is needed"):
        output_dir(a_file, what="--out")
    with pytest.raises(FcnsegError, match=r"--json .*: is a folder, but a file name is needed"):
        output_file(tmp_path, what="--json")
    with pytest.raises(FcnsegError, match=r"f\.png is a file, so no folder can be created under it"):
        output_file(a_file / "sub" / "scores.json")
    with pytest.raises(FcnsegError, match="exists already"):
        output_file(a_file, overwrite=False)
    assert output_file(tmp_path / "new" / "deeper" / "s.json") == tmp_path / "new" / "deeper" / "s.json"
    assert output_dir(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]  # and the write probe is gone


def test_unwritable_places_are_refused(unwritable):
    with pytest.raises(FcnsegError, match=r"locked.*(no permission|cannot create files)"):
        output_dir(unwritable)
    with pytest.raises(FcnsegError, match=r"out\.json.*(no permission|cannot create files)"):
        output_file(unwritable / "sub" / "out.json")


def test_a_read_only_existing_file_is_not_replaced(tmp_path):
    target = tmp_path / "scores.json"
    target.write_text("{}")
    target.chmod(0o444)
    if os.geteuid() == 0:  # root may write anything that is not immutable
        if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr")
    try:
        with pytest.raises(FcnsegError, match=r"scores\.json: exists and is read-only"):
            output_file(target)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(target)], check=True)


@pytest.mark.parametrize("command", [
    ["predict", "in.png", "--out", "{file}"],
    ["evaluate", "--checkpoint", "c.safetensors", "--dataset", "folder", "--root", "r", "--json", "{dir}"],
    ["evaluate", "--checkpoint", "c.safetensors", "--dataset", "folder", "--root", "r", "--json", "{file}/x.json"],
    ["export", "--checkpoint", "c.safetensors", "--format", "onnx", "--out", "{dir}"],
    ["data", "check", "--dataset", "camvid", "--root", "r", "--split", "val", "--weights-json", "{dir}"],
])
def test_cli_output_places_are_checked_before_any_work(tmp_path, monkeypatch, capsys, command):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output place was checked")

    monkeypatch.setattr("fcnseg.cli.predict.load_segmenter", no_work)
    monkeypatch.setattr("fcnseg.weights.checkpoint.load_checkpoint", no_work)
    monkeypatch.setattr("fcnseg.data.build_dataset", no_work)
    a_file, a_dir = tmp_path / "taken.png", tmp_path / "adir"
    a_file.write_bytes(b"x")
    a_dir.mkdir()
    argv = [a.replace("{file}", str(a_file)).replace("{dir}", str(a_dir)) for a in command]
    assert main(argv) == 1
    line = _one_error_line(capsys)
    assert str(a_file if "{file}" in " ".join(command) else a_dir) in line


def test_train_out_that_is_a_file_fails_before_data_is_read(tmp_path, monkeypatch, capsys):
    from tiny_models import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", n_train=2, n_val=1)
    (tmp_path / "run").write_text("not a folder")
    monkeypatch.setattr("fcnseg.train.setup.build_data", lambda *a: (_ for _ in ()).throw(AssertionError("read")))
    assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "1",
                 "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")]) == 1
    assert "run directory" in _one_error_line(capsys)


# ---- atomic writes ---------------------------------------------------------------------------------------

def test_exclusive_atomic_write_never_replaces(tmp_path):
    target = tmp_path / "p.png"
    atomic_write(target, lambda tmp: Path(tmp).write_text("first"), overwrite=False)
    with pytest.raises(OutputExistsError, match=r"p\.png: exists already"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("second"), overwrite=False)
    assert target.read_text() == "first"
    atomic_write(target, lambda tmp: Path(tmp).write_text("third"))  # the default replaces (checkpoints)
    assert target.read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_errors_are_one_line_and_leave_nothing(tmp_path, code):
    def fails(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputWriteError) as info:
        atomic_write(tmp_path / "big.bin", fails)
    assert str(info.value) == f"{tmp_path / 'big.bin'}: could not write ({os.strerror(code)}); nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_write_group_is_all_or_nothing(tmp_path):
    (tmp_path / "x_overlay.jpg").write_text("someone else's")
    with pytest.raises(OutputExistsError):
        write_group([(tmp_path / "x.png", lambda t: Path(t).write_text("mask")),
                     (tmp_path / "x_overlay.jpg", lambda t: Path(t).write_text("overlay"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_overlay.jpg"]
    assert (tmp_path / "x_overlay.jpg").read_text() == "someone else's"


def test_every_written_file_gets_the_umask_mode(tmp_path):
    """safetensors' save_file makes its own owner-only file; the JSON beside it was 0644, the weights 0600."""
    mode = _mode_for_new_files()
    path = save_checkpoint(tiny_model(3), tmp_path / "ckpt" / "m.safetensors")
    for f in (path, path.with_suffix(".json")):
        assert f.stat().st_mode & 0o777 == mode, (f.name, oct(f.stat().st_mode))
    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    random_image(20, 24, 1).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
                 "--overlay", "--probs", "--quiet"]) == 0
    written = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in written] == ["a.png", "a_overlay.jpg", "a_probs.npy", "legend.png"]
    assert {f.name: f.stat().st_mode & 0o777 for f in written} == {f.name: mode for f in written}
    pytest.importorskip("torch.jit")
    from fcnseg.weights.export import export_torchscript

    ts = export_torchscript(tiny_model(3), tmp_path / "m.pt", example_size=(32, 32))
    assert ts.stat().st_mode & 0o777 == mode


def test_stale_temporaries_are_cleaned_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".a.png.k3j_x9q2.tmp", tmp_path / ".b.png.ab12cd34.tmp"
    other = tmp_path / ".notes.tmp"
    for f in (stale, fresh, other):
        f.write_text("x")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    assert clean_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists() and other.exists()
    # save_checkpoint cleans its folder
    os.utime(fresh, (hours_ago, hours_ago))
    save_checkpoint(tiny_model(3), tmp_path / "m.safetensors")
    assert not fresh.exists() and other.exists()


# ---- control characters ----------------------------------------------------------------------------------

def test_control_characters_are_escaped_in_messages():
    assert show_path(Path("a\nb.png")) == "a\\nb.png"
    assert printable("x\r\x1b[31m\u202e") == "x\\r\\x1b[31m\\u202e"
    assert printable("C:\\data\\img.png") == "C:\\data\\img.png"  # plain text stays as typed
    assert printable("a\\n\nb") == "a\\\\n\\nb"  # escaped text stays distinguishable


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    bad = tmp_path / "a\nb.png"
    bad.write_bytes(b"not an image")
    random_image(20, 24, 1).save(tmp_path / "ok.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(bad), str(tmp_path / "ok.png"),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "a\\nb.png" in err[0], err
    (tmp_path / "d\nir").mkdir()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--dataset", "folder", "--root", "r",
                 "--json", str(tmp_path / "d\nir")]) == 1
    assert "d\\nir" in _one_error_line(capsys)


# ---- predict: no silent overwrite, honest counts ---------------------------------------------------------

@pytest.fixture
def two_sets(tmp_path):
    """A/x1..x3 and B/x1..x3: different images with the same names."""
    for folder, seed in (("A", 10), ("B", 20)):
        (tmp_path / folder).mkdir()
        for i in range(1, 4):
            random_image(24, 30, seed + i).save(tmp_path / folder / f"x{i}.png")
    return tmp_path / "A", tmp_path / "B"


def test_a_second_run_into_one_folder_skips_and_says_so(tmp_path, two_sets, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    a, b = two_sets
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(a), "--out", str(out), "--quiet"]) == 0
    first = {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()}
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), str(b), "--out", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "wrote 0 prediction(s)" in captured.out and "3 skipped because they exist" in captured.out
    assert sum("exists already" in ln for ln in captured.err.splitlines()) == 3
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()} == first  # run A's files untouched
    assert main(["predict", "--checkpoint", str(ckpt), str(b), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert "wrote 3 prediction(s)" in capsys.readouterr().out
    assert (out / "x1.png").stat().st_ino != first["x1.png"][1]  # replaced by a new file


def test_collisions_within_a_run_are_reported(tmp_path, two_sets, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    a, b = two_sets
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(a / "x1.png"), str(b / "x1.png"), "--out", str(out),
                 "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"fcnseg: x1.png from {a / 'x1.png'}; {b / 'x1.png'} written as B_x1.png"]
    assert sorted(p.name for p in out.iterdir()) == ["B_x1.png", "legend.png", "x1.png"]


def test_a_full_disk_mid_run_stops_with_honest_counts_and_no_partial_files(tmp_path, two_sets, capsys, monkeypatch):
    import fcnseg.inference.visualize as vis

    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    real_overlay, calls = vis.overlay, []

    def overlay_then_full(*args, **kwargs):
        pic = real_overlay(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second image's overlay hits a full disk after its mask was written
            def save(tmp, **kw):
                Path(tmp).write_bytes(b"half a jpeg")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            pic.save = save
        return pic

    monkeypatch.setattr(vis, "overlay", overlay_then_full)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ckpt), str(two_sets[0]), "--out", str(out), "--overlay",
                 "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "wrote 1 prediction(s)" in captured.out and "1 failed" in captured.out
    assert "1 image(s) not attempted" in captured.out
    assert captured.err.splitlines() == [f"fcnseg: {out / 'x2_overlay.jpg'}: could not write "
                                         f"({os.strerror(errno.ENOSPC)}); nothing was written"]
    assert sorted(p.name for p in out.iterdir()) == ["legend.png", "x1.png", "x1_overlay.jpg"]


def test_no_legend_without_a_prediction(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.safetensors")
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_two_concurrent_runs_never_report_more_than_exists(tmp_path):
    """Two real processes predict A/x1..x6 and B/x1..x6 into one folder at the same time."""
    from fcnseg import build_model
    from tiny_models import env, write_launcher

    ckpt = save_checkpoint(build_model("tiny_fcn8s", num_classes=5), tmp_path / "t.safetensors")
    launcher = write_launcher(tmp_path / "launch")
    inputs = []
    for folder, seed in (("A", 100), ("B", 200)):
        (tmp_path / folder).mkdir()
        for i in range(1, 7):
            random_image(40, 48, seed + i).save(tmp_path / folder / f"x{i}.png")
        inputs.append(tmp_path / folder)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(launcher), "predict", "--checkpoint", str(ckpt), str(folder),
                               "--out", str(out), "--quiet"], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for folder in inputs]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    reported = []
    for stdout, stderr, code in results:
        if "is being written by another fcnseg process" in stderr:  # one writer per folder (issue 30): refused
            assert code == 1 and stdout == "" and "Traceback" not in stderr, (stdout, stderr)
            reported.append(0)
            continue
        found = re.search(r"wrote (\d+) prediction", stdout)
        assert found and "Traceback" not in stderr, (stdout, stderr)
        reported.append(int(found.group(1)))
        assert code == (0 if reported[-1] == 6 else 1)
        assert len(re.findall("exists already", stderr)) == 6 - reported[-1]
    on_disk = sorted(out.glob("x*.png"))
    assert sum(reported) == len(on_disk) == 6
    for f in on_disk:
        with Image.open(f) as im:
            im.load()  # complete files only
            assert im.size == (48, 40) and np.asarray(im).max() < 5
    assert not list(out.glob(".*.tmp"))
