"""``fcnseg serve`` under hostile use (issue 30): stalled uploads cut with 408 and the server's memory
bounded, a storm of disconnects logged one line each, uncertainty maps held to ``--max-pixels``,
multi-frame images and formats outside the allowlist refused, API keys that fail closed and work in
UTF-8, echoed input clipped, and a schemathesis run over the OpenAPI document. Servers bind 127.0.0.1;
every client is bounded in count and time."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fcnseg.cli import main
from fcnseg.data.io import DataFileError, read_image
from fcnseg.inference.segmenter import Segmenter
from fcnseg.serve import ServeSettings, create_app
from fcnseg.serve.app import entropy_png
from fcnseg.inference.uncertainty import normalized_entropy, to_png_array
from live_server import free_port, running_server
from tiny_models import env, png_bytes, random_image, tiny_checkpoint, write_launcher

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
MB = 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def seg(ckpt):
    return Segmenter.from_checkpoint(str(ckpt), batch_size=8)


def run_async(app, fn):
    """``fn(client)`` against ``app`` in one event loop, lifespan included (no limit on the URL's length)."""
    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                return await fn(client)

    return asyncio.run(go())


def error_of(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["status"] == resp.status_code, body
    return body["error"]


# -- a real `fcnseg serve` in a child process (its memory is measured on its own) ---------------------------

class ServerProcess:
    """``fcnseg serve`` (the tiny model registered) on 127.0.0.1 with its stderr in a file."""

    def __init__(self, folder: Path, ckpt: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        launcher = write_launcher(folder)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(launcher), "serve", "--checkpoint", f"tiny={ckpt}",
                                      "--port", str(self.port), "--log-level", "warning", *flags],
                                     env=env(), stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

    def memory_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (``VmRSS``) or at its peak so far (``VmHWM``), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} for the server")

    def reset_peak(self) -> None:
        """Start the server's ``VmHWM`` afresh from its resident memory now (Linux ``clear_refs`` 5), so that
        a test measures its own peak, not one an earlier test on this server reached."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: what Ctrl-C sends
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory, ckpt):
    # 8 places, 2 s for a body: small numbers so that the test's bounded clients reach every limit
    srv = ServerProcess(tmp_path_factory.mktemp("server"), ckpt, "--max-queue", "8", "--body-timeout", "2")
    data = png_bytes(random_image(48, 64, 1))
    assert httpx.post(f"{srv.url}/v1/segment?format=mask", content=data, timeout=60).status_code == 200  # warm
    yield srv
    srv.stop()


def open_upload(port: int, declared: int, body: bytes, timeout: float) -> socket.socket:
    """A raw POST /v1/segment that declares ``declared`` bytes and sends ``body`` (then stalls)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = (f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the whole answer of a response read until the server closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_stalled_uploads_are_cut_with_408_count_against_max_queue_and_memory_stays_bounded(server):
    # issue 30 finding 6: 100 connections declaring 20 MB and stalling after 19 MB raised the server's
    # memory by 1.9 GB and were held without end. Here 8 connections (the --max-queue) send 4 MB of a
    # declared 20 MB and stall; 4 more find every place taken.
    sent_per_upload = 4 * MB
    server.reset_peak()
    peak_before = server.memory_mb()
    stalled, started = [], []
    for i in range(8):
        started.append(time.monotonic())
        stalled.append(open_upload(server.port, 20 * MB, bytes([i]) * sent_per_upload, timeout=15))
    extra = [open_upload(server.port, 20 * MB, b"\x89PNG", timeout=15) for _ in range(4)]
    for sock in extra:  # refused before a byte of the body is read, at once
        status, answer = read_status(sock)
        assert status == 503 and b'"code":"queue_full"' in answer and b"8 requests are already in flight" in answer
        sock.close()
    for sock, t0 in zip(stalled, started):
        status, answer = read_status(sock)
        waited = time.monotonic() - t0
        assert status == 408, answer
        assert b'"code":"body_timeout"' in answer and b"of 20971520 bytes came" in answer
        assert b"connection: close" in answer.lower()
        assert 1.5 < waited < 8, waited  # cut at --body-timeout 2 s, not held
        sock.close()
    peak_growth = server.memory_mb("VmHWM") - peak_before
    # 32 MB of bodies arrived; each upload keeps at most 1 MB in memory (the rest goes to a temporary file)
    assert peak_growth < 24, f"the server's peak memory grew by {peak_growth:.0f} MB"
    # and the server goes on
    ok = httpx.post(f"{server.url}/v1/segment?format=json", content=png_bytes(random_image(32, 32, 2)), timeout=30)
    assert ok.status_code == 200 and ok.json()["width"] == 32


def test_a_stalled_1_mb_upload_with_4_bytes_sent_gets_408_within_the_body_timeout_and_is_closed(server):
    # issue 30 finding 6: "a 1 MB declared body with 4 bytes sent was held over 90 s"
    t0 = time.monotonic()
    sock = open_upload(server.port, 1_000_000, b"\x89PNG", timeout=15)
    status, answer = read_status(sock)  # returns once the server has closed its end
    waited = time.monotonic() - t0
    assert status == 408, answer
    assert b'"code":"body_timeout"' in answer
    assert b"did not arrive within 2 s (4 of 1000000 bytes came; --body-timeout sets the limit)" in answer
    assert b"connection: close" in answer.lower()
    assert 1.5 < waited < 8, waited  # cut at --body-timeout 2 s
    assert sock.recv(1) == b""  # and closed: nothing more comes on it
    sock.close()


def test_a_storm_of_disconnects_logs_one_line_each_and_no_traceback(server):
    # issue 30 finding 6: each client disconnect logged a ~75-line ClientDisconnect traceback, and uploads were
    # held in memory. 6 clients each declare 16 MB, send 8 MB and hang up.
    before = server.log()
    server.reset_peak()
    rss_before = server.memory_mb()
    socks = [open_upload(server.port, 16 * MB, bytes([i]) * (8 * MB), timeout=10) for i in range(6)]
    time.sleep(0.3)  # the server is reading their bodies
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 10
    while server.log().count("disconnected during the upload") - before.count("disconnected during the upload") < 6:
        assert time.monotonic() < deadline, server.log()[len(before):]
        time.sleep(0.1)
    time.sleep(0.3)
    peak_growth = server.memory_mb("VmHWM") - rss_before
    new = server.log()[len(before):]
    lines = [ln for ln in new.splitlines() if ln.strip()]
    assert len(lines) == 6, new
    for ln in lines:
        assert "POST /v1/segment: 127.0.0.1:" in ln and "disconnected during the upload, after" in ln
        assert "after 8388608 of 16777216 bytes" in ln  # every byte sent was read before the hang-up
    assert "Traceback" not in new and "ClientDisconnect" not in new
    assert httpx.get(f"{server.url}/healthz", timeout=5).json()["queue_depth"] == 0
    # 48 MB arrived; each upload keeps at most 1 MB in memory (the rest goes to a temporary file). Measured here:
    # 3.0 to 4.2 MB (7 storms, alone and after the stalled-upload test); cd31372, which held uploads in memory,
    # 54.7, 21.8 and 40.7 MB in 3 storms on one server
    assert peak_growth < 12, f"the server's peak memory grew by {peak_growth:.1f} MB"


def test_a_large_uncertainty_request_is_refused_before_decoding(server):
    # issue 30 finding 7: a 39.7 Mpx grey PNG (38 KB) with uncertainty=true peaked at 6.25 GB on camvid
    big = png_bytes(Image.new("L", (6300, 6300)))
    assert len(big) < 100_000
    server.reset_peak()
    peak_before = server.memory_mb()
    t0 = time.monotonic()
    resp = httpx.post(f"{server.url}/v1/segment?format=json&uncertainty=true", content=big, timeout=60)
    assert resp.status_code == 413 and error_of(resp)["code"] == "too_many_pixels"
    assert "5 class probabilities per pixel = 198450000 values; the limit is 40000000" in error_of(resp)["message"]
    assert time.monotonic() - t0 < 10
    assert server.memory_mb("VmHWM") - peak_before < 20


def test_fcnseg_serve_refuses_an_empty_or_unsendable_api_key_in_one_line(ckpt, capsys, monkeypatch):
    # issue 30 finding 12: `--api-key ''` served with no authentication and no warning
    assert main(["serve", "--checkpoint", str(ckpt), "--api-key", ""]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fcnseg: error: --api-key: the API key is empty, which would let anyone in: give a non-empty key, or serve "
        "without one\n")
    monkeypatch.setenv("FCNSEG_API_KEY", "")
    assert main(["serve", "--checkpoint", str(ckpt)]) == 1
    assert capsys.readouterr().err.startswith("fcnseg: error: $FCNSEG_API_KEY: the API key is empty")
    monkeypatch.delenv("FCNSEG_API_KEY")
    assert main(["serve", "--checkpoint", str(ckpt), "--api-key", " padded "]) == 1
    assert "leading or trailing spaces" in capsys.readouterr().err
    for key in ("", "a\nb"):
        with pytest.raises(ValueError):
            ServeSettings(api_key=key)


def test_a_non_ascii_api_key_works_through_a_real_server(seg):
    # issue 30 finding 12: the key was compared as str after latin-1 decoding: a UTF-8 key never matched
    key = "clé-ключ-鍵"
    data = png_bytes(random_image(32, 32, 3))
    with running_server(create_app({"tiny": seg}, ServeSettings(api_key=key))) as (_server, url, _thread):
        right = httpx.post(f"{url}/v1/segment", content=data, headers={"X-API-Key": key.encode()}, timeout=30)
        bearer = httpx.post(f"{url}/v1/segment", content=data, timeout=30,
                            headers={"Authorization": b"Bearer " + key.encode()})
        wrong = httpx.post(f"{url}/v1/segment", content=data, headers={"X-API-Key": key.encode()[:-1]}, timeout=30)
        latin1 = httpx.post(f"{url}/v1/segment", content=data, headers={"X-API-Key": key[:3].encode("latin-1")},
                            timeout=30)
        models = httpx.get(f"{url}/v1/models", headers={"X-API-Key": key.encode()}, timeout=30)
    assert right.status_code == bearer.status_code == models.status_code == 200
    assert wrong.status_code == latin1.status_code == 401


# -- multi-frame images and the format allowlist ----------------------------------------------------------

def frames(n: int) -> list[Image.Image]:
    return [random_image(24, 32, 10 + i) for i in range(n)]


def multi_frame_files(folder: Path) -> dict[str, tuple[Path, int]]:
    many = frames(3)
    files = {"animated GIF": (folder / "a.gif", 3), "APNG": (folder / "a.png", 3),
             "multi-page TIFF": (folder / "a.tif", 3), "animated WebP": (folder / "a.webp", 3)}
    for path, _ in files.values():
        many[0].save(path, save_all=True, append_images=many[1:], duration=100, loop=0)
    return files


def test_multi_frame_uploads_are_refused_as_fcnseg_predict_refuses_them(tmp_path, seg):
    # issue 30 finding 8: the service answered 200 for the first frame where predict refuses the file
    files = multi_frame_files(tmp_path)
    with TestClient(create_app({"tiny": seg})) as client:
        for kind, (path, n) in files.items():
            assert Image.open(path).n_frames == n, kind
            with pytest.raises(DataFileError) as refused:
                read_image(path)
            for resp in (client.post("/v1/segment", content=path.read_bytes()),
                         client.post("/v1/segment", files={"image": (path.name, path.read_bytes())})):
                err = error_of(resp)
                assert (resp.status_code, err["code"]) == (415, "multi_frame_image"), kind
                assert str(refused.value) == f"{path}: {err['message']}"  # predict's words, without the path
        single = tmp_path / "one.gif"
        frames(1)[0].save(single)
        assert client.post("/v1/segment", content=single.read_bytes()).status_code == 200


def many_large_frames(fmt: str, n: int = 50, side: int = 2000) -> bytes:
    """One ``fmt`` file of ``n`` grey ``side`` x ``side`` frames, each black with a small white square of its own
    (writers merge frames that are alike): quick to write and small on the wire, each frame ``side``² pixels
    once decoded."""
    frames_ = []
    for i in range(n):
        frame = Image.new("L", (side, side), 0)
        frame.paste(255, (37 * i, 37 * i, 37 * i + 16, 37 * i + 16))
        frames_.append(frame)
    options = {"GIF": dict(duration=100, loop=0, optimize=False), "PNG": dict(duration=100, loop=0),
               "TIFF": dict(compression="packbits")}[fmt]
    buf = io.BytesIO()
    frames_[0].save(buf, format=fmt, save_all=True, append_images=frames_[1:], **options)
    return buf.getvalue()


def test_uploads_of_many_large_frames_are_refused_by_a_real_server_before_the_frames_are_decoded(server):
    # issue 30 finding 8, through `fcnseg serve` and with its memory: 50 frames of 2000x2000 are 200 MB of grey
    # pixels (600 MB as RGB). Measured here: 415 in under 0.1 s, the server's peak 0 to 3.2 MB above its memory
    # before; cd31372 answered 200 for the first frame, its peak 69 to 218 MB above.
    message = ("image has 50 frames (multi-page TIFF or animated GIF/PNG/WebP); fcnseg reads single-frame images: "
               "save each frame as its own file")
    for kind, fmt in (("animated GIF", "GIF"), ("APNG", "PNG"), ("multi-page TIFF", "TIFF")):
        data = many_large_frames(fmt)
        assert Image.open(io.BytesIO(data)).n_frames == 50 and len(data) < 4 * MB, kind
        for how in ("raw body", "multipart"):
            server.reset_peak()
            before = server.memory_mb()
            t0 = time.monotonic()
            upload = dict(content=data) if how == "raw body" else dict(files={"image": (f"a.{fmt.lower()}", data)})
            resp = httpx.post(f"{server.url}/v1/segment?format=json", timeout=60, **upload)
            took = time.monotonic() - t0
            peak_growth = server.memory_mb("VmHWM") - before
            assert resp.status_code == 415, (kind, how, resp.text[:200])
            assert error_of(resp) == {"status": 415, "code": "multi_frame_image", "message": message}, (kind, how)
            assert took < 5, (kind, how, took)
            # one frame decoded would be 4 MB (grey) to 12 MB (RGB); all 50, 200 to 600 MB
            assert peak_growth < 16, f"{kind} ({how}): the server's peak memory grew by {peak_growth:.1f} MB"


def eps_bytes() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def test_only_the_allowed_formats_are_opened_and_eps_never_reaches_ghostscript(tmp_path, seg, monkeypatch):
    # issue 30 finding 14: an uploaded EPS was handed by Pillow to Ghostscript
    from PIL import EpsImagePlugin

    assert Image.open(io.BytesIO(eps_bytes())).format == "EPS"  # Pillow alone would take it as EPS
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        OSError("Ghostscript called")))
    im = random_image(20, 24, 4)
    refused = {}
    for fmt in ("ICO", "TGA", "PCX", "SGI", "DIB"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        refused[fmt] = buf.getvalue()
    refused["EPS"] = eps_bytes()
    allowed = {}
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        allowed[fmt] = buf.getvalue()
    with TestClient(create_app({"tiny": seg})) as client:
        for fmt, data in refused.items():
            assert Image.open(io.BytesIO(data)).format == fmt  # each is a real image of its format
            resp = client.post("/v1/segment", content=data)
            assert (resp.status_code, error_of(resp)["code"]) == (415, "unsupported_image"), fmt
            assert "PNG, JPEG, BMP, TIFF, WebP, PPM/PGM or GIF" in error_of(resp)["message"]
        for fmt, data in allowed.items():
            resp = client.post("/v1/segment?format=json", content=data)
            assert resp.status_code == 200 and resp.json()["width"] == 24, fmt
    assert calls == []


# -- uncertainty held to the pixel limit -------------------------------------------------------------------

def test_uncertainty_counts_class_probabilities_against_max_pixels(seg):
    # 5 classes: an uncertainty map of W x H needs 5 W H values, so with --max-pixels 10000 at most 2000 pixels
    settings = ServeSettings(max_pixels=10_000)
    fits, too_big = png_bytes(random_image(40, 50, 5)), png_bytes(random_image(41, 50, 6))
    with TestClient(create_app({"tiny": seg}, settings)) as client:
        ok = client.post("/v1/segment?format=json&uncertainty=true", content=fits)
        refused = client.post("/v1/segment?format=json&uncertainty=true", content=too_big)
        plain = client.post("/v1/segment?format=json", content=too_big)
        as_mask = client.post("/v1/segment?format=mask&uncertainty=true", content=too_big)  # no map for a mask
    assert ok.status_code == 200 and "uncertainty_png" in ok.json()
    assert refused.status_code == 413 and error_of(refused)["code"] == "too_many_pixels"
    assert error_of(refused)["message"] == (
        "an uncertainty map of a 50x41 image needs 5 class probabilities per pixel = 10250 values; the limit is "
        "10000 (--max-pixels); send at most 2000 pixels or leave out uncertainty")
    assert plain.status_code == as_mask.status_code == 200


def test_the_uncertainty_map_in_bands_equals_the_whole_one(seg):
    probs = seg.segment(random_image(37, 45, 7), probs=True).probs
    whole = to_png_array(normalized_entropy(probs))
    for band_values in (1, 5 * 45 * 3, 10**9):  # one row at a time, three rows, all at once
        banded = np.asarray(Image.open(io.BytesIO(entropy_png(probs, band_values))))
        np.testing.assert_array_equal(banded, whole)


# -- messages and the OpenAPI document ---------------------------------------------------------------------

def test_an_unknown_model_name_is_echoed_clipped(seg):
    # issue 30 finding 13: a 100 KB model name came back whole in the 404
    name = "m" * 60_000  # near the longest URL httpx sends

    async def go(client):
        return await client.post("/v1/segment", params={"model": name}, content=png_bytes(random_image(8, 8, 8)))

    resp = run_async(create_app({"tiny": seg}), go)
    err = error_of(resp)
    assert resp.status_code == 404 and err["code"] == "unknown_model"
    assert len(err["message"]) < 160 and "(60000 characters)" in err["message"] and err["message"].endswith("tiny")


def test_the_openapi_document_describes_the_upload_the_answers_and_the_errors(seg):
    # issue 30 finding 13: /v1/segment documented only 200/422 and no body; /metrics was declared JSON
    with TestClient(create_app({"tiny": seg}, ServeSettings(api_key="k"))) as client:
        doc = client.get("/openapi.json").json()
        metrics = client.get("/metrics", headers={"X-API-Key": "k"})
    segment = doc["paths"]["/v1/segment"]["post"]
    body = segment["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"] == {"type": "string", "format": "binary"}
    assert {"image/png", "image/jpeg", "application/octet-stream"} <= set(body)
    assert set(segment["responses"]) == {"200", "400", "401", "404", "408", "413", "415", "422", "500", "503", "504"}
    assert set(segment["responses"]["200"]["content"]) == {"application/json", "image/png", "image/jpeg"}
    assert segment["responses"]["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert {s for entry in segment["security"] for s in entry} == {"APIKeyHeader", "HTTPBearer"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert metrics.headers["content-type"].startswith("text/plain")


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_schemathesis_finds_nothing_against_a_live_server(tmp_path, seg, api_key):
    # issue 30 finding 13: ST103, ST105, ST202 against today's main; bounded: 10 examples per operation
    st = Path(sys.executable).with_name("st")
    assert st.exists(), "schemathesis is in the test extra (pip install -e .[test])"
    app = create_app({"tiny": seg}, ServeSettings(api_key=api_key, body_timeout_s=5))
    with running_server(app) as (_server, url, _thread):
        cmd = [str(st), "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "10", "--seed", "1",
               "--workers", "1", "--request-timeout", "20", "--no-color",
               "--generation-database", "none"]
        if api_key:
            cmd += ["--header", f"X-API-Key: {api_key}"]
        child_env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks",
                         PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "No issues found" in done.stdout and "passed" in done.stdout


def noise_png(side: int, seed: int) -> bytes:
    """A ``side`` x ``side`` RGB noise PNG stored without compression: about 3 side² bytes, on the wire and decoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


@pytest.mark.slow  # a server of its own, and 20 uploads of 8 MB, 4 of them segmented at 2.7 Mpx: about 20 s
def test_memory_a_burst_of_large_uploads_took_is_returned_once_the_burst_is_over(tmp_path, ckpt):
    # issue 30 finding 6: "repeated rounds reached 6.1 GB and memory is not returned". 20 uploads of 8 MB, 4 at
    # a time: every fifth a 1650x1650 noise PNG (decoded and segmented: 200), the others 8 MB that are no image
    # (read whole, then 415). On a server of its own, warmed with small requests only: a server that has held
    # large images before keeps that memory for the next burst to reuse, which would hide what one burst keeps.
    image = noise_png(1650, seed=11)
    assert 7.5 * MB < len(image) < 8.5 * MB
    bodies = [image if i % 5 == 0 else bytes([i]) * (8 * MB) for i in range(20)]
    server = ServerProcess(tmp_path, ckpt, "--max-queue", "8")
    try:
        small = png_bytes(random_image(48, 64, 1))
        for _ in range(3):
            assert httpx.post(f"{server.url}/v1/segment?format=mask", content=small, timeout=60).status_code == 200
        server.reset_peak()
        before = server.memory_mb()

        def post(body: bytes) -> int:
            return httpx.post(f"{server.url}/v1/segment?format=mask", content=body, timeout=60).status_code

        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(post, bodies))
        assert codes == [200 if i % 5 == 0 else 415 for i in range(20)]
        took = server.memory_mb("VmHWM") - before
        deadline = time.monotonic() + 5  # the memory goes back when the last request in flight is answered
        while (kept := server.memory_mb() - before) >= 150 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()
    # Measured (VmRSS about 720 MB before; 7 runs): the burst took 282 to 343 MB and the server kept 21 to 91 MB
    # of it. cd31372, which did not hand memory back, took 325 to 336 MB and kept 207 to 250 MB (3 runs).
    assert took > 150, f"the burst took only {took:.0f} MB, too little to show whether memory comes back"
    assert kept < 150, f"{kept:.0f} of the {took:.0f} MB the burst took are still held 5 s after it"


def test_freed_memory_is_handed_back_once_the_last_request_in_flight_is_answered(seg, ckpt, monkeypatch):
    # issue 30 finding 6: repeated rounds reached 6.1 GB and memory was not returned
    import uvicorn

    from fcnseg.cli import serve as serve_cli
    from fcnseg.serve import app as app_module

    trims, depth_at_trim = [], []
    app = create_app({"tiny": seg}, ServeSettings(return_memory=True))
    monkeypatch.setattr(app_module, "return_freed_memory",
                        lambda: (trims.append(1), depth_at_trim.append(app.state.in_flight.count)))
    data = png_bytes(random_image(40, 48, 9))

    async def go(client):
        answers = await asyncio.gather(*(client.post("/v1/segment", content=data) for _ in range(4)))
        for _ in range(100):  # the trim runs in a thread after the last answer
            if trims:
                break
            await asyncio.sleep(0.02)
        return answers

    assert all(r.status_code == 200 for r in run_async(app, go))
    assert trims and depth_at_trim == [0] * len(trims) and len(trims) < 4  # once the burst is over, not per request
    untrimmed = []
    quiet = create_app({"tiny": seg})  # a library user's app leaves the allocator alone
    monkeypatch.setattr(app_module, "return_freed_memory", lambda: untrimmed.append(1))
    assert run_async(quiet, lambda c: c.post("/v1/segment", content=data)).status_code == 200
    assert untrimmed == []
    # `fcnseg serve`, the program's entry point, opts in
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config))
    monkeypatch.setattr(serve_cli, "check_port", lambda host, port: None)
    assert main(["serve", "--checkpoint", f"m={ckpt}", "--body-timeout", "3"]) == 0
    settings = served[0].app.state.settings
    assert settings.return_memory and settings.body_timeout_s == 3
    assert main(["serve", "--checkpoint", f"m={ckpt}", "--body-timeout", "0"]) == 1
