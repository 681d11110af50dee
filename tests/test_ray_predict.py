"""``fcnseg predict --engine ray``: the same masks as plain predict, a manifest row per input, resume, a killed
actor retried, a cluster joined by address, and one-line errors. The Ray runs are slow (a local Ray starts in
each) and use the built-in ``camvid`` net: Ray's worker processes cannot see the tests' tiny registered models."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from tiny_models import random_image

pytest.importorskip("ray.data", reason="the ray extra: pip install 'fcnseg[ray]'")
import pyarrow.parquet as pq  # noqa: E402  (a dependency of ray[data])

from fcnseg.files import write_group  # noqa: E402
from fcnseg.errors import OutputExistsError  # noqa: E402
from fcnseg.inference.ray_predict import read_path_list, write_manifest  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli_env(**extra: str) -> dict[str, str]:
    """One torch thread per process (the machine is shared), this checkout's fcnseg first on the path (the
    Ray workers are started with the driver's environment), and Ray's own files under the test's HOME."""
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "WORLD_SIZE"):
        e.pop(k, None)
    e.update(extra)
    return e


def fcnseg(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcnseg", *args], env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def photos(folder: Path, n: int, size: tuple[int, int] = (72, 96)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_image(*size, seed=10 + i).save(folder / f"im{i:02d}.png")
    return folder


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def fcnseg_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("fcnseg:")]


# ---- fast: inputs, errors, the tolerant group writer ---------------------------------------------------------

def test_path_lists_from_txt_csv_and_parquet(tmp_path):
    import pyarrow as pa

    (tmp_path / "list.txt").write_text("# survey\na.png\n\n/abs/b.png\n")
    assert read_path_list(tmp_path / "list.txt") == [str(tmp_path / "a.png"), "/abs/b.png"]
    (tmp_path / "list.csv").write_text("id,path\n1,x/c.png\n2,d.png\n")
    assert read_path_list(tmp_path / "list.csv") == [str(tmp_path / "x/c.png"), str(tmp_path / "d.png")]
    pq.write_table(pa.table({"source": ["/e.png", "f.png"]}), tmp_path / "list.parquet")
    assert read_path_list(tmp_path / "list.parquet") == ["/e.png", str(tmp_path / "f.png")]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(Exception, match="lists no paths"):
        read_path_list(tmp_path / "empty.txt")


def test_the_manifest_streams_in_row_groups(tmp_path):
    """Rows go to the file a group at a time as they are produced: memory holds one group, not the job."""
    produced = []

    def rows():
        for i in range(5):
            produced.append(i)
            yield dict(index=i, source=f"/in/{i}.png", outputs=[f"{i}.png"], status="ok", error="",
                       class_shares=[0.25, 0.75], seconds=0.5, extra="not a column")

    write_manifest(tmp_path / "m.parquet", rows(), group=2)
    f = pq.ParquetFile(tmp_path / "m.parquet")
    assert f.metadata.num_row_groups == 3 and produced == [0, 1, 2, 3, 4]
    got = f.read().to_pylist()
    assert [r["index"] for r in got] == [0, 1, 2, 3, 4] and "extra" not in got[0]
    assert got[3] == dict(index=3, source="/in/3.png", outputs=["3.png"], status="ok", error="",
                          class_shares=[0.25, 0.75], seconds=0.5)


def test_a_job_with_every_output_there_starts_no_ray_and_names_each_input_once(tmp_path):
    import ray

    from fcnseg.inference.visualize import PredictionFiles
    from fcnseg.inference.ray_predict import RayJob, run_job

    src, out = photos(tmp_path / "in", 3), tmp_path / "out"
    out.mkdir()
    for i in range(3):
        (out / f"im{i:02d}.png").write_bytes(b"the user's own file")
    job = RayJob(checkpoint="camvid", out=out, files=PredictionFiles())
    said: list[str] = []
    outcome = run_job(job, [(src / f"im{i:02d}.png", f"im{i:02d}") for i in range(3)], said.append, progress=False)
    assert not ray.is_initialized()
    assert (outcome.written, outcome.skipped, outcome.failed, outcome.done_before) == (0, 3, 0, 0)
    assert len(said) == 3 and all("exists already" in s for s in said)
    rows = manifest(out)
    assert [(r["index"], r["status"]) for r in rows] == [(0, "skipped"), (1, "skipped"), (2, "skipped")]
    assert all((out / f"im{i:02d}.png").read_bytes() == b"the user's own file" for i in range(3))


def test_write_group_keeps_its_own_identical_files_and_refuses_others(tmp_path):
    def text(s: str):
        return lambda tmp: Path(tmp).write_text(s)

    group = [(tmp_path / "a.png", text("mask")), (tmp_path / "a_overlay.jpg", text("overlay"))]
    (tmp_path / "a.png").write_text("mask")  # a retried batch's earlier attempt wrote this one, then died
    assert write_group(group, keep_identical=True) == [tmp_path / "a_overlay.jpg"]
    assert (tmp_path / "a_overlay.jpg").read_text() == "overlay"
    (tmp_path / "b.png").write_text("someone else's")
    with pytest.raises(OutputExistsError):
        write_group([(tmp_path / "b.png", text("mask"))], keep_identical=True)
    assert (tmp_path / "b.png").read_text() == "someone else's"
    with pytest.raises(OutputExistsError):  # without keep_identical even identical files are refused, as before
        write_group([(tmp_path / "a.png", text("mask"))])
    assert not list(tmp_path.glob(".*.tmp"))


def test_ray_options_need_the_ray_engine(tmp_path, image_folder, capsys):
    assert main(["predict", str(image_folder), "--out", str(tmp_path / "o"), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fcnseg: error: --resume, --address, --num-workers and --worker-threads go with --engine ray"]


def test_unreachable_address_is_one_line_with_the_token_hint(tmp_path, image_folder, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["predict", str(image_folder), "--out", str(tmp_path / "o"), "--engine", "ray",
                 "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}: cannot reach a Ray head" in err[0], err
    assert "RAY_AUTH_MODE=token" in err[0]
    assert main(["predict", str(image_folder), "--out", str(tmp_path / "o"), "--engine", "ray",
                 "--address", "nowhere"]) == 1
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_ray_says_how_to_install_it(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert main(["predict", str(image_folder), "--out", str(tmp_path / "o"), "--engine", "ray"]) == 1
    assert capsys.readouterr().err.strip() == "fcnseg: error: --engine ray needs Ray Data: pip install 'fcnseg[ray]'"


# ---- slow: real Ray runs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_equals_plain_predict_and_names_a_damaged_input_once(tmp_path):
    """2 actors x 1 thread against plain predict at 1 thread: the same bytes (same thread count per image, same
    sums); a damaged file is one failed row, named once, exit 1 as predict; the others are written."""
    src = photos(tmp_path / "in", 6)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "list.txt").write_text("".join(f"in/{p.name}\n" for p in sorted(src.iterdir())))
    plain = fcnseg("predict", str(src), "--out", str(tmp_path / "plain"), "--overlay", "--quiet")
    ray = fcnseg("predict", str(tmp_path / "list.txt"), "--out", str(tmp_path / "ray"), "--overlay",
                 "--engine", "ray", "--num-workers", "2", "--worker-threads", "1")
    assert plain.returncode == 1 and ray.returncode == 1, ray.stderr
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(names + ["manifest.parquet",
                                                                                  "manifest.jsonl"])
    for i in range(6):
        assert (tmp_path / "ray" / f"im{i:02d}.png").read_bytes() == (tmp_path / "plain" / f"im{i:02d}.png").read_bytes()
    lines = fcnseg_lines(ray.stderr)
    assert len([ln for ln in lines if "broken.png" in ln]) == 1 and len(lines) == 1, ray.stderr
    assert "Starting execution" not in ray.stderr + ray.stdout and " INFO " not in ray.stderr
    assert ray.stdout.startswith("wrote 6 prediction(s)") and "1 failed" in ray.stdout
    rows = manifest(tmp_path / "ray")
    assert sorted(r["index"] for r in rows) == list(range(7))  # one row per input, each input once
    rows.sort(key=lambda r: r["index"])  # rows come in the order they finished; index is the input's position
    assert [Path(r["source"]).name for r in rows] == sorted(p.name for p in src.iterdir())
    by = {Path(r["source"]).name: r for r in rows}
    assert by["broken.png"]["status"] == "failed" and "broken.png" in by["broken.png"]["error"]
    for i in range(6):
        r = by[f"im{i:02d}.png"]
        assert r["status"] == "ok" and r["error"] == "" and r["outputs"] == [f"im{i:02d}.png", f"im{i:02d}_overlay.jpg"]
        mask = np.asarray(Image.open(tmp_path / "plain" / f"im{i:02d}.png"))
        assert np.allclose(r["class_shares"], np.bincount(mask.ravel(), minlength=11) / mask.size)
        assert r["seconds"] > 0


@pytest.mark.slow
def test_resume_keeps_recorded_outputs_and_recomputes_the_rest(tmp_path):
    src = photos(tmp_path / "in", 4)
    out = tmp_path / "out"
    first = fcnseg("predict", str(src), "--out", str(out), "--engine", "ray", "--quiet")
    assert first.returncode == 0, first.stderr
    before = {r["source"]: r for r in manifest(out)}
    kept = (out / "im00.png").stat().st_mtime_ns
    gone = (out / "im02.png").read_bytes()
    (out / "im02.png").unlink()  # as if lost; and a journal line cut by a crash
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"source": "cut')
    again = fcnseg("predict", str(src), "--out", str(out), "--engine", "ray", "--quiet")
    assert again.returncode == 1 and "--resume continues it" in again.stderr  # no silent mix of two jobs
    resumed = fcnseg("predict", str(src), "--out", str(out), "--engine", "ray", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("wrote 1 prediction(s)") and "3 done before (--resume)" in resumed.stdout
    assert (out / "im02.png").read_bytes() == gone and (out / "im00.png").stat().st_mtime_ns == kept
    after = {r["source"]: r for r in manifest(out)}
    assert len(after) == 4 and all(r["status"] == "ok" for r in after.values())
    im00 = str(src / "im00.png")
    assert after[im00]["seconds"] == before[im00]["seconds"]  # carried over, not recomputed


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so the test touches only the Ray it started."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_every_output_written_once(tmp_path):
    n = 40
    src = photos(tmp_path / "in", n, size=(180, 240))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fcnseg", "predict", str(src), "--out", str(out), "--engine", "ray",
                             "--num-workers", "1", "--worker-threads", "1", "--quiet"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, done_at_kill = None, None
    deadline = time.monotonic() + 400
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        journal = out / "manifest.jsonl"
        done = len(journal.read_text().splitlines()) if journal.exists() else 0
        actors = [p for p in descendants(proc.pid) if "_Predictor" in cmdline(p)]
        if done >= 4 and actors:
            os.kill(actors[0], signal.SIGKILL)
            killed, done_at_kill = actors[0], done
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None and done_at_kill < n, "the job ended before an actor could be killed mid-job"
    assert proc.returncode == 0, stderr
    expected = {f"im{i:02d}.png" for i in range(n)} | {"legend.png", "manifest.parquet", "manifest.jsonl"}
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == expected
    rows = manifest(out)
    assert len(rows) == n and len({r["source"] for r in rows}) == n and all(r["status"] == "ok" for r in rows)
    # Ray's driver prints the cluster's own notice of the retry ("(raylet) Task ... failed. There are infinite
    # retries remaining") on stdout; fcnseg's summary is the last line
    assert stdout.strip().splitlines()[-1].startswith(f"wrote {n} prediction(s)")
    for name in ("im00.png", f"im{n - 1:02d}.png"):  # written whole: a PNG that decodes
        assert np.asarray(Image.open(out / name)).shape == (180, 240)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_joins_a_cluster_started_by_the_test(tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    port, temp = free_port(), Path("/tmp") / f"fcnseg-test-ray-{os.getpid()}"  # socket paths must stay short
    # Ray 2.60's token authentication, as docs/scale.md describes it: the head and the joining command share
    # the cluster's token (here in the environment; ~/.ray/auth_token is left alone)
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), HOME=str(tmp_path / "home"))
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--temp-dir", str(temp), "--disable-usage-stats"],
                            env=env, stdout=head_log, stderr=subprocess.STDOUT)
    try:
        src = photos(tmp_path / "in", 3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        run = subprocess.run([sys.executable, "-m", "fcnseg", "predict", str(src), "--out", str(tmp_path / "out"),
                              "--engine", "ray", "--address", f"127.0.0.1:{port}", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr + (tmp_path / "head.log").read_text()[-2000:]
        assert run.stdout.startswith("wrote 3 prediction(s)")
        assert [r["status"] for r in manifest(tmp_path / "out")] == ["ok"] * 3
        assert head.poll() is None  # the cluster outlives the job that joined it
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        time.sleep(2)
        leftovers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if str(temp) in cmdline(p)]
        for pid in leftovers:  # only the processes of the cluster this test started (its own temp dir)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head_log.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)
    assert head.returncode is not None and not leftovers, [cmdline(p) for p in leftovers]


# ---- docs/scale.md: its commands parse, and the local ones run ------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale.md"


def doc_commands(kind: str) -> list[list[str]]:
    """The commands of docs/scale.md's ```KIND blocks, after their ``$ `` or ``machine$ `` prompt."""
    import re
    import shlex

    cmds = []
    for block in re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S):
        cmds += [shlex.split(line.split("$ ", 1)[1]) for line in block.splitlines() if "$ " in line]
    return cmds


def test_every_fcnseg_command_in_the_scale_doc_parses():
    from fcnseg.cli import build_parser

    fcnseg_cmds = []
    for cmd in doc_commands("console") + doc_commands("shell"):
        if cmd[0] == "fcnseg":
            fcnseg_cmds.append(cmd[1:])
        elif cmd[0] == "torchrun":
            fcnseg_cmds.append(cmd[cmd.index("fcnseg") + 1:])
    assert len(fcnseg_cmds) == 5  # two local lines, one on a cluster, two torchrun nodes
    for args in fcnseg_cmds:
        build_parser().parse_args(args)  # an unknown flag would exit 2


@pytest.mark.slow
def test_the_scale_doc_local_commands_run(tmp_path):
    photos(tmp_path / "photos", 3)
    (tmp_path / "photos.txt").write_text("".join(f"photos/im{i:02d}.png\n" for i in range(3)))
    cmds = doc_commands("console")
    assert len(cmds) == 2
    for cmd in cmds:
        assert cmd[0] == "fcnseg"
        run = subprocess.run([sys.executable, "-m", "fcnseg", *cmd[1:]], cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("wrote 0 prediction(s)") and "3 done before (--resume)" in run.stdout
    assert [r["status"] for r in manifest(tmp_path / "preds")] == ["ok"] * 3


def test_a_damaged_checkpoint_is_refused_before_ray_starts(tmp_path, image_folder, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["predict", str(image_folder), "--out", str(tmp_path / "o"), "--engine", "ray",
                 "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fcnseg: error: ") and "bad.safetensors" in err[0], err
    assert not (tmp_path / "o").exists()
