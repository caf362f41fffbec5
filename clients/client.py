"""`LesionClient`: a small synchronous httpx client for the inference service."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx


class LesionAPIError(RuntimeError):
    """The server answered with an error; `status` and the server's `detail` message are kept."""

    def __init__(self, status: int, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.request_id = status, detail, request_id


class LesionClient:
    """Retries connection errors and 503 (model still loading) with backoff; raises LesionAPIError otherwise."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.backoff = retries, backoff

    def __enter__(self) -> "LesionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                if attempt == self.retries:
                    raise ConnectionError(f"cannot reach the service at {self._http.base_url}: {exc}") from None
            else:
                if r.status_code != 503 or attempt == self.retries:
                    break
            time.sleep(self.backoff * 2**attempt)
        if r.is_error:
            try:
                body = r.json()
                raise LesionAPIError(r.status_code, body.get("detail", r.text), body.get("request_id"))
            except (ValueError, AttributeError):
                raise LesionAPIError(r.status_code, r.text) from None
        return r.json()

    def predict(
        self, image: str | Path | bytes, age: float | None = None, sex: str | None = None, site: str | None = None
    ) -> dict:
        data = Path(image).read_bytes() if not isinstance(image, bytes) else image
        name = Path(image).name if not isinstance(image, bytes) else "image"
        meta = {k: v for k, v in dict(age=age, sex=sex, site=site).items() if v is not None}
        return self._request("POST", "/predict", files={"image": (name, data)}, data={"metadata": json.dumps(meta)})

    def predict_batch(self, images: list[str | Path], metadata: list[dict] | None = None) -> dict:
        files = [("images", (Path(p).name, Path(p).read_bytes())) for p in images]
        data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
        return self._request("POST", "/predict/batch", files=files, data=data)

    def model(self) -> dict:
        return self._request("GET", "/model")

    def ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False
