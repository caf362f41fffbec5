"""Batch scoring: every image of a folder or of a HAM10000-style metadata CSV, into one CSV.

Images go through `/predict/batch` in requests of the server's batch limits, a few in flight. A
run never aborts over one row: a bad image, bad metadata (an age that is not a number) or a
metadata row whose image is missing becomes that row's `error`, and the others are scored (a
request the server refuses whole is retried image by image). The input columns (`image_id`,
`lesion_id`, `dx`, ...) are carried to the output, so labelled data can be evaluated from it.
With a `lesion_id` column, a lesion's images go in one request and every row also carries its
lesion's combined answer (`lesion_label`, `lesion_p_<class>`, ...: the server's lesion rule); a
resumed run scores a lesion again whole unless all of its rows were answered.
Rows are written as their requests complete (a killed run keeps them) and put back in input order
when the run ends. A rerun with the same output keeps the answered rows and retries the error rows.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lesion_client.client import AsyncLesionClient, Prior
from lesion_client.errors import LesionAPIError, LesionConnectionError, LesionError, LesionTimeout
from lesion_client.results import Failed, LesionFailed, LesionPrediction, Prediction, Triage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


LESION_COLUMN = "lesion_id"


@dataclass(frozen=True)
class Job:
    key: str  # the row's identity in the output: image_id for a CSV, the file name for a folder
    path: Path | None
    metadata: dict
    columns: dict[str, str]  # carried to the output as they came
    problem: str | None = None  # why this row cannot be sent (its error, without a request)

    @property
    def lesion(self) -> str | None:
        return self.columns.get(LESION_COLUMN) or None


@dataclass
class Source:
    jobs: list[Job]
    key_column: str
    input_columns: list[str]
    without_image: list[str] = field(default_factory=list)  # CSV rows whose image was not found

    @property
    def by_lesion(self) -> bool:
        return LESION_COLUMN in self.input_columns


def read_source(source: Path) -> Source:
    """A folder of images (metadata unknown) or a HAM10000-style metadata CSV beside its images."""
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        jobs = [Job(p.name, p, {}, {"image": p.name}) for p in paths]
        return Source(jobs, "image", ["image"])
    if source.suffix.lower() in IMAGE_SUFFIXES:
        raise LesionError(f"{source} is an image: score a folder or a metadata CSV, or use `lesion-client predict`")
    images = {p.stem.upper(): p for p in source.parent.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    try:
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LesionError(f"cannot read {source} as a CSV: {exc}") from None
    if "image_id" not in columns:
        raise LesionError(f"{source} has no image_id column (columns: {', '.join(columns) or 'none'})")
    out = Source([], "image_id", columns)
    for row in rows:
        path = images.get(row["image_id"].upper())
        problem = None
        if path is None:
            out.without_image.append(row["image_id"])
            problem = f"no image file {row['image_id']}.jpg or .png under {source.parent}"
        age = (row.get("age") or "").strip()
        try:
            age_value = float(age) if age else None
        except ValueError:
            age_value, problem = None, problem or f"age {age!r} is not a number of years"
        meta = {
            "age": age_value,
            "sex": row.get("sex") or None,
            "site": row.get("localization") or row.get("site") or None,
        }
        out.jobs.append(Job(row["image_id"], path, {k: v for k, v in meta.items() if v is not None}, row, problem))
    return out


@dataclass
class Summary:
    scored: int = 0
    errors: int = 0
    already_done: int = 0
    without_image: int = 0  # metadata rows whose image is missing: error rows too


class ResultsFile:
    """The output CSV: the input columns, then the answer's, then `error`; appended row by row."""

    def __init__(self, path: Path, source: Source, classes: list[str]) -> None:
        self.path, self.key = path, source.key_column
        self.columns = [*source.input_columns, "label", "malignant_probability"]
        self.columns += [f"p_{c}" for c in classes] + ["served_by", "prior", "ood_flagged", "ood_score"]
        self.columns += ["ood_image_score", "warnings", "triage", "triage_point", "triage_reason"]
        if source.by_lesion:
            self.columns += ["lesion_label", "lesion_malignant_probability", *(f"lesion_p_{c}" for c in classes)]
            self.columns += ["lesion_images", "lesion_warnings", "lesion_triage"]
        self.columns += ["bundle_id", "request_id", "error"]
        self.done: set[str] = set()
        try:
            new = not (path.exists() and path.stat().st_size)
            if not new:
                self.done = self.resume()
            self.file = open(path, "a", newline="", encoding="utf-8")
        except OSError as exc:
            raise LesionError(f"cannot write {path}: {exc.strerror or exc}") from None
        if new:
            self.write_text(self.csv_text([], header=True))

    def resume(self) -> set[str]:
        """The keys of the answered rows already written; error rows, and a partial last line left
        by a run killed mid-write, are dropped (the file rewritten without them) to be tried again."""
        with open(self.path, newline="", encoding="utf-8") as f:
            text = f.read()
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames != self.columns:
            raise LesionError(f"{self.path} holds other columns than this run writes; give a new output file")
        rows = list(reader)
        kept = [r for r in rows if None not in r.values() and None not in r and not r["error"]]
        if len(kept) < len(rows) or not text.endswith("\n"):
            self.replace(kept)
        return {row[self.key] for row in kept}

    def forget(self, keys: set[str]) -> None:
        """Drop these answered rows (their lesion is scored again whole)."""
        self.file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r[self.key] not in keys]
        self.replace(rows)
        self.done -= keys
        self.file = open(self.path, "a", newline="", encoding="utf-8")

    def replace(self, rows: list[dict]) -> None:
        """Rewrite the file with these rows, atomically (a kill leaves the old file or the new one)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self.csv_text(rows, header=True), encoding="utf-8")
        tmp.replace(self.path)

    def in_order(self, keys: list[str]) -> None:
        """Put the rows in `keys` order (the input's), once the run has written them all."""
        self.file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        rank = {k: i for i, k in enumerate(keys)}
        self.replace(sorted(rows, key=lambda r: rank.get(r[self.key], len(rank))))

    def csv_text(self, rows: list[dict], header: bool = False) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns)
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def write_text(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()  # one write per request: a killed run keeps every finished request's rows

    def write(self, rows: list[dict]) -> None:
        self.write_text(self.csv_text(rows))

    def close(self) -> None:
        self.file.close()


def lesion_fields(lesion: LesionPrediction | LesionFailed | str | None) -> dict:
    """The lesion columns: its combined answer, or (a string) why there is none."""
    if lesion is None:
        return {}
    if isinstance(lesion, str | LesionFailed):
        return {"lesion_warnings": lesion if isinstance(lesion, str) else lesion.detail}
    return {
        "lesion_label": lesion.label,
        "lesion_malignant_probability": lesion.malignant_probability,
        **{f"lesion_p_{c}": v for c, v in lesion.probabilities.items()},
        "lesion_images": len(lesion.images),
        "lesion_warnings": " | ".join(lesion.warnings),
        "lesion_triage": "" if lesion.triage is None else lesion.triage.decision,
    }


def triage_fields(t: Triage | None) -> dict:
    """refer, routine or not-triaged at the bundle's default point (empty: a bundle without points)."""
    if t is None:
        return {}
    return {"triage": t.decision, "triage_point": t.point, "triage_reason": t.reason}


def answer_row(job: Job, p: Prediction | Failed, lesion: LesionPrediction | LesionFailed | str | None = None) -> dict:
    if isinstance(p, Failed):
        return error_row(job, p.detail)
    probs = {f"p_{c}": v for c, v in p.probabilities.items()}
    return {
        **lesion_fields(lesion),
        **job.columns,
        "label": p.label,
        "malignant_probability": p.malignant_probability,
        **probs,
        "served_by": p.served_by,
        "prior": p.prior,
        "ood_flagged": "" if p.ood is None else str(p.ood.flagged).lower(),
        "ood_score": "" if p.ood is None else p.ood.score,
        "ood_image_score": "" if p.ood is None or p.ood.image_score is None else p.ood.image_score,
        "warnings": " | ".join(p.warnings),
        **triage_fields(p.triage),
        "bundle_id": p.model.bundle_id,
        "request_id": p.request_id,
        "error": "",
    }


def image_of(job: Job) -> Path:
    if job.path is None:  # a job without an image has a problem, and is never sent
        raise LesionError(f"{job.key}: {job.problem}")
    return job.path


def error_row(job: Job, message: str) -> dict:
    return {**job.columns, "error": message}


def ends_the_run(exc: LesionError) -> bool:
    """Failures every further request would share: the service unreachable or too slow (after the
    client's retries), or the key refused. Anything else belongs to the images of one request."""
    return isinstance(exc, LesionConnectionError | LesionTimeout) or (
        isinstance(exc, LesionAPIError) and exc.status in (401, 403)
    )


def error_message(exc: LesionError) -> str:
    if isinstance(exc, LesionAPIError):
        return f"HTTP {exc.status}: {exc.detail}" if exc.status >= 500 else exc.detail
    return str(exc)  # e.g. the file could not be read


async def score_one_by_one(client: AsyncLesionClient, chunk: list[Job], prior: Prior, why: str = "") -> list[dict]:
    """Each image in its own request; `why`: the lesion columns' note when its lesion got no combined answer."""
    rows = []
    for job in chunk:
        try:
            note = f"no lesion answer: {why}" if why and job.lesion else None
            rows.append(answer_row(job, await client.predict(image_of(job), **job.metadata, prior=prior), note))
        except LesionError as exc:
            if ends_the_run(exc):
                raise
            rows.append(error_row(job, error_message(exc)))
    return rows


async def score_lesions(client: AsyncLesionClient, chunk: list[Job], prior: Prior) -> list[dict]:
    """One request for the chunk, whose lesions are whole: every row with its lesion's answer."""
    ids = [j.lesion for j in chunk]
    out = await client.predict_lesions([image_of(j) for j in chunk], ids, [j.metadata for j in chunk], prior)
    return [answer_row(j, p, out.lesions.get(j.lesion) if j.lesion else None) for j, p in zip(chunk, out.images)]


async def score_by_lesion_after_failure(client: AsyncLesionClient, chunk: list[Job], prior: Prior) -> list[dict]:
    """A request refused whole: each lesion on its own, then image by image."""
    groups: dict[str, list[Job]] = {}
    for j in chunk:
        groups.setdefault(j.lesion or f"image:{j.key}", []).append(j)
    rows: list[dict] = []
    for group in groups.values():
        try:
            rows += await score_lesions(client, group, prior)
        except LesionError as exc:
            if ends_the_run(exc):
                raise
            rows += await score_one_by_one(client, group, prior, error_message(exc))
    return rows


async def score(
    client: AsyncLesionClient,
    source: Path,
    out: Path,
    in_flight: int = 4,
    progress: Callable[[int], None] | None = None,
    prior: Prior = None,
    started: Callable[[int], None] | None = None,
) -> Summary:
    """Score `source` into `out` (see the module docstring); `progress(n)` after each request;
    `prior` as in `LesionClient.predict` (None: the bundle's default); `started(n)` once the rows
    to score are known."""
    if in_flight < 1:
        raise LesionError(f"in_flight must be at least 1, not {in_flight}")
    src = read_source(source)
    info = await client.model()
    results = ResultsFile(out, src, info["classes"])
    if src.by_lesion:  # a lesion with a row still to score is scored again whole
        lesions: dict[str, list[str]] = {}
        for j in src.jobs:
            if j.lesion:
                lesions.setdefault(j.lesion, []).append(j.key)
        partial = {k for keys in lesions.values() if not set(keys) <= results.done for k in keys}
        if partial & results.done:
            results.forget(partial & results.done)
    todo = [j for j in src.jobs if j.key not in results.done]
    summary = Summary(already_done=len(src.jobs) - len(todo), without_image=len(src.without_image))
    if started:
        started(len(todo))
    unsendable = [j for j in todo if j.problem is not None]
    if unsendable:
        results.write([error_row(j, j.problem or "") for j in unsendable])
        summary.errors += len(unsendable)
        if progress:
            progress(len(unsendable))
    sendable = [j for j in todo if j.problem is None]
    if src.by_lesion:  # requests within the server's limits, each lesion whole in one
        try:
            plan = client.chunks(
                [image_of(j) for j in sendable], None, await client.limits(), [j.lesion for j in sendable]
            )
        except LesionError as exc:
            raise LesionError(f"{source}: {exc}") from None
        chunks = [[sendable[i] for i in rows] for rows in plan]
    else:
        size = await client.max_batch()
        chunks = [sendable[i : i + size] for i in range(0, len(sendable), size)]
    slots = asyncio.Semaphore(in_flight)

    async def run(chunk: list[Job]) -> None:
        async with slots:
            try:
                if src.by_lesion:
                    rows = await score_lesions(client, chunk, prior)
                else:
                    metas = [j.metadata for j in chunk]
                    preds = await client.predict_batch([image_of(j) for j in chunk], metas, prior)
                    rows = [answer_row(j, p) for j, p in zip(chunk, preds)]
            except LesionError as exc:
                if ends_the_run(exc):
                    raise
                if src.by_lesion:
                    rows = await score_by_lesion_after_failure(client, chunk, prior)
                else:
                    rows = await score_one_by_one(client, chunk, prior)  # one bad image fails its whole request
        results.write(rows)
        summary.scored += sum(1 for r in rows if not r["error"])
        summary.errors += sum(1 for r in rows if r["error"])
        if progress:
            progress(len(chunk))

    try:
        async with asyncio.TaskGroup() as tasks:  # one failure (server gone, key refused) cancels the rest
            for c in chunks:
                tasks.create_task(run(c))
    except ExceptionGroup as group:
        results.close()
        raise group.exceptions[0] from None  # the first failure, as the caller's own exception type
    except BaseException:  # Ctrl-C: what was written stays, in completion order, for a rerun to resume
        results.close()
        raise
    results.in_order([j.key for j in src.jobs])
    return summary
