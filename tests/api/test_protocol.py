"""The connection limits (header deadline, lingering close) are each app's own: two apps with their
own settings in one process, each behind its own server, keep theirs, and making an app writes
nothing process-wide that another app reads."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import starlette.requests
import uvicorn

from service.api.app import create_app
from service.api.forms import BoundedMultiPartParser
from service.api.protocol import DEFAULT_LIMITS, ConnectionLimits, HeaderDeadlineProtocol, connection_limits
from service.api.settings import Settings
from tests.helpers import free_port


def settings(**kw) -> Settings:
    return Settings(bundle=Path("no-bundle-needed"), **kw)  # never loaded: the servers run without lifespan


def loaded(app) -> uvicorn.Config:
    """uvicorn's config for `app` as `python -m service` sets it, loaded: `loaded_app` is the app in
    uvicorn's own middleware (proxy headers), as a connection's protocol sees it."""
    config = uvicorn.Config(app, http=HeaderDeadlineProtocol, lifespan="off", log_config=None)
    config.load()
    return config


def test_each_app_gives_its_connections_its_own_limits():
    first = create_app(settings(header_timeout_s=0.5, close_linger_s=1.0, max_upload_bytes=1_000_000))
    second = create_app(settings(header_timeout_s=7.0, close_linger_s=3.0, max_upload_bytes=4_000_000))
    for app in (first, second):
        s = app.state.settings
        want = ConnectionLimits(s.header_timeout_s, s.close_linger_s, s.largest_body_bytes())
        assert connection_limits(loaded(app).loaded_app) == want
    assert connection_limits(loaded(first).loaded_app).header_timeout_s == 0.5  # the later app changed nothing

    async def other_app(scope, receive, send):  # not one create_app made: the defaults
        pass

    assert connection_limits(loaded(other_app).loaded_app) == DEFAULT_LIMITS


def test_making_an_app_writes_no_process_wide_state():
    """Neither the protocol class nor the multipart parser (nor Starlette's choice of parser) holds
    a setting of the last app made."""
    create_app(settings())  # the parser is installed once, the same for every app

    def snapshot():
        return (
            dict(vars(HeaderDeadlineProtocol)),
            dict(vars(BoundedMultiPartParser)),
            starlette.requests.MultiPartParser,
        )

    before = snapshot()
    create_app(settings(header_timeout_s=1.5, close_linger_s=0.5, max_upload_bytes=123_456, max_metadata_bytes=99))
    assert snapshot() == before


@contextmanager
def served(app):
    """A real uvicorn server (the protocol `python -m service` uses) for `app`, in this process."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=HeaderDeadlineProtocol, lifespan="off", log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def closed_after(conns: dict[str, socket.socket], limit_s: float) -> dict[str, float]:
    """Seconds until the server closed each connection (none sends more), or inf past limit_s."""
    t0, out = time.monotonic(), {}
    for s in conns.values():
        s.setblocking(False)
    while len(out) < len(conns) and time.monotonic() - t0 < limit_s:
        for name, s in conns.items():
            if name in out:
                continue
            try:
                if s.recv(1024) == b"":
                    out[name] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:  # a reset: closed all the same
                out[name] = time.monotonic() - t0
        time.sleep(0.02)
    return {name: out.get(name, float("inf")) for name in conns}


@pytest.mark.scenario
def test_two_servers_in_one_process_keep_their_own_header_deadline():
    """Headers that never finish: each server closes the connection at its own app's deadline,
    whichever app was made last."""
    quick = create_app(settings(header_timeout_s=0.5))
    patient = create_app(settings(header_timeout_s=3.0))
    hasty = create_app(settings(header_timeout_s=0.5))  # made last: it must not shorten `patient`'s deadline
    with served(quick) as q, served(patient) as p, served(hasty):
        assert httpx.get(p + "/nowhere").status_code == 404  # complete headers are served as ever
        conns = {}
        for name, url in (("quick", q), ("patient", p)):
            host, port = url.removeprefix("http://").split(":")
            conns[name] = socket.create_connection((host, int(port)), timeout=5)
            conns[name].sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        took = closed_after(conns, limit_s=10)
        for s in conns.values():
            s.close()
    assert took["quick"] < 2.0, took
    assert 2.5 < took["patient"] < 6.0, took
