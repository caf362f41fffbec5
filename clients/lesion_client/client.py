"""`LesionClient` (sync) and `AsyncLesionClient` (asyncio) for the inference service.

Both retry connection errors and 503 (a model still loading, a worker stopping) with exponential
backoff through tenacity, wrap every transport error in the package's own exceptions, read
`LESION_URL` and `LESION_API_KEY` from the environment when not given, and return typed results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from lesion_client.errors import LesionAPIError, LesionConnectionError, LesionError, LesionTimeout
from lesion_client.results import Failed, LesionResults, Prediction, batch_item

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MAX_BATCH = 32  # the service's default LESION_MAX_BATCH, for servers that do not say theirs
Image = str | Path | bytes  # a path to a JPEG/PNG, or its bytes


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, LesionConnectionError) or (isinstance(exc, LesionAPIError) and exc.status == 503)


def image_part(image: Image, field: str, i: int = 0) -> tuple[str, tuple[str, bytes]]:
    if isinstance(image, bytes):
        return field, (f"image{i}", image)
    path = Path(image)
    try:
        return field, (path.name, path.read_bytes())
    except OSError as exc:
        raise LesionError(f"cannot read {path}: {exc.strerror or exc}") from None


def image_bytes(image: Image) -> int:
    """The size of an image as sent (0 when a path cannot be read: its request reports that)."""
    if isinstance(image, bytes):
        return len(image)
    try:
        return Path(image).stat().st_size
    except OSError:
        return 0


Prior = str | dict[str, float] | None  # balanced, training, {class: prevalence}, or None: the bundle's default


def answer_fields(prior: Prior, triage_point: str | None = None) -> dict[str, str]:
    """The form fields that shape every answer: its class prior and the triage point decided at."""
    out = {} if triage_point is None else {"triage_point": triage_point}
    if prior is not None:
        out["prior"] = prior if isinstance(prior, str) else json.dumps(prior)
    return out


def metadata_of(age: float | None, sex: str | None, site: str | None) -> dict:
    return {k: v for k, v in dict(age=age, sex=sex, site=site).items() if v is not None}


def checked(r: httpx.Response) -> Any:
    """The JSON body of a successful response, or the server's error as `LesionAPIError`."""
    if r.is_error:
        try:
            body = r.json()
            detail, request_id, code = body.get("detail", r.text), body.get("request_id"), body.get("code")
        except (ValueError, AttributeError):
            detail, request_id, code = r.text, None, None
        raise LesionAPIError(r.status_code, str(detail), request_id, code)
    try:
        return r.json()
    except ValueError:
        raise LesionError(f"{r.request.url} answered {r.status_code} with a body that is not JSON") from None


class _Base:
    """What the sync and async clients share: settings, retry policy, request building, parsing."""

    http_class: type = httpx.Client

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`url` and `api_key` default to $LESION_URL (else http://127.0.0.1:8000) and $LESION_API_KEY;
        `retries` more attempts on connection errors and 503, `backoff` seconds doubling each time."""
        self.url = (url or os.environ.get("LESION_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LESION_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        self._http = self.http_class(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.retry_options: dict[str, Any] = dict(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(retries + 1),
            wait=wait_exponential(multiplier=backoff, max=30),
            reraise=True,
        )
        self._limits: tuple[int, int | None] | None = None  # the server's images and bytes per batch request

    def translated(self, exc: httpx.HTTPError) -> LesionError:
        if isinstance(exc, httpx.TimeoutException):
            return LesionTimeout(f"the service at {self.url} did not answer in time: {exc!r}")
        if isinstance(exc, httpx.TransportError):
            return LesionConnectionError(f"cannot reach the service at {self.url}: {exc}")
        return LesionError(f"request to {self.url} failed: {exc}")

    @staticmethod
    def predict_request(
        image: Image,
        age: float | None,
        sex: str | None,
        site: str | None,
        prior: Prior,
        explain: bool,
        triage_point: str | None = None,
    ) -> dict:
        data = {"metadata": json.dumps(metadata_of(age, sex, site)), **answer_fields(prior, triage_point)}
        if explain:
            data["explain"] = "true"
        return dict(files=[image_part(image, "image")], data=data)

    @staticmethod
    def batch_request(
        images: Sequence[Image],
        metadata: Sequence[dict] | None,
        prior: Prior,
        rows: Sequence[int],
        lesion_ids: Sequence[str | None] | None = None,
        triage_point: str | None = None,
    ) -> dict:
        """The multipart body for the images at `rows`."""
        files = [image_part(images[i], "images", i) for i in rows]
        data = {"metadata": json.dumps([metadata[i] for i in rows])} if metadata is not None else {}
        if lesion_ids is not None:
            data["lesion_ids"] = json.dumps([lesion_ids[i] for i in rows])
        return dict(files=files, data={**data, **answer_fields(prior, triage_point)})

    @staticmethod
    def chunks(
        images: Sequence[Image],
        metadata: Sequence[dict] | None,
        limits: tuple[int, int | None],
        lesion_ids: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """The rows of each request: consecutive runs within `limits` (images, bytes), an image over
        the byte limit alone. With `lesion_ids`, a lesion's images all go in one request (in the
        order of its first image), so that the server combines all of them."""
        for name, values in (("metadata objects", metadata), ("lesion ids", lesion_ids)):
            if values is not None and len(values) != len(images):
                raise LesionError(f"{len(images)} images but {len(values)} {name}")
        groups: dict[tuple[str, str | int], list[int]] = {}
        for i in range(len(images)):
            lesion = None if lesion_ids is None else lesion_ids[i]
            groups.setdefault(("lesion", lesion) if lesion is not None else ("image", i), []).append(i)
        size, max_bytes = limits
        out: list[list[int]] = []
        rows: list[int] = []
        total = 0
        for key, group in groups.items():
            if len(group) > size:
                raise LesionError(f"lesion {key[1]!r} has {len(group)} images, over the server's {size} per request")
            weight = sum(image_bytes(images[i]) for i in group)
            full = len(rows) + len(group) > size or (max_bytes is not None and total + weight > max_bytes)
            if rows and full:
                out.append(rows)
                rows, total = [], 0
            rows, total = rows + group, total + weight
        return out + ([rows] if rows else [])

    @staticmethod
    def limits_of(model: dict) -> tuple[int, int | None]:
        limits = model.get("limits", {})
        max_bytes = limits.get("max_batch_bytes")
        return int(limits.get("max_batch", DEFAULT_MAX_BATCH)), None if max_bytes is None else int(max_bytes)

    @staticmethod
    def batch_results(body: dict) -> list[Prediction | Failed]:
        return [batch_item(item, body) for item in body["predictions"]]


class LesionClient(_Base):
    """Synchronous client. `with LesionClient() as c: c.predict("lesion.jpg", age=50, sex="male")`."""

    http_class = httpx.Client

    def __enter__(self) -> LesionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in Retrying(**self.retry_options):
            with attempt:
                try:
                    return checked(self._http.request(method, path, **kwargs))
                except httpx.HTTPError as exc:
                    raise self.translated(exc) from None
        raise AssertionError("unreachable")  # tenacity re-raises the last error

    def predict(
        self,
        image: Image,
        age: float | None = None,
        sex: str | None = None,
        site: str | None = None,
        prior: Prior = None,
        explain: bool = False,
        triage_point: str | None = None,
    ) -> Prediction:
        """One image; `prior` moves the probabilities to a population's class shares, `explain`
        adds the heatmap and attributions (a second model pass), `triage_point` names the operating
        point `Prediction.triage` decides at (None: the bundle's default; GET /model lists them)."""
        request = self.predict_request(image, age, sex, site, prior, explain, triage_point)
        body = self.request("POST", "/predict", **request)
        return Prediction.from_json(body, body)

    def predict_batch(
        self,
        images: Sequence[Image],
        metadata: Sequence[dict] | None = None,
        prior: Prior = None,
        triage_point: str | None = None,
    ) -> list[Prediction | Failed]:
        """Paths or bytes, in order; sent in requests within the server's batch limits (images and
        bytes). An image the server could not use comes back as `Failed` (status, code, detail) in
        its place; the others are answered."""
        out: list[Prediction | Failed] = []
        for rows in self.chunks(images, metadata, self.limits()):
            request = self.batch_request(images, metadata, prior, rows, triage_point=triage_point)
            body = self.request("POST", "/predict/batch", **request)
            out += self.batch_results(body)
        return out

    def predict_lesions(
        self,
        images: Sequence[Image],
        lesion_ids: Sequence[str | None],
        metadata: Sequence[dict] | None = None,
        prior: Prior = None,
        triage_point: str | None = None,
    ) -> LesionResults:
        """As `predict_batch`, and one answer per lesion id from all of its images (the server's
        lesion rule); None as an id: that image belongs to no named lesion."""
        out = LesionResults([None] * len(images), {})  # every slot is filled below
        for rows in self.chunks(images, metadata, self.limits(), lesion_ids):
            request = self.batch_request(images, metadata, prior, rows, lesion_ids, triage_point)
            out.add(self.request("POST", "/predict/batch", **request), rows)
        return out

    def limits(self) -> tuple[int, int | None]:
        if self._limits is None:
            self._limits = self.limits_of(self.model())
        return self._limits

    def max_batch(self) -> int:
        return self.limits()[0]

    def model(self) -> dict:
        return self.request("GET", "/model")

    def ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncLesionClient(_Base):
    """asyncio client with the same methods, awaited: `async with AsyncLesionClient() as c: await c.predict(...)`."""

    http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncLesionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        async for attempt in AsyncRetrying(**self.retry_options):
            with attempt:
                try:
                    return checked(await self._http.request(method, path, **kwargs))
                except httpx.HTTPError as exc:
                    raise self.translated(exc) from None
        raise AssertionError("unreachable")

    async def predict(
        self,
        image: Image,
        age: float | None = None,
        sex: str | None = None,
        site: str | None = None,
        prior: Prior = None,
        explain: bool = False,
        triage_point: str | None = None,
    ) -> Prediction:
        request = self.predict_request(image, age, sex, site, prior, explain, triage_point)
        body = await self.request("POST", "/predict", **request)
        return Prediction.from_json(body, body)

    async def predict_batch(
        self,
        images: Sequence[Image],
        metadata: Sequence[dict] | None = None,
        prior: Prior = None,
        triage_point: str | None = None,
    ) -> list[Prediction | Failed]:
        out: list[Prediction | Failed] = []
        for rows in self.chunks(images, metadata, await self.limits()):
            request = self.batch_request(images, metadata, prior, rows, triage_point=triage_point)
            body = await self.request("POST", "/predict/batch", **request)
            out += self.batch_results(body)
        return out

    async def predict_lesions(
        self,
        images: Sequence[Image],
        lesion_ids: Sequence[str | None],
        metadata: Sequence[dict] | None = None,
        prior: Prior = None,
        triage_point: str | None = None,
    ) -> LesionResults:
        out = LesionResults([None] * len(images), {})  # every slot is filled below
        for rows in self.chunks(images, metadata, await self.limits(), lesion_ids):
            request = self.batch_request(images, metadata, prior, rows, lesion_ids, triage_point)
            out.add(await self.request("POST", "/predict/batch", **request), rows)
        return out

    async def limits(self) -> tuple[int, int | None]:
        if self._limits is None:
            self._limits = self.limits_of(await self.model())
        return self._limits

    async def max_batch(self) -> int:
        return (await self.limits())[0]

    async def model(self) -> dict:
        return await self.request("GET", "/model")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/health/ready")).status_code == 200
        except httpx.HTTPError:
            return False
