"""Micro-batching: concurrent requests share one model call.

Every image a worker predicts goes through one queue. A single task takes what is waiting (up
to `max_batch`, waiting at most `max_wait_s` for more), runs the whole stack once on it in the
model thread, and hands each caller its own row. While a batch runs, new requests queue, so under
load batches grow by themselves; a lone request on an idle worker starts at once (with the
default wait of 0 it never waits for company). One model call at a time also means the CNN's
threads never compete with another call's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.metadata import ClinicalMetadata
from service.core.predictor import Prediction

log = logging.getLogger("service")
PredictFn = Callable[[Any, np.ndarray, list[ClinicalMetadata]], list[Prediction]]  # (model, images, metadata)


class BatcherStopped(RuntimeError):
    """The batcher is not running: the service answers 503."""


@dataclass
class Item:
    model: Any  # the model the request was accepted by: it answers, even if another was swapped in since
    image: np.ndarray  # HxWx3 uint8, already decoded and resized
    metadata: ClinicalMetadata
    future: asyncio.Future


class MicroBatcher:
    def __init__(
        self, predict: PredictFn, max_batch: int, max_wait_s: float, observe: Callable[[int, float], None]
    ) -> None:
        self.predict, self.max_batch, self.max_wait_s, self.observe = predict, max_batch, max_wait_s, observe
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        # its own thread: model calls never queue behind requests that hold the shared pool's threads
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.serve(), name="micro-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=False)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, model: Any, images: np.ndarray, metadata: Sequence[ClinicalMetadata]) -> list[Prediction]:
        """Queue each image for `model`; returns their predictions, in order, once their batches have run."""
        if not self.running:
            raise BatcherStopped("the model is not accepting work (shutting down or failed); retry later")
        loop = asyncio.get_running_loop()
        items = [Item(model, img, meta, loop.create_future()) for img, meta in zip(images, metadata)]
        for item in items:
            self.queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for item in items:  # one failed: the others need no answer (and no "never retrieved" warning)
                if not item.future.done():
                    item.future.cancel()
                elif not item.future.cancelled():
                    item.future.exception()

    async def next_batch(self) -> list[Item]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [i for i in batch if not i.future.done()]  # a caller that went away was cancelled

    async def serve(self) -> None:
        batch: list[Item] = []
        try:
            while True:
                batch = await self.next_batch()
                if batch:
                    await self.run(batch)
        finally:  # stopped or crashed: nobody may wait forever for an answer
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherStopped("the model stopped before answering; retry"))

    async def run(self, batch: list[Item]) -> None:
        """One model call per model in the batch (two only while a new bundle is being swapped in)."""
        models = list({id(i.model): i.model for i in batch}.values())
        for model in models:
            await self.run_one_model([i for i in batch if i.model is model])

    async def run_one_model(self, batch: list[Item]) -> None:
        t0 = time.perf_counter()
        try:
            images, metas = np.stack([i.image for i in batch]), [i.metadata for i in batch]
            model = batch[0].model
            preds = await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, model, images, metas)
            if len(preds) != len(batch):
                raise RuntimeError(f"{len(batch)} images in, {len(preds)} predictions out")
            self.observe(len(batch), time.perf_counter() - t0)
        except Exception as exc:
            if len(batch) > 1:  # one item's failure must not fail the others: run them one by one
                for item in batch:
                    await self.run_one_model([item])
                return
            log.exception("prediction failed")
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        for item, pred in zip(batch, preds):
            if not item.future.done():
                item.future.set_result(pred)
