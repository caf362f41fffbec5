"""`lesion-client` (or `python -m lesion_client`): predict a few images, score many, show the model.

  lesion-client predict IMAGE [IMAGE ...] [--age N] [--sex S] [--site S] [--prior P] [--triage-point P]
                       [--explain] [--json]   (each answer leads with its triage: refer or routine)
  lesion-client predict VIEW [VIEW ...] --lesion ID [...]   (the images are views of one lesion: one answer)
  lesion-client score FOLDER_OR_METADATA_CSV --out OUT.csv [--in-flight 4] [--prior P]
                       (a CSV with a lesion_id column also gets each lesion's combined answer)
  lesion-client model
  lesion-client --version

`--url` and `--api-key` default to $LESION_URL and $LESION_API_KEY. Errors print `error: ...`, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm import tqdm

from lesion_client.client import AsyncLesionClient, LesionClient
from lesion_client.errors import LesionAPIError, LesionError
from lesion_client.results import LesionFailed, Prediction, Triage
from lesion_client.scoring import Summary, score


def caveats(p: Prediction) -> list[str]:
    """What to read before the answer: the out-of-distribution flag and the warnings."""
    lines = []
    ood = p.ood
    if ood is not None and ood.flagged:
        by = ood.flagged_by or (ood.method,)  # servers before the image check name none
        why = [f"{ood.method} {ood.score:.3g} > {ood.threshold:.3g}"] if ood.method in by else []
        if "image_statistics" in by:
            why.append(f"image statistics {ood.image_score:.3g} > {ood.image_threshold:.3g}")
        lines.append(f"  FLAGGED: out of distribution ({'; '.join(why)}); the answer may be meaningless")
    lines += [f"  WARNING: {w}" for w in p.warnings if not w.startswith("out of distribution")]
    return lines


def triage_line(t: Triage | None) -> list[str]:
    """The decision first, in words: what to do, and what the point promises."""
    if t is None:
        return []
    head = {"refer": "REFER", "routine": "routine", "not-triaged": "NOT TRIAGED"}.get(t.decision, t.decision)
    return [
        f"  triage: {head} at {t.point} (catches {t.sensitivity:.0%} of malignant lesions and clears "
        f"{t.specificity:.0%} of benign ones where the bundle measured it): {t.reason}"
    ]


def table(name: str, p: Prediction) -> str:
    lines = [f"{name}:", *triage_line(p.triage), *caveats(p)]
    lines.append(f"  {p.label} ({p.label_name}), malignant probability {p.malignant_probability:.1%}, prior {p.prior}")
    models = list(p.components)
    lines.append("  class  " + "".join(f"{m:>10}" for m in models))
    for c in p.probabilities:
        lines.append(f"  {c:<6} " + "".join(f"{p.components[m][c]:>10.3f}" for m in models))
    lines.append(f"  request id {p.request_id}")
    return "\n".join(lines)


def as_json(p: Prediction, heatmap: Path | None) -> dict:
    out = asdict(p)
    if p.explanation is not None:  # the PNG's bytes are in the file, not in the JSON
        out["explanation"] = {**out["explanation"], "heatmap_png": str(heatmap)}
    return out


def predict_lesion(args: argparse.Namespace) -> int:
    """--lesion: every image is a view of that lesion; each view's answer, then the lesion's."""
    if args.explain:
        raise LesionError("--explain is for single images; leave out --lesion to explain each view")
    meta = {k: v for k, v in dict(age=args.age, sex=args.sex, site=args.site).items() if v is not None}
    with LesionClient(args.url, args.api_key, timeout=args.timeout) as client:
        n = len(args.images)
        out = client.predict_lesions(
            args.images, [args.lesion] * n, [meta] * n, parse_prior(args.prior), args.triage_point
        )
    lesion = out.lesions[args.lesion]
    if args.json:
        print(
            json.dumps(
                {"images": {str(i): asdict(p) for i, p in zip(args.images, out.images)}, "lesion": asdict(lesion)},
                indent=2,
            )
        )
        return 0
    views = [
        table(str(i), p) if isinstance(p, Prediction) else f"{i}: no answer: {p.detail}"
        for i, p in zip(args.images, out.images)
    ]
    if isinstance(lesion, LesionFailed):
        print("\n\n".join(views) + f"\n\nlesion {args.lesion}: no answer: {lesion.detail}")
        return 1
    lines = [
        f"lesion {args.lesion}: {lesion.label} ({lesion.label_name}) from {len(lesion.images)} image(s), {lesion.combined_by}"
    ]
    lines += triage_line(lesion.triage)
    lines += [f"  malignant (mel + bcc + akiec): {lesion.malignant_probability:.3f}"]
    lines += [f"  {c}: {v:.3f}" for c, v in sorted(lesion.probabilities.items(), key=lambda kv: -kv[1])]
    lines += [f"  warning: {w}" for w in lesion.warnings]
    print("\n\n".join([*views, "\n".join(lines)]))
    first = next((p for p in out.images if isinstance(p, Prediction)), None)
    if first is not None:
        print("\n" + first.notice)
    return 0


def predict(args: argparse.Namespace) -> int:
    if args.lesion:
        return predict_lesion(args)
    with LesionClient(args.url, args.api_key, timeout=args.timeout) as client:
        results = {
            str(img): client.predict(
                img, args.age, args.sex, args.site, parse_prior(args.prior), args.explain, args.triage_point
            )
            for img in args.images
        }
    heatmaps = {}
    for name, p in results.items():
        if p.explanation is not None:
            heatmaps[name] = args.explain_dir / f"{Path(name).stem}.heatmap.png"
            args.explain_dir.mkdir(parents=True, exist_ok=True)
            heatmaps[name].write_bytes(p.explanation.heatmap_png)
    if args.json:
        out = {k: as_json(v, heatmaps.get(k)) for k, v in results.items()}
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))
    else:
        print("\n\n".join(table(k, v) for k, v in results.items()))
        for name, path in heatmaps.items():
            print(f"{name}: heatmap of {results[name].explanation.label} written to {path}")
        print("\n" + next(iter(results.values())).notice)
    return 0


def parse_prior(raw: str | None) -> str | dict | None:
    """--prior: balanced, training, or a JSON object of class prevalences."""
    if raw is None or not raw.strip().startswith("{"):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        raise LesionError(f"--prior is not valid JSON: {raw[:80]}") from None
    if not isinstance(value, dict):
        raise LesionError("--prior: give balanced, training, or a JSON object of class prevalences")
    return value


def score_command(args: argparse.Namespace) -> int:
    """Exit 0 when every row was answered, 1 when some rows hold an error (rerun to retry them)."""

    async def run() -> Summary:
        async with AsyncLesionClient(args.url, args.api_key, timeout=args.timeout) as client:
            with tqdm(desc="scoring", unit="img", disable=None) as bar:

                def started(total: int) -> None:
                    bar.reset(total=total)

                return await score(
                    client, args.source, args.out, args.in_flight, bar.update, parse_prior(args.prior), started
                )

    try:
        summary = asyncio.run(run())
    except KeyboardInterrupt:
        print(f"\ninterrupted: the rows written so far are in {args.out}; run the same command again to resume")
        return 130
    print(f"{args.out}: {summary.scored} images scored, {summary.errors} rows with an error (see their error column)")
    if summary.already_done:
        print(f"{summary.already_done} rows were already answered in {args.out} (a resumed run) and were kept")
    if summary.without_image:
        print(f"{summary.without_image} metadata rows have no image file beside {args.source} (error rows)")
    if summary.errors:
        print("rerun the same command to retry the error rows", file=sys.stderr)
        return 1
    return 0


def model(args: argparse.Namespace) -> int:
    with LesionClient(args.url, args.api_key, timeout=args.timeout) as client:
        print(json.dumps(client.model(), indent=2))
    return 0


PRIOR_HELP = (
    "class prior of the answers: balanced, training, or JSON such as '{\"akiec\": 0.03, ...}' (default: the bundle's)"
)


def client_version() -> str:
    try:
        return version("lesion-client")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default: $LESION_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="the service's API key (default: $LESION_API_KEY)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p = argparse.ArgumentParser(
        prog="lesion-client", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {client_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", parents=[common], help="predict a few images, shown as a table or JSON")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--age", type=float)
    pr.add_argument("--sex")
    pr.add_argument("--site")
    pr.add_argument("--prior", help=PRIOR_HELP)
    pr.add_argument(
        "--triage-point",
        help="the operating point to decide refer/routine at, such as sensitivity-0.98 (default: the bundle's; "
        "`lesion-client model` lists them)",
    )
    pr.add_argument(
        "--explain", action="store_true", help="add the heatmap (saved as IMAGE-STEM.heatmap.png) and attributions"
    )
    pr.add_argument("--explain-dir", type=Path, default=Path("."), help="where --explain writes heatmaps (default: .)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--lesion", metavar="ID", help="the images are views of this lesion: add its combined answer")
    sc = sub.add_parser("score", parents=[common], help="score a folder or metadata CSV into a CSV (resumable)")
    sc.add_argument("source", type=Path, help="a folder of images, or a HAM10000-style metadata CSV beside its images")
    sc.add_argument("--out", required=True, type=Path, help="output CSV; a rerun skips the rows already in it")
    sc.add_argument("--in-flight", type=int, default=4, help="batch requests sent at once")
    sc.add_argument("--prior", help=PRIOR_HELP)
    sub.add_parser("model", parents=[common], help="what the service serves (GET /model), as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"predict": predict, "score": score_command, "model": model}[args.command](args)
    except LesionAPIError as exc:
        print(f"error: the service refused the request: {exc.detail}", file=sys.stderr)
        return 1
    except LesionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
