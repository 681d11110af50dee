"""One writer per output (issue 30, findings 4 and 5): two ``data import`` or two ``train`` runs into one folder
cannot both succeed or mix their files; a dead holder's lock is taken over with a message."""
from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.files import OutputLock, OutputLockedError, lock_path
from tiny_models import env, make_folder_dataset, tiny_train_args, write_launcher

FCNSEG = [sys.executable, "-m", "fcnseg"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until ``path`` holds its record (the lock is taken and filled: created empty with O_EXCL, it is written a
    moment later, and a kill in between would leave a lock with no record); fails if ``proc`` ends first."""
    end = time.monotonic() + timeout
    while not _has_record(path):
        assert proc.poll() is None, f"ended before taking the lock: {proc.communicate()}"
        assert time.monotonic() < end, "the lock never appeared"
        time.sleep(0.01)


#: ``python PAUSE UNDER SCRIPT ARGS...`` runs ``SCRIPT ARGS...`` and stops the process (SIGSTOP, by itself) the
#: first time it opens a file under the folder UNDER. What that moment means needs nothing of the code under test
#: (no lock, no log line), so a test built on it runs on any version: a command pauses as it first reads its
#: input (every check of its output done, nothing written) or as it first writes into its output.
PAUSE = """import os, runpy, signal, sys
under = os.path.realpath(sys.argv[1]) + os.sep
paused = []


def pause_at_first_open(event, args):
    if event != "open" or paused or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if os.path.realpath(os.fsdecode(args[0])).startswith(under):
        paused.append(args[0])
        os.kill(os.getpid(), signal.SIGSTOP)


sys.addaudithook(pause_at_first_open)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_paused(folder: Path, under: Path, script: Path, *args: str) -> subprocess.Popen:
    """``python script args...`` that stops itself at its first open of a file under ``under``; returns once
    it has (see ``PAUSE``)."""
    pause = folder / "pause.py"
    pause.write_text(PAUSE)
    proc = start([sys.executable, str(pause), str(under), str(script), *args])
    end = time.monotonic() + 240
    while _state(proc.pid) != "T":
        assert proc.poll() is None, f"ended before it opened anything under {under}: {proc.communicate()}"
        assert time.monotonic() < end, f"never opened anything under {under}"
        time.sleep(0.01)
    return proc


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (``T``: stopped by a signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def continued_at_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc``, sent SIGCONT when the block ends however it ends (a failed test leaves no stopped child)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


def _has_record(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def labelme_export(folder: Path, labels: tuple[str, str], n: int, seed: int) -> Path:
    """``n`` labelme files with embedded 24x32 images, each with two rectangles labelled ``labels``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        import io

        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        x = int(rng.integers(0, 16))
        shapes = [{"label": labels[0], "points": [[x, 2], [x + 10, 12]], "shape_type": "rectangle", "flags": {},
                   "group_id": None},
                  {"label": labels[1], "points": [[2, 14], [30, 14], [16, 22]], "shape_type": "polygon",
                   "flags": {}, "group_id": None}]
        doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": f"img{i:03d}.png",
               "imageData": base64.b64encode(buf.getvalue()).decode(), "imageHeight": 24, "imageWidth": 32}
        (folder / f"img{i:03d}.json").write_text(json.dumps(doc))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


# ---- the lock itself -----------------------------------------------------------------------------------------

def test_lock_file_names_the_holder_and_is_removed_on_exit(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out, ["fcnseg", "train", "--out", str(out)]) as lock:
        assert lock.path == tmp_path / ".out.fcnseg-lock"
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert held["command"] == ["fcnseg", "train", "--out", str(out)]
        with pytest.raises(OutputLockedError, match=rf"out is being written by another fcnseg process \(PID "
                                                    rf"{os.getpid()} on .*: fcnseg train --out"):
            OutputLock(out, ["fcnseg", "predict"]).acquire()
        assert json.loads(lock.path.read_text()) == held  # the refused one changed nothing
    assert not lock.path.exists()
    assert not out.exists()  # a lock beside the folder: a folder that must be new or empty stays so


def test_two_spellings_of_one_folder_share_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with OutputLock(tmp_path / "real"):
        with pytest.raises(OutputLockedError):
            OutputLock(tmp_path / "link" / ".." / "link").acquire()
        with pytest.raises(OutputLockedError):
            OutputLock(str(tmp_path / "real") + "/").acquire()


def _try_lock(out: str, barrier, results) -> None:
    barrier.wait()
    try:
        with OutputLock(out):
            results.put("held")
            time.sleep(1.0)
    except OutputLockedError:
        results.put("refused")


def test_many_processes_at_once_exactly_one_holds(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_try_lock, args=(str(tmp_path / "out"), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == ["held"] + ["refused"] * 5


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_stale_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fcnseg.files import OutputLock\n"
                              f"OutputLock({str(out)!r}, ['fcnseg', 'train']).acquire()\nprint('held', flush=True)\n"
                              "time.sleep(600)"], env=env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    assert json.loads(lock_path(out).read_text())["pid"] == child.pid  # left behind
    said = []
    with OutputLock(out, on_takeover=said.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"PID {child.pid} is not running" in said[0] and "taking over" in said[0]


def test_a_lock_from_another_host_or_a_live_process_is_not_taken(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": 999999999, "host": "elsewhere", "command": ["fcnseg", "x"]}))
    with pytest.raises(OutputLockedError, match="PID 999999999 on elsewhere"):
        OutputLock(out).acquire()
    lock_path(out).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": ["init"]}))
    with pytest.raises(OutputLockedError, match="PID 1 on"):
        OutputLock(out).acquire()


def test_an_empty_lock_file_is_live_at_first_and_stale_when_old(tmp_path):
    out = tmp_path / "out"
    lock_path(out).touch()
    with pytest.raises(OutputLockedError):
        OutputLock(out).acquire()
    old = time.time() - 60
    os.utime(lock_path(out), (old, old))
    said = []
    with OutputLock(out, on_takeover=said.append):
        pass
    assert "holds no record" in said[0]


def test_cli_says_the_takeover_and_the_refusal_in_one_line(tmp_path, tiny_ckpt, image_folder, capsys):
    out = tmp_path / "masks"
    lock_path(out).write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(),
                                          "command": ["fcnseg", "predict"]}))
    assert main(["predict", str(image_folder / "a.png"), "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "taking over the lock of a process that is gone (PID 999999999 is not running" in err
    assert (out / "a.png").is_file() and not lock_path(out).exists()
    with OutputLock(out, ["fcnseg", "predict", "--out", str(out)]):
        code = main(["predict", str(image_folder / "b.jpg"), "--checkpoint", str(tiny_ckpt), "--out", str(out)])
        err = capsys.readouterr().err
    assert code == 1
    assert one_error_line(err).startswith(f"fcnseg: error: --out {out} is being written by another fcnseg "
                                          f"process (PID {os.getpid()} on ")
    assert not (out / "b.png").exists()
    export = tmp_path / "m.onnx"
    with OutputLock(export):
        with pytest.raises(FcnsegError, match="m.onnx is being written by another"):
            from fcnseg.cli import build_parser

            args = build_parser().parse_args(["export", "--checkpoint", str(tiny_ckpt), "--format", "onnx",
                                              "--out", str(export)])
            args._held = None
            args._run(args)


# ---- the commands, as two real processes -----------------------------------------------------------------------

@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.parametrize("pause_in", ["export", "out"])
def test_two_imports_into_one_folder_one_succeeds_nothing_mixed(tmp_path, pause_in):
    # issue 30 finding 4: two `data import --out SAME` both said "imported 500 images", exit 0, and the folder
    # mixed their masks. The first pauses as it first reads its export ("export": every check of --out passed,
    # nothing written yet, where a second import used to get in) or as it first writes into --out ("out"); the
    # second, with more images and other classes, runs into the same folder meanwhile.
    a = labelme_export(tmp_path / "a", ("car", "road"), 40, seed=1)
    b = labelme_export(tmp_path / "b", ("person", "sky"), 50, seed=2)
    reference = tmp_path / "reference"
    assert main(["data", "import", str(a), "--from", "labelme", "--out", str(reference)]) == 0
    out = tmp_path / "same"
    launcher = write_launcher(tmp_path / "bin")
    first = start_paused(tmp_path, a if pause_in == "export" else out, launcher,
                         "data", "import", str(a), "--from", "labelme", "--out", str(out))
    with continued_at_exit(first):
        second = subprocess.run([sys.executable, str(launcher), "data", "import", str(b), "--from", "labelme",
                                 "--out", str(out)], env=env(), capture_output=True, text=True, timeout=300)
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 1), (stdout, stderr, second.stdout, second.stderr)
    assert "imported 40 images" in stdout
    assert second.stdout == ""
    line = one_error_line(second.stderr)
    assert line.startswith(f"fcnseg: error: --out {out} is being written by another fcnseg process "
                           f"(PID {first.pid} on {socket.gethostname()}: fcnseg data import {a} --from labelme")
    assert tree(out) == tree(reference)  # the first import's files only, byte for byte: no mask of b's
    assert "person" not in (out / "classes.txt").read_text()
    assert not lock_path(out).exists()


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_two_imports_started_together_exactly_one_succeeds(tmp_path):
    a = labelme_export(tmp_path / "a", ("car", "road"), 30, seed=1)
    b = labelme_export(tmp_path / "b", ("person", "sky"), 30, seed=2)
    out = tmp_path / "same"
    procs = [start([*FCNSEG, "data", "import", str(src), "--from", "labelme", "--out", str(out)]) for src in (a, b)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    winner = a if results[0][0] == 0 else b
    loser_err = results[1][2] if results[0][0] == 0 else results[0][2]
    one_error_line(loser_err)  # refused by the lock, or (if the winner had already finished) by the full folder
    classes = (out / "classes.txt").read_text()
    assert ("car" in classes) == (winner == a) and ("person" in classes) == (winner == b)
    assert len(list((out / "masks").iterdir())) == 30


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_two_trainings_into_one_run_directory(tmp_path):
    # issue 30 finding 5: two `train --out SAME` both exited 0 and printed the same "next:" lines; one run was
    # gone. The first pauses as it first writes into the run directory (its config.yaml: past the check for a
    # run already there); the second, another seed, runs into the same directory meanwhile.
    launcher = write_launcher(tmp_path / "bin")
    data = make_folder_dataset(tmp_path / "data")
    run = tmp_path / "run"
    first = start_paused(tmp_path, run, launcher, *tiny_train_args(data, run))
    with continued_at_exit(first):
        second = subprocess.run([sys.executable, str(launcher), *tiny_train_args(data, run, "--seed", "5")],
                                env=env(), capture_output=True, text=True, timeout=300)
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 1), (stdout, stderr, second.stdout, second.stderr)
    assert "next:" in stdout
    assert "next:" not in second.stdout
    line = one_error_line(second.stderr)
    assert line.startswith(f"fcnseg: error: --out {run} is being written by another fcnseg process "
                           f"(PID {first.pid} on ")
    assert "fcnseg train --model tiny_fcn8s" in line
    # the run directory is the first run's, whole: its config and command, both its epochs, its checkpoints
    assert "seed: 0" in (run / "config.yaml").read_text()
    assert "--seed" not in json.loads((run / "version.json").read_text())["command"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"last.safetensors", "best.safetensors"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert not lock_path(run).exists()


def test_an_existing_folder_in_an_unwritable_parent_is_locked_inside(tmp_path, monkeypatch):
    out = tmp_path / "home" / "me"
    out.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out.parent else real_access(p, mode))
    assert lock_path(out) == out / ".fcnseg-lock"  # --out ~: /home is not the user's to write
    with OutputLock(out):
        with pytest.raises(OutputLockedError):
            OutputLock(out).acquire()
    assert not (out / ".fcnseg-lock").exists()
    assert lock_path(tmp_path / "home" / "new") == out.parent / ".new.fcnseg-lock"  # not a folder yet: beside it


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_a_sigkilled_predict_leaves_a_lock_the_next_predict_takes_over(tmp_path, tiny_ckpt, image_folder):
    launcher = write_launcher(tmp_path / "bin")
    out = tmp_path / "masks"
    argv = [sys.executable, str(launcher), "predict", str(image_folder), "--checkpoint", str(tiny_ckpt), "--out",
            str(out)]
    first = start(argv)
    wait_for(lock_path(out), first)
    os.kill(first.pid, signal.SIGKILL)  # no chance to release it
    first.communicate(timeout=60)
    assert json.loads(lock_path(out).read_text())["pid"] == first.pid
    second = subprocess.run([*argv, "--overwrite"], env=env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert (f"fcnseg: --out {out}: taking over the lock of a process that is gone (PID {first.pid} is not running; "
            f"PID {first.pid} on {socket.gethostname()}: fcnseg predict {image_folder}") in second.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "legend.png"]  # a folder: its own images
    assert not lock_path(out).exists()
