"""`python -m clients.predict IMAGE [IMAGE ...] [--age N] [--sex S] [--site S] [--url URL] [--json]`
or `python -m clients.predict --csv OUT.csv FOLDER_OR_METADATA_CSV` for many images."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from clients.client import LesionAPIError, LesionClient

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def table(path: str, result: dict) -> str:
    lines = [
        f"{path}: {result['label']} ({result['label_name']}), malignant probability {result['malignant_probability']:.1%}"
    ]
    models = list(result["components"])
    lines.append("  class  " + "".join(f"{m:>10}" for m in models))
    for c in result["probabilities"]:
        lines.append(f"  {c:<6} " + "".join(f"{result['components'][m][c]:>10.3f}" for m in models))
    return "\n".join(lines)


def jobs_from(source: Path) -> list[tuple[Path, dict]]:
    """A folder of images (metadata unknown) or a HAM10000-style metadata CSV beside its images."""
    if source.is_dir():
        return [(p, {}) for p in sorted(source.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    images = {p.stem.upper(): p for p in source.parent.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    jobs = []
    with open(source, newline="") as f:
        for row in csv.DictReader(f):
            path = images.get(row["image_id"].upper())
            if path is None:
                continue
            age = row.get("age") or None
            jobs.append(
                (
                    path,
                    {
                        "age": float(age) if age else None,
                        "sex": row.get("sex") or None,
                        "site": row.get("localization") or row.get("site") or None,
                    },
                )
            )
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.predict", description=__doc__)
    p.add_argument("images", nargs="*", help="image files (or, with --csv, one folder or metadata CSV)")
    p.add_argument("--age", type=float)
    p.add_argument("--sex")
    p.add_argument("--site")
    p.add_argument("--url", default=os.environ.get("LESION_URL", "http://127.0.0.1:8000"), help="env LESION_URL")
    p.add_argument("--api-key", default=os.environ.get("LESION_API_KEY"), help="env LESION_API_KEY")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--csv", type=Path, metavar="OUT", help="predict every image of a folder or metadata CSV into OUT")
    args = p.parse_args(argv)
    if not args.images:
        p.error("give at least one image (or a folder / metadata CSV with --csv)")
    try:
        with LesionClient(args.url, api_key=args.api_key) as client:
            if args.csv:
                jobs = jobs_from(Path(args.images[0]))
                with open(args.csv, "w", newline="") as f:
                    writer = None
                    for path, meta in tqdm(jobs, desc="predicting", unit="img", disable=None):
                        r = client.predict(path, **meta)
                        row = {
                            "image": str(path),
                            "label": r["label"],
                            "malignant_probability": r["malignant_probability"],
                            **{f"p_{c}": v for c, v in r["probabilities"].items()},
                        }
                        writer = writer or csv.DictWriter(f, fieldnames=list(row))
                        if f.tell() == 0:
                            writer.writeheader()
                        writer.writerow(row)
                print(f"wrote {len(jobs)} predictions to {args.csv}")
                return 0
            results = {img: client.predict(img, age=args.age, sex=args.sex, site=args.site) for img in args.images}
    except LesionAPIError as exc:
        print(f"error: the service refused the request: {exc.detail}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2))
    else:
        print("\n\n".join(table(k, v) for k, v in results.items()))
        print("\n" + next(iter(results.values()))["notice"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
