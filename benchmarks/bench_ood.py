"""How well the bundle's out-of-distribution scores tell real lesions from other pictures.

python -m benchmarks.bench_ood --bundle RUN/bundle --data-dir FULL_HAM10000 [--max-real 2000]

Real: HAM10000 images of lesions the bundle never trained on (its training_images.csv names the
lesions it did), e.g. the full set's images outside a sample-trained bundle's data. Not real:
pictures that ship with installed packages (scikit-learn's and matplotlib's sample photographs,
cropped at random), rendered text, flat colours, noise, and the project's own synthetic demo
lesions. Every image goes through the service's own code (JPEG bytes -> decode -> the served ONNX
graph); both scores are computed from the same graph outputs. Prints, per method, the AUROC of
real vs not real (overall and per kind) and the share flagged at the bundle's threshold.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import sklearn
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from service.core.ood import METHODS, GaussianFit, scores
from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from training.data import load_dataset

WORDS = "lesion model image dermoscopy patient report clinic sample benign result scale study".split()


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def photo_crops(rng: np.random.Generator, per_photo: int = 12) -> list[bytes]:
    photos = [
        Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
        Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    ]
    out = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for _ in range(per_photo):
            cw = int(rng.uniform(0.3, 1.0) * min(w, h * 4 / 3))
            ch = cw * 3 // 4
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            out.append(jpeg(img.crop((x, y, x + cw, y + ch))))
    return out


def rendered_text(rng: np.random.Generator, n: int = 24) -> list[bytes]:
    out = []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(180, 256, 3))
        img = Image.new("RGB", (400, 300), bg)
        draw = ImageDraw.Draw(img)
        for line in range(8):
            text = " ".join(rng.choice(WORDS, 4))
            draw.text((10, 10 + 35 * line), text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font_size=22)
        out.append(jpeg(img))
    return out


def flat_colours(rng: np.random.Generator, n: int = 24) -> list[bytes]:
    return [jpeg(Image.new("RGB", (300, 225), tuple(int(v) for v in rng.integers(0, 256, 3)))) for _ in range(n)]


def noise(rng: np.random.Generator, n: int = 24) -> list[bytes]:
    return [jpeg(Image.fromarray(rng.integers(0, 256, (225, 300, 3), dtype=np.uint8))) for _ in range(n)]


def synthetic_lesions(n: int = 48) -> list[bytes]:
    from training.synthetic import write_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_demo_dataset(Path(tmp), n_images=n, seed=7)
        return [p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))]


def held_out_real(bundle: Path, data_dir: Path, max_real: int, rng: np.random.Generator) -> list[bytes]:
    trained = pd.read_csv(bundle / "training_images.csv")
    table = load_dataset(data_dir, log=lambda m: None).table
    table = table[~table.lesion_id.isin(set(trained.lesion_id))]
    if table.empty:
        raise SystemExit(f"every lesion of {data_dir} is in the bundle's training data: give held-out images")
    rows = table.iloc[np.sort(rng.choice(len(table), size=min(max_real, len(table)), replace=False))]
    return [Path(p).read_bytes() for p in rows.path]


def score_all(predictor: Predictor, fit: GaussianFit, images: list[bytes]) -> dict[str, np.ndarray]:
    spec = predictor.manifest.preprocessing
    out = {m: [] for m in METHODS}
    for start in range(0, len(images), 64):
        batch = np.stack([load_for_model(b, spec) for b in images[start : start + 64]])
        o = predictor.cnn_outputs(batch, ["embedding", "logits"])
        for m in METHODS:
            out[m].append(scores(m, o["embedding"], o["logits"], fit))
    return {m: np.concatenate(v) for m, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument(
        "--data-dir", type=Path, required=True, help="HAM10000 layout; lesions the bundle trained on are left out"
    )
    p.add_argument("--max-real", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    predictor = Predictor.load(args.bundle)
    ood = predictor.manifest.ood
    if ood is None:
        raise SystemExit("this bundle has no out-of-distribution score (format 4 bundles have one)")
    fit = predictor.gaussian or GaussianFit.from_npz(
        (args.bundle / ood.file).read_bytes(), len(predictor.manifest.classes)
    )
    kinds = {
        "photographs": photo_crops(rng),
        "rendered text": rendered_text(rng),
        "flat colours": flat_colours(rng),
        "noise": noise(rng),
        "synthetic lesions": synthetic_lesions(),
    }
    real = score_all(predictor, fit, held_out_real(args.bundle, args.data_dir, args.max_real, rng))
    other = {k: score_all(predictor, fit, v) for k, v in kinds.items()}
    n_real = len(real[METHODS[0]])
    print(
        f"bundle {predictor.manifest.bundle_id}; {n_real} held-out real HAM10000 images vs "
        + ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
    )
    print(f"thresholds flag {ood.flag_share:.0%} of out-of-fold real training images by design; served: {ood.method}")
    for m in METHODS:
        t = ood.thresholds[m]
        everything = np.concatenate([other[k][m] for k in kinds])
        auc = roc_auc_score(np.r_[np.zeros(n_real), np.ones(len(everything))], np.r_[real[m], everything])
        print(f"\n{m}: AUROC real vs not real {auc:.3f}; flagged: real held-out {np.mean(real[m] > t):.1%}")
        for k in kinds:
            s = other[k][m]
            a = roc_auc_score(np.r_[np.zeros(n_real), np.ones(len(s))], np.r_[real[m], s])
            print(f"  {k:18s} AUROC {a:.3f}, flagged {np.mean(s > t):.0%}")


if __name__ == "__main__":
    main()
