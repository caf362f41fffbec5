"""The Python client without a server: retries and connection errors."""

from __future__ import annotations

import httpx
import pytest

from clients.client import LesionClient
from tests.helpers import free_port


def test_client_retries_while_the_model_loads():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"detail": "model is still loading"})
        return httpx.Response(200, json={"classes": ["akiec"]})

    c = LesionClient("http://test", retries=3, backoff=0.01)
    c._http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    assert c.model() == {"classes": ["akiec"]} and len(calls) == 3


def test_unreachable_server_is_a_connection_error():
    with LesionClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as c:
        with pytest.raises(ConnectionError, match="cannot reach"):
            c.model()
