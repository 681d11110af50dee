"""The downloader against a local HTTP server (127.0.0.1, with Range): resume, checksums, safe extraction."""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fcnseg.cli import main
from fcnseg.data import download as dl
from fcnseg.data.download import Source, download_dataset, fetch
from fcnseg.errors import FcnsegError


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        data = srv.files.get(self.path)
        srv.log.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if srv.cut_after is not None:  # drop the connection part-way, once
            body, srv.cut_after = body[: srv.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def data_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.log, srv.ranges, srv.cut_after = {}, [], True, None
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_download_verifies_extracts_and_is_idempotent(data_server, tmp_path):
    archive = make_tar({"pkg/a.txt": b"alpha", "pkg/sub/b.txt": b"beta" * 1000})
    data_server.files["/toy.tar.gz"] = archive
    data_server.files["/list.txt"] = b"x\ny\n"
    sources = {"toy": (Source(f"{data_server.url}/toy.tar.gz", "toy.tar.gz", sha256(archive)),
                       Source(f"{data_server.url}/list.txt", "list.txt",
                              "md5:" + hashlib.md5(b"x\ny\n").hexdigest(), extract=False))}
    download_dataset("toy", tmp_path, sources=sources, progress=False)
    assert (tmp_path / "pkg" / "a.txt").read_bytes() == b"alpha"
    assert (tmp_path / "pkg" / "sub" / "b.txt").read_bytes() == b"beta" * 1000
    assert (tmp_path / "list.txt").read_bytes() == b"x\ny\n"
    requests = len(data_server.log)
    download_dataset("toy", tmp_path, sources=sources, progress=False)
    assert len(data_server.log) == requests  # nothing fetched again


def test_interrupted_download_resumes_with_range(data_server, tmp_path):
    payload = bytes(range(256)) * 400
    data_server.files["/big.bin"] = payload
    data_server.cut_after = 10_000
    dest = tmp_path / "big.bin"
    with pytest.raises(FcnsegError, match="run the same command to resume"):
        fetch(f"{data_server.url}/big.bin", dest, sha256(payload), progress=False)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 10_000 and not dest.exists()
    fetch(f"{data_server.url}/big.bin", dest, sha256(payload), progress=False)
    assert data_server.log[-1] == ("/big.bin", "bytes=10000-")
    assert dest.read_bytes() == payload and not part.exists()


def test_server_without_range_support_restarts_cleanly(data_server, tmp_path):
    payload = b"0123456789" * 50
    data_server.files["/f.bin"] = payload
    data_server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(payload[:100])
    fetch(f"{data_server.url}/f.bin", tmp_path / "f.bin", sha256(payload), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == payload


def test_corrupted_download_is_rejected_and_removed(data_server, tmp_path):
    good = make_tar({"a.txt": b"alpha"})
    data_server.files["/toy.tar.gz"] = good[:-10] + b"X" * 10
    sources = {"toy": (Source(f"{data_server.url}/toy.tar.gz", "toy.tar.gz", sha256(good)),)}
    with pytest.raises(FcnsegError, match="sha256 checksum mismatch.*removed"):
        download_dataset("toy", tmp_path, sources=sources, progress=False)
    assert not (tmp_path / "a.txt").exists()
    assert not list((tmp_path / "downloads").iterdir())


@pytest.mark.parametrize("members,links", [
    ({"../evil.txt": b"x"}, None),
    ({"ok/../../evil.txt": b"x"}, None),
    ({"/tmp/fcnseg-evil.txt": b"x"}, None),
    ({"a.txt": b"a"}, {"escape": "../../evil"}),
    ({"a.txt": b"a"}, {"abs": "/etc/passwd"}),
])
def test_hostile_tar_members_are_refused(data_server, tmp_path, members, links):
    archive = make_tar(members, links)
    data_server.files["/bad.tar.gz"] = archive
    root = tmp_path / "root"
    sources = {"bad": (Source(f"{data_server.url}/bad.tar.gz", "bad.tar.gz", sha256(archive)),)}
    with pytest.raises(FcnsegError, match="refusing the archive"):
        download_dataset("bad", root, sources=sources, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (root / "a.txt").exists()
    assert not list(root.glob("escape")) and not list(root.glob("abs"))


def test_hostile_zip_member_is_refused_and_strip_keeps_a_subfolder(data_server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.txt", b"x")
    data_server.files["/bad.zip"] = buf.getvalue()
    with pytest.raises(FcnsegError, match="refusing the archive"):
        download_dataset("bad", tmp_path / "r", progress=False,
                         sources={"bad": (Source(f"{data_server.url}/bad.zip", "bad.zip", sha256(buf.getvalue())),)})
    assert not (tmp_path / "evil.txt").exists()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Repo-master/README", b"readme")
        zf.writestr("Repo-master/CamVid/train/0001.png", b"png")
    data_server.files["/repo.zip"] = buf.getvalue()
    root = tmp_path / "camvid"
    download_dataset("camvid", root, progress=False, sources={"camvid": (
        Source(f"{data_server.url}/repo.zip", "repo.zip", None, strip="Repo-master/CamVid"),)})
    assert (root / "train" / "0001.png").read_bytes() == b"png" and not (root / "README").exists()


def test_download_command_reports_unknown_names_and_failures(data_server, tmp_path, capsys, monkeypatch):
    assert main(["data", "download", "nyudv2", "--root", str(tmp_path)]) == 1
    assert "valid names: camvid, sbd, siftflow, voc, voc2011, voc2012" in capsys.readouterr().err
    monkeypatch.setitem(dl.SOURCES, "camvid", (Source(f"{data_server.url}/missing.zip", "x.zip", None),))
    assert main(["data", "download", "camvid", "--root", str(tmp_path), "--no-progress"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_siftflow_release_is_converted_to_the_dataset_layout(data_server, tmp_path):
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    from fcnseg.data import build_dataset

    cat = "spatial_envelope_256x256_static_8outdoorcategories"
    labels = np.random.default_rng(0).integers(0, 34, (8, 8)).astype(np.uint8)
    mat, jpg = io.BytesIO(), io.BytesIO()
    savemat(mat, {"S": labels.astype(np.float64), "names": np.array(["awning"], dtype=object)})
    Image.new("RGB", (8, 8), (10, 200, 30)).save(jpg, format="JPEG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"SemanticLabels/{cat}/coast_1.mat", mat.getvalue())
        zf.writestr(f"Images/{cat}/coast_1.jpg", jpg.getvalue())
    data_server.files["/sf.zip"] = buf.getvalue()
    data_server.files["/trainval.txt"] = b"coast_1\n"
    download_dataset("siftflow", tmp_path, progress=False, sources={"siftflow": (
        Source(f"{data_server.url}/sf.zip", "sf.zip", sha256(buf.getvalue())),
        Source(f"{data_server.url}/trainval.txt", "trainval.txt", None, extract=False))})
    _, mask = build_dataset("siftflow", tmp_path, "trainval")[0]
    assert mask.tolist() == np.where(labels == 0, 255, labels.astype(np.int64) - 1).tolist()


# ---- bounded extraction ----------------------------------------------------------------------------------

def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _serve(server, tmp_path, archive: bytes, filename: str, **limits):
    server.files[f"/{filename}"] = archive
    root = tmp_path / "root"
    sources = {"toy": (Source(f"{server.url}/{filename}", filename, sha256(archive)),)}
    return root, lambda: download_dataset("toy", root, sources=sources, progress=False,
                                          limits=dl.ExtractLimits(**limits) if limits else dl.DEFAULT_LIMITS)


def _left_as_it_was(root):
    """Only the kept download: no extracted file, no staging folder, no marker."""
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == \
        ["downloads", *sorted(f"downloads/{p.name}" for p in (root / "downloads").iterdir())]
    assert not list((root / "downloads").glob("*.extracted"))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_compression_bombs_are_refused_by_the_default_ratio(data_server, tmp_path, kind):
    zeros = {"ok.txt": b"fine", "bomb.bin": bytes(4 << 20)}  # 4 MiB of zeros pack into a few kB
    archive = make_zip(zeros) if kind == "zip" else make_tar(zeros)
    assert len(archive) < 40_000
    root, run = _serve(data_server, tmp_path, archive, f"bomb.{kind}")
    with pytest.raises(FcnsegError, match=r"ratio [\d,]+, more than 100\b.*refusing the archive.*--max-ratio"):
        run()
    _left_as_it_was(root)


def test_total_size_and_member_count_limits(data_server, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()  # incompressible
    archive = make_zip({"a.bin": noise, "b.bin": noise})
    root, run = _serve(data_server, tmp_path, archive, "big.zip", max_bytes=5000)
    with pytest.raises(FcnsegError, match=r"declares more than 5,000 bytes.*--max-extract-gb"):
        run()
    _left_as_it_was(root)

    many = make_zip({f"d/{i}.txt": b"x" for i in range(60)})
    root, run = _serve(data_server, tmp_path / "2", many, "many.zip", max_members=50)
    with pytest.raises(FcnsegError, match=r"more than 50 members.*--max-members"):
        run()
    _left_as_it_was(root)
    download_dataset("toy", root, progress=False, limits=dl.ExtractLimits(max_members=61), sources={
        "toy": (Source(f"{data_server.url}/many.zip", "many.zip", sha256(many)),)})
    assert len(list((root / "d").iterdir())) == 60


def test_bytes_are_counted_while_streaming_when_headers_lie(data_server, tmp_path, monkeypatch):
    noise = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    archive = make_tar({"first.bin": noise, "second.bin": noise})
    monkeypatch.setattr(dl._Budget, "declare", lambda self, size: None)  # as if the headers said 0 bytes
    root, run = _serve(data_server, tmp_path, archive, "lies.tar.gz", max_bytes=6000)
    with pytest.raises(FcnsegError, match=r"writes more than 6,000 bytes"):
        run()
    _left_as_it_was(root)  # first.bin was unpacked, but only into the staging folder


def test_a_member_longer_than_its_header_is_refused(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"z" * 100)
    budget = dl._Budget(tmp_path / "x.zip", dl.DEFAULT_LIMITS)
    with pytest.raises(FcnsegError, match=r"member 'm' holds more than the 10 bytes its header declares"):
        budget.copy(io.BytesIO(b"y" * 11), tmp_path / "m", "m", 10)


def test_archives_sharing_a_root_are_merged(data_server, tmp_path):
    first, second = make_tar({"VOC/a/1.txt": b"1"}), make_zip({"VOC/a/2.txt": b"2", "VOC/b/3.txt": b"3"})
    data_server.files["/1.tar.gz"], data_server.files["/2.zip"] = first, second
    download_dataset("toy", tmp_path, progress=False, sources={"toy": (
        Source(f"{data_server.url}/1.tar.gz", "1.tar.gz", sha256(first)),
        Source(f"{data_server.url}/2.zip", "2.zip", sha256(second)))})
    found = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.txt"))
    assert found == ["VOC/a/1.txt", "VOC/a/2.txt", "VOC/b/3.txt"]
    assert not list(tmp_path.glob(".extracting-*"))


def test_download_command_takes_the_limits(data_server, tmp_path, capsys, monkeypatch):
    archive = make_zip({"a.txt": bytes(200_000)})
    data_server.files["/c.zip"] = archive
    monkeypatch.setitem(dl.SOURCES, "camvid", (Source(f"{data_server.url}/c.zip", "c.zip", sha256(archive)),))
    assert main(["data", "download", "camvid", "--root", str(tmp_path), "--no-progress", "--max-ratio", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.zip" in err[0] and "--max-ratio" in err[0]
    assert main(["data", "download", "camvid", "--root", str(tmp_path), "--no-progress", "--max-ratio", "2000"]) == 0
    assert (tmp_path / "a.txt").stat().st_size == 200_000
    assert main(["data", "download", "camvid", "--root", str(tmp_path), "--max-members", "0"]) == 1
    assert "--max-members must be positive" in capsys.readouterr().err
