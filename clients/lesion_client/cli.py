"""`lesion-client` (or `python -m lesion_client`): predict a few images, score many, show the model.

  lesion-client predict IMAGE [IMAGE ...] [--age N] [--sex S] [--site S] [--json]
  lesion-client score FOLDER_OR_METADATA_CSV --out OUT.csv [--in-flight 4]
  lesion-client model

`--url` and `--api-key` default to $LESION_URL and $LESION_API_KEY. Errors print `error: ...`, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from lesion_client.client import AsyncLesionClient, LesionClient
from lesion_client.errors import LesionAPIError, LesionError
from lesion_client.results import Prediction
from lesion_client.scoring import score


def table(name: str, p: Prediction) -> str:
    lines = [f"{name}: {p.label} ({p.label_name}), malignant probability {p.malignant_probability:.1%}"]
    models = list(p.components)
    lines.append("  class  " + "".join(f"{m:>10}" for m in models))
    for c in p.probabilities:
        lines.append(f"  {c:<6} " + "".join(f"{p.components[m][c]:>10.3f}" for m in models))
    return "\n".join(lines)


def predict(args: argparse.Namespace) -> None:
    with LesionClient(args.url, args.api_key, timeout=args.timeout) as client:
        results = {str(img): client.predict(img, args.age, args.sex, args.site) for img in args.images}
    if args.json:
        out = {k: asdict(v) for k, v in results.items()}
        print(json.dumps(out if len(out) > 1 else next(iter(out.values())), indent=2))
    else:
        print("\n\n".join(table(k, v) for k, v in results.items()))
        print("\n" + next(iter(results.values())).notice)


def score_command(args: argparse.Namespace) -> None:
    async def run() -> None:
        async with AsyncLesionClient(args.url, args.api_key, timeout=args.timeout) as client:
            with tqdm(desc="scoring", unit="img", disable=None) as bar:
                summary = await score(client, args.source, args.out, args.in_flight, bar.update)
        print(f"{args.out}: {summary.scored} images scored, {summary.errors} with an error (see its error column)")
        if summary.already_done:
            print(f"{summary.already_done} rows were already in {args.out} (a resumed run) and were skipped")
        if summary.without_image:
            print(f"{summary.without_image} metadata rows have no image file next to {args.source} and were skipped")

    asyncio.run(run())


def model(args: argparse.Namespace) -> None:
    with LesionClient(args.url, args.api_key, timeout=args.timeout) as client:
        print(json.dumps(client.model(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default: $LESION_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="the service's API key (default: $LESION_API_KEY)")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p = argparse.ArgumentParser(
        prog="lesion-client", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", parents=[common], help="predict a few images, shown as a table or JSON")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--age", type=float)
    pr.add_argument("--sex")
    pr.add_argument("--site")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sc = sub.add_parser("score", parents=[common], help="score a folder or metadata CSV into a CSV (resumable)")
    sc.add_argument("source", type=Path, help="a folder of images, or a HAM10000-style metadata CSV beside its images")
    sc.add_argument("--out", required=True, type=Path, help="output CSV; a rerun skips the rows already in it")
    sc.add_argument("--in-flight", type=int, default=4, help="batch requests sent at once")
    sub.add_parser("model", parents=[common], help="what the service serves (GET /model), as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"predict": predict, "score": score_command, "model": model}[args.command](args)
    except LesionAPIError as exc:
        print(f"error: the service refused the request: {exc.detail}", file=sys.stderr)
        return 1
    except LesionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
