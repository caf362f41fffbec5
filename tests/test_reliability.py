"""Scenario tier: the real server (uvicorn) under hostile clients, load, fuzzing and SIGTERM.

Every test talks only to 127.0.0.1, bounds its loops in count and time, and stops by itself.
The figures the README's reliability table quotes are printed with `-s` (marked `FIGURE`).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.helpers import REPO, free_port, sample_images, start_server

pytestmark = pytest.mark.scenario
MiB = 1024 * 1024


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


@pytest.fixture(scope="module")
def guarded(smoke_run):
    """A server with short deadlines and a key, to see them work quickly."""
    env = {
        "LESION_API_KEY": "k3y",
        "LESION_BODY_TIMEOUT_S": "2",
        "LESION_HEADER_TIMEOUT_S": "2",
    }
    proc, url = start_server(smoke_run / "bundle", env=env)
    yield proc, url
    proc.terminate()
    proc.wait(10)


def raw(url: str, data: bytes, read_timeout: float = 10) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; return what came back and how long it took to come."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=read_timeout)
    t = time.perf_counter()
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and b'"detail"' in out:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return out, time.perf_counter() - t


def test_key_is_checked_before_the_body_is_read(guarded):
    _, url = guarded
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    out, took = raw(url, head + b"Content-Length: 500000000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401") and took < 2, out[:200]


def test_chunked_bodies_are_counted_and_never_spooled(guarded):
    proc, url = guarded
    before = rss_mb(proc.pid)
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    )
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
    s.sendall(b"%x\r\n%s\r\n" % (len(part), part))  # a well-formed multipart start, then endless image bytes
    chunk = b"%x\r\n%s\r\n" % (MiB, b"a" * MiB)
    sent = 0
    try:
        for _ in range(600):  # up to 600 MiB, unless the server says stop
            s.sendall(chunk)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        answer = s.recv(65536)
    except (ConnectionResetError, TimeoutError):
        answer = b""
    s.close()
    print(
        f"FIGURE chunked: sent {sent} MiB before the server stopped reading; RSS {before:.0f} -> {rss_mb(proc.pid):.0f} MB"
    )
    limit_mib = 10 + 1  # LESION_MAX_UPLOAD_BYTES (10 MiB) + the form's other fields, rounded up
    assert answer.startswith(b"HTTP/1.1 413") or sent < limit_mib + 16, (sent, answer[:200])
    assert sent < limit_mib + 16  # stopped soon after the limit (socket buffers hold a few MiB)
    assert rss_mb(proc.pid) - before < 150
    assert httpx.get(url + "/health/ready").status_code == 200


def test_conflicting_length_headers_and_slow_clients(guarded):
    _, url = guarded
    out, _ = raw(
        url,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    # a body that stalls: 408 after the 2 s deadline
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: k3y\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    out, took = raw(url, head + b"Content-Length: 1000\r\n\r\n--b\r\n")
    assert out.startswith(b"HTTP/1.1 408") and took < 6, out[:200]
    # headers that never finish: the connection is closed after the 2 s deadline
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    t = time.perf_counter()
    s.sendall(b"GET /health/live HTTP/1.1\r\n")
    closed = False
    for _ in range(8):  # a header byte every 0.5 s
        try:
            s.sendall(b"X")
            if s.recv(1, socket.MSG_DONTWAIT) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.5)
    s.close()
    assert closed and time.perf_counter() - t < 6


def test_json_logs_hold_no_secrets_values_or_addresses(smoke_run, sample_dir):
    proc, url = start_server(smoke_run / "bundle", env={"LESION_API_KEY": "k3y", "LESION_LOG_JSON": "true"})
    jpeg = sample_images(sample_dir)[0].read_bytes()
    r = httpx.post(
        url + "/predict?token=SECRET-QUERY",
        files={"image": ("patient-jones.jpg", jpeg)},
        data={"metadata": '{"site": "face", "age": 77}'},
        headers={"X-API-Key": "k3y", "X-Request-ID": "find-me-1"},
        timeout=30,
    )
    assert r.status_code == 200
    time.sleep(0.3)
    proc.terminate()  # the log is read after the server stops
    proc.wait(30)
    text = proc.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines, text[-2000:]
    (mine,) = [x for x in lines if x.get("request_id") == "find-me-1"]
    assert mine["route"] == "/predict" and mine["status"] == 200 and mine["bundle_id"] and mine["latency_ms"] > 0
    for secret in ("SECRET-QUERY", "jones", "face", "k3y"):
        assert secret not in text, secret
    assert not any("client" in x for x in lines)  # no client addresses unless LESION_LOG_CLIENT_ADDRESS


def worst_case_png() -> bytes:
    """The most pixels the default limits admit (16 MP), in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (200, 150, 120)).save(buf, "PNG")
    return buf.getvalue()


def test_memory_under_eight_concurrent_worst_case_requests(smoke_run):
    proc, url = start_server(smoke_run / "bundle")  # default limits
    try:
        png = worst_case_png()
        idle = rss_mb(proc.pid)

        def call(_):
            return httpx.post(url + "/predict", files={"image": ("w.png", png)}, timeout=120).status_code

        for _ in range(2):
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(call, range(8))) == {200}
        peak, after = rss_mb(proc.pid, "VmHWM"), rss_mb(proc.pid)
        print(f"FIGURE worst case: RSS idle {idle:.0f} MB, peak {peak:.0f} MB, after the bursts {after:.0f} MB")
        assert peak < 1500 and after - idle < 150
    finally:
        proc.terminate()
        proc.wait(10)


def test_soak_2000_requests_8_clients(smoke_run, sample_dir):
    proc, server = start_server(smoke_run / "bundle")
    images = [p.read_bytes() for p in sample_images(sample_dir, 4)]
    failures, t = [], time.perf_counter()

    def call(i):
        try:
            r = httpx.post(
                server + "/predict", files={"image": images[i % 4]}, data={"metadata": '{"age": 50}'}, timeout=60
            )
            if r.status_code != 200:
                failures.append(r.status_code)
        except httpx.HTTPError as exc:
            failures.append(repr(exc))

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(100)))  # warm
            warm = rss_mb(proc.pid)
            list(pool.map(call, range(100, 2000)))
        took, end = time.perf_counter() - t, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    print(
        f"FIGURE soak: 2000 requests, 8 clients, {took:.0f} s, {2000 / took:.0f} req/s, failures {len(failures)}, "
        f"RSS after 100 {warm:.0f} MB, after 2000 {end:.0f} MB"
    )
    assert failures == [] and end - warm < 100


def test_sigterm_lets_requests_in_flight_finish(smoke_run, sample_dir):
    proc, url = start_server(smoke_run / "bundle")
    images = [("images", (p.name, p.read_bytes())) for p in sample_images(sample_dir, 4)] * 8  # 32 images a request
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + "/predict/batch", files=images, timeout=120) for _ in range(8)]
            time.sleep(0.5)  # the requests are in flight
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        print(f"FIGURE SIGTERM: {codes.count(200)} of 8 in-flight batch requests answered 200")
        assert codes == [200] * 8
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()


def test_schemathesis_finds_no_server_error(server):
    out = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "schemathesis")
            if (REPO / ".venv" / "bin" / "schemathesis").exists()
            else "schemathesis"
        ]
        + ["run", server + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", "30"]
        + ["--workers", "1", "--seed", "1", "--phases", "examples,coverage,fuzzing", "--request-timeout", "60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    cases = [line.strip() for line in out.stdout.splitlines() if "generated" in line]
    print("FIGURE schemathesis:", cases[-1] if cases else out.stdout[-500:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_readiness_does_not_flap_with_two_workers(smoke_run):
    """Poll from the moment the server starts: refused connections while loading, then only 200s."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--bundle",
        str(smoke_run / "bundle"),
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and seen[-40:].count(200) < 40:
            try:
                seen.append(httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code)
            except httpx.TransportError:
                time.sleep(0.05)
        assert seen[-40:] == [200] * 40 and set(seen) == {200}, seen
    finally:
        proc.terminate()
        proc.wait(30)
