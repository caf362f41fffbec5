"""How well the bundle's out-of-distribution checks tell real lesions from other pictures.

python -m benchmarks.bench_ood --bundle RUN/bundle --data-dir FULL_HAM10000 [--max-real 2000]

Real: HAM10000 images of lesions the bundle never trained on (its training_images.csv names the
lesions it did), e.g. the full set's images outside a sample-trained bundle's data. Not real:
pictures that ship with installed packages (scikit-learn's and matplotlib's sample photographs,
cropped at random), screenshots of web pages (package documentation rendered as HTML, in headless
Chromium when it is installed), rendered documents, clinical-style close-ups (heavy crops of
held-out real images with colour, brightness and white-balance shifts), flat colours, noise, and
the project's own synthetic demo lesions. None of them is used to fit anything. Every image goes
through the service's own code (encoded bytes -> decode -> Predictor.predict). Prints, per kind,
the share flagged by the bundle's flag (the CNN's score or the image statistics above their
thresholds), by each check alone, and the AUROC of each CNN method.
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
from PIL import Image, ImageDraw, ImageEnhance
from sklearn.metrics import roc_auc_score

from benchmarks import machine_header
from service.core.graph import EMBEDDING, LOGITS, OOD_OUTPUTS
from service.core.ood import METHODS, GaussianFit, scores
from service.core.predictor import Predictor
from service.core.preprocess import load_for_model
from training.data.ham10000 import load_dataset

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
            out.append(jpeg(img.crop((int(x), int(y), int(x) + cw, int(y) + ch))))
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


def web_pages(n: int = 24) -> list[bytes]:
    """Screenshots of package documentation (each installed distribution's description, rendered
    from markdown) under a few page styles and window sizes; empty without Chromium."""
    import importlib.metadata
    import shutil

    from markdown_it import MarkdownIt

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return []
    from docs.screenshots import browser

    styles = ["font-family: serif", "background: #202124; color: #e8eaed", "max-width: 700px; margin: auto", ""]
    sizes = [(1280, 900), (800, 600), (390, 800), (1440, 1000)]
    descriptions = ((d.read_text("METADATA") or "").partition("\n\n")[2] for d in importlib.metadata.distributions())
    texts = sorted(descriptions, key=len)[-n:]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        driver = browser()
        try:
            for i, text in enumerate(texts):
                page = Path(tmp) / f"{i}.html"
                nav = "<div style='background:#345;color:#fff;padding:12px'>Home · Docs · Blog · About</div>"
                page.write_text(f"<body style='{styles[i % 4]}'>{nav}{MarkdownIt().render(str(text)[:6000])}</body>")
                driver.set_window_size(*sizes[i % 4])
                driver.get(page.as_uri())
                out.append(driver.get_screenshot_as_png())
        finally:
            driver.quit()
    return out


def clinical_close_ups(real: list[bytes], rng: np.random.Generator, n: int = 48) -> list[bytes]:
    """Heavy crops (a quarter to a half of each side) of real images, with colour, brightness and
    white-balance shifts: what a phone photograph of a lesion looks like to the model."""
    out = []
    for i in rng.choice(len(real), size=min(n, len(real)), replace=False):
        img = Image.open(io.BytesIO(real[i])).convert("RGB")
        w, h = img.size
        side = rng.uniform(0.25, 0.5)
        cw, ch = int(w * side), int(h * side)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        box = (int(x), int(y), int(x) + cw, int(y) + ch)
        img = ImageEnhance.Color(img.crop(box)).enhance(rng.uniform(0.4, 1.6))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        balanced = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2, 3)
        out.append(jpeg(Image.fromarray(balanced.clip(0, 255).astype(np.uint8))))
    return out


def synthetic_lesions(n: int = 48) -> list[bytes]:
    from training.data.synthetic import write_demo_dataset

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


def score_all(predictor: Predictor, images: list[bytes]) -> dict[str, np.ndarray]:
    """Each CNN method's score, the image check's score and the bundle's flag, through the service's
    decoding and Predictor.predict (the energy score from the same graph outputs)."""
    m, ood = predictor.manifest, predictor.manifest.ood
    assert ood is not None  # main() refuses a bundle without one
    out: dict[str, list] = {k: [] for k in [*METHODS, "image", "flagged"]}
    for start in range(0, len(images), 64):
        batch = np.stack([load_for_model(b, m.preprocessing) for b in images[start : start + 64]])
        preds = predictor.predict(batch, [None] * len(batch))
        _, o = predictor.cnn_outputs(batch, OOD_OUTPUTS)
        for method in METHODS:
            out[method].append(scores(method, o[EMBEDDING], o[LOGITS], predictor.gaussian))
        out["image"].append([np.nan if p.image_ood_score is None else p.image_ood_score for p in preds])
        out["flagged"].append([bool(ood.flagged_by(p.ood_score or 0.0, p.image_ood_score)) for p in preds])
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument(
        "--data-dir", type=Path, required=True, help="HAM10000 layout; lesions the bundle trained on are left out"
    )
    p.add_argument("--max-real", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(machine_header(), flush=True)
    rng = np.random.default_rng(args.seed)
    predictor = Predictor.load(args.bundle)
    ood = predictor.manifest.ood
    if ood is None:
        raise SystemExit("this bundle has no out-of-distribution score (format 4 bundles have one)")
    if predictor.gaussian is None:
        predictor.gaussian = GaussianFit.from_npz(
            (args.bundle / ood.file).read_bytes(), len(predictor.manifest.classes)
        )
    real_images = held_out_real(args.bundle, args.data_dir, args.max_real, rng)
    kinds = {
        "photographs": photo_crops(rng),
        "web pages": web_pages(),
        "rendered text": rendered_text(rng),
        "clinical close-ups": clinical_close_ups(real_images, rng),
        "flat colours": flat_colours(rng),
        "noise": noise(rng),
        "synthetic lesions": synthetic_lesions(),
    }
    kinds = {k: v for k, v in kinds.items() if v}
    real = score_all(predictor, real_images)
    other = {k: score_all(predictor, v) for k, v in kinds.items()}
    n_real = len(real["flagged"])
    print(
        f"bundle {predictor.manifest.bundle_id}; {n_real} held-out real HAM10000 images vs "
        + ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
    )
    if "web pages" not in kinds:
        print("(no web pages: chromium and chromedriver are not installed)")
    image_check = ood.image_threshold is not None
    print(
        f"served: {ood.method}{' or image statistics' if image_check else ''}, thresholds set to flag "
        f"{ood.flag_share:.0%} of out-of-fold real training images"
    )
    t_cnn, t_img = ood.threshold, ood.image_threshold if image_check else np.inf
    header = f"{'kind':22s} {'flagged':>8s} {'by CNN':>8s} {'by image':>9s}   " + "   ".join(
        f"{m} AUROC" for m in METHODS
    )
    print("\n" + header)

    def line(name: str, s: dict[str, np.ndarray], auroc: bool) -> str:
        aucs = [
            f"{roc_auc_score(np.r_[np.zeros(n_real), np.ones(len(s[m]))], np.r_[real[m], s[m]]):>{len(m) + 6}.3f}"
            if auroc
            else " " * (len(m) + 6)
            for m in METHODS
        ]
        by_image = f"{np.mean(s['image'] > t_img):9.1%}" if image_check else f"{'-':>9s}"
        return (
            f"{name:22s} {np.mean(s['flagged']):8.1%} {np.mean(s[ood.method] > t_cnn):8.1%} {by_image}   "
            + "   ".join(aucs)
        )

    print(line("real held-out", real, auroc=False))
    for k in kinds:
        print(line(k, other[k], auroc=True))
    dermoscopy_like = {"synthetic lesions"}  # drawn to look like lesions: reported, not counted as a miss
    pooled = {key: np.concatenate([other[k][key] for k in kinds if k not in dermoscopy_like]) for key in real}
    print(line("all but synthetic", pooled, auroc=True))


if __name__ == "__main__":
    main()
