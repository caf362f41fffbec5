"""Micro-batching: concurrent requests share model calls, and each caller gets its own answer."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from service.api.batching import BatcherStopped, MicroBatcher
from service.api.settings import Settings
from service.core.metadata import ClinicalMetadata
from service.core.predictor import Prediction
from service.core.preprocess import load_for_model


def echo_model(calls: list[int], fail_on: int | None = None, delay: float = 0.02):
    """A stand-in for Predictor.predict: answers each image with its own first pixel value."""

    def predict(model, images: np.ndarray, metas: list[ClinicalMetadata]) -> list[Prediction]:
        calls.append(len(images))
        time.sleep(delay)  # a model call takes time, so requests queue behind it
        if fail_on is not None and fail_on in images[:, 0, 0, 0]:
            raise RuntimeError("bad item")
        return [
            Prediction({"m": np.array([float(img[0, 0, 0]), float(meta.age or 0)])}, "m")
            for img, meta in zip(images, metas)
        ]

    return predict


def run_concurrently(batcher: MicroBatcher, n: int) -> list:
    async def main():
        batcher.start()
        try:
            tasks = [
                batcher.submit("m", np.full((1, 4, 4, 3), i, np.uint8), [ClinicalMetadata(age=i)]) for i in range(n)
            ]
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_model_calls_and_get_their_own_answers():
    calls: list[int] = []
    observed: list[int] = []
    batcher = MicroBatcher(echo_model(calls), max_batch=8, max_wait_s=0, observe=lambda n, s: observed.append(n))
    results = run_concurrently(batcher, 20)
    for i, (pred,) in enumerate(results):
        assert pred.probabilities.tolist() == [i, i]  # image i and metadata i came back to caller i
    assert sum(calls) == 20 and max(calls) == 8 and len(calls) < 20  # gathered, never over max_batch
    assert observed == calls


def test_a_lone_request_is_not_held_back():
    calls: list[int] = []
    batcher = MicroBatcher(echo_model(calls, delay=0), max_batch=8, max_wait_s=0, observe=lambda n, s: None)
    (pred,) = run_concurrently(batcher, 1)[0]
    assert calls == [1] and pred.probabilities[0] == 0


def test_max_wait_gathers_requests_that_arrive_apart():
    calls: list[int] = []
    batcher = MicroBatcher(echo_model(calls, delay=0), max_batch=4, max_wait_s=1.0, observe=lambda n, s: None)

    async def main():
        batcher.start()
        tasks = []
        for i in range(4):
            tasks.append(
                asyncio.ensure_future(batcher.submit("m", np.full((1, 4, 4, 3), i, np.uint8), [ClinicalMetadata()]))
            )
            await asyncio.sleep(0.01)
        out = await asyncio.gather(*tasks)
        await batcher.stop()
        return out

    asyncio.run(main())
    assert calls == [4]  # the first waited for the other three (the batch filled before the second passed)


def test_one_failing_item_fails_only_its_own_request():
    calls: list[int] = []
    batcher = MicroBatcher(echo_model(calls, fail_on=3), max_batch=8, max_wait_s=0, observe=lambda n, s: None)
    results = run_concurrently(batcher, 8)
    assert isinstance(results[3], RuntimeError)
    assert all(r[0].probabilities[0] == i for i, r in enumerate(results) if i != 3)


def test_http_answers_under_concurrency_match_one_by_one(app_factory, tiny_run, predictor, sample_dir):
    """Through the app: 12 concurrent /predict calls, each with its own image and metadata."""
    api = app_factory(tiny_run / "bundle", batch_max_size=16, batch_max_wait_ms=50)
    paths = sorted((sample_dir / "images").iterdir())[:12]
    metas = [{"age": 20 + 5 * i, "sex": ["male", "female"][i % 2], "site": "back"} for i in range(12)]
    answers: dict[int, dict] = {}

    def call(i: int) -> None:
        r = api.post("/predict", files={"image": paths[i].read_bytes()}, data={"metadata": json.dumps(metas[i])})
        answers[i] = r.json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spec = predictor.manifest.preprocessing
    for i, path in enumerate(paths):
        (alone,) = predictor.predict(load_for_model(path.read_bytes(), spec)[None], [metas[i]])
        got = answers[i]["components"]
        for name, probs in alone.components.items():
            assert np.allclose([got[name][c] for c in predictor.manifest.classes], probs, atol=1e-5), (i, name)
    text = api.get("/metrics").text
    count = next(line for line in text.splitlines() if line.startswith("lesion_model_batch_images_count"))
    total = next(line for line in text.splitlines() if line.startswith("lesion_model_batch_images_sum"))
    assert float(total.split()[-1]) > float(count.split()[-1])  # some model call held more than one image


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_thread_budget_never_oversubscribes_the_cores(workers, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    budget = Settings(workers=workers).thread_budget()
    assert budget.onnxruntime * workers == 8 and budget.decode * workers == 8 and budget.boosters == 1


def test_boosters_run_on_the_budgeted_threads(tiny_run):
    from service.core.predictor import Predictor

    p = Predictor.load(tiny_run / "bundle", model_threads=1)
    features = np.random.default_rng(0).random((3, len(p.manifest.features.names)), np.float32)
    for booster in p.manifest.boosters:
        model, fn = p.models[booster.name], p.probabilities[booster.name]
        keywords = getattr(fn, "keywords", {})  # functools.partial(..., thread_count=1 or threads=1)
        assert model.get_params().get("n_jobs") == 1 or keywords == {"thread_count": 1}, booster.name
        if type(model).__module__.startswith("lightgbm"):
            assert keywords == {"threads": 1}  # its own booster, called with num_threads
        got, expected = fn(features), model.predict_proba(features)
        assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-6), booster.name  # same numbers


def test_lightgbm_binary_probabilities_have_both_columns():
    from lightgbm import LGBMClassifier

    from service.core.predictor import probability_fn

    rng = np.random.default_rng(0)
    x, y = rng.random((60, 3)), rng.integers(0, 2, 60)
    model = LGBMClassifier(n_estimators=5, min_child_samples=5, verbose=-1).fit(x, y)
    got = probability_fn(model, 1)(x[:4])
    assert got.shape == (4, 2) and np.allclose(got, model.predict_proba(x[:4]))


def test_the_service_caps_numpy_blas_at_the_boosters_threads(tiny_run):
    """After a multi-threaded BLAS call its threads keep spinning and slow the next CNN call: the
    service caps numpy's BLAS at `booster_threads` for the process when it loads the model, and
    never raises it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from service.api.state import ModelState
    from service.core.predictor import limit_numpy_blas

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):  # restores the test process's setting after
        assert blas_threads() == {2}
        ModelState().load(Settings(bundle=tiny_run / "bundle", booster_threads=1))
        assert blas_threads() == {1}
        limit_numpy_blas(4)
        assert blas_threads() == {1}


def test_requests_pending_when_the_batcher_stops_are_answered():
    calls: list[int] = []
    batcher = MicroBatcher(echo_model(calls, delay=0.2), max_batch=1, max_wait_s=0, observe=lambda n, s: None)

    async def main():
        batcher.start()
        image = np.zeros((1, 4, 4, 3), np.uint8)
        tasks = [asyncio.ensure_future(batcher.submit("m", image, [ClinicalMetadata()])) for _ in range(3)]
        await asyncio.sleep(0.05)  # the first is in the model, two are queued
        await batcher.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(BatcherStopped):
            await batcher.submit("m", image, [ClinicalMetadata()])
        return results

    results = asyncio.run(main())
    assert [type(r) for r in results] == [BatcherStopped] * 3  # nobody waits forever


def test_a_stopped_batcher_makes_the_worker_unready(app_factory, tiny_run, sample_dir):
    api = app_factory(tiny_run / "bundle")
    assert api.get("/health/ready").status_code == 200
    api.portal.call(api.app.state.model.batcher.stop)
    assert api.get("/health/ready").status_code == 503
    r = api.post("/predict", files={"image": sorted((sample_dir / "images").iterdir())[0].read_bytes()})
    assert r.status_code == 503 and r.json()["request_id"]


def test_each_image_is_answered_by_the_model_that_accepted_it():
    """Across a bundle swap: one queue, but a model call never mixes two models' images."""
    seen: list[tuple[str, int]] = []

    def predict(model, images, metas):
        seen.append((model, len(images)))
        return [Prediction({model: np.array([float(img[0, 0, 0])])}, model) for img in images]

    batcher = MicroBatcher(predict, max_batch=8, max_wait_s=0.05, observe=lambda n, s: None)

    async def main():
        batcher.start()
        try:
            tasks = [
                batcher.submit("old" if i % 2 else "new", np.full((1, 4, 4, 3), i, np.uint8), [ClinicalMetadata()])
                for i in range(6)
            ]
            return await asyncio.gather(*tasks)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert [r[0].served for r in results] == ["new", "old"] * 3
    assert [int(r[0].probabilities[0]) for r in results] == list(range(6))
    assert sorted(m for m, _ in seen) == ["new", "old"] and sum(n for _, n in seen) == 6
