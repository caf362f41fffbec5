"""A synthetic dataset in HAM10000's layout, so the whole pipeline runs with no download.

Each class has its own look (colour, size, border irregularity, texture) and its own age and
site distribution, so both the CNN and the metadata carry signal; lesions have 1-3 images.
Deterministic by seed. For demos only: tests of model quality use the real sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from service.core import labels
from training.data.io import atomic_write_csv

SYNTHETIC_DX_TYPE = "synthetic"  # marks its rows (HAM10000's own dx_type: histo, follow_up, consensus, confocal)

# class -> (prior, RGB lesion colour, radius px, border irregularity, texture, mean age, favoured sites)
LOOK = {
    "nv": (0.52, (120, 80, 50), 32, 0.05, 8, 40, ["back", "trunk", "lower extremity"]),
    "mel": (0.13, (60, 35, 30), 40, 0.25, 30, 60, ["back", "upper extremity", "chest"]),
    "bkl": (0.12, (165, 130, 90), 36, 0.12, 20, 62, ["face", "trunk", "back"]),
    "bcc": (0.08, (200, 140, 140), 28, 0.15, 14, 67, ["face", "neck", "back"]),
    "akiec": (0.06, (190, 95, 85), 26, 0.20, 26, 70, ["face", "scalp", "hand"]),
    "vasc": (0.045, (150, 30, 60), 20, 0.06, 6, 50, ["trunk", "lower extremity", "abdomen"]),
    "df": (0.045, (140, 100, 75), 22, 0.08, 10, 38, ["lower extremity", "upper extremity"]),
}
WIDTH, HEIGHT = 200, 150


def draw_lesion(rng: np.random.Generator, dx: str, base_seed: int) -> Image.Image:
    """One image; images of the same lesion share base_seed and differ by jitter."""
    _, colour, radius, irregular, texture, _, _ = LOOK[dx]
    lesion_rng = np.random.default_rng(base_seed)
    skin = np.array([225, 180, 150]) + lesion_rng.normal(0, 12, 3)
    phases = lesion_rng.uniform(0, 2 * np.pi, 4)
    size = radius * lesion_rng.uniform(0.8, 1.25)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx, cy = WIDTH / 2 + rng.normal(0, 6), HEIGHT / 2 + rng.normal(0, 5)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    r = np.hypot(xx - cx, yy - cy)
    edge = size * (1 + irregular * sum(np.sin((j + 2) * theta + phases[j]) for j in range(4)) / 2)
    mask = np.clip((edge - r) / 3.0, 0, 1)[..., None]
    img = skin + rng.normal(0, 4, (HEIGHT, WIDTH, 3))
    lesion = np.array(colour) + lesion_rng.normal(0, 10, 3) + rng.normal(0, texture, (HEIGHT, WIDTH, 1))
    if dx == "mel":  # dark blotches
        lesion = lesion - 40 * (np.sin(xx / 7 + phases[0]) * np.cos(yy / 9 + phases[1]) > 0.5)[..., None]
    if dx == "df":  # pale centre
        lesion = lesion + 60 * np.exp(-((r / (0.35 * size)) ** 2))[..., None]
    if dx in ("bcc", "vasc"):  # vessels
        lesion = lesion + np.array([30, -30, -20]) * (np.abs(np.sin(theta * 5 + r / 6)) < 0.12)[..., None]
    img = img * (1 - mask) + lesion * mask
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.filter(ImageFilter.GaussianBlur(0.8))


def write_demo_dataset(out: Path, n_images: int = 700, seed: int = 0) -> pd.DataFrame:
    out = Path(out)
    img_dir = out / "HAM10000_images_part_1"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    priors = np.array([LOOK[c][0] for c in labels.CLASSES])
    rows, image_no, lesion_no = [], 0, 0
    while image_no < n_images:
        dx = labels.CLASSES[rng.choice(len(labels.CLASSES), p=priors / priors.sum())]
        _, _, _, _, _, mean_age, sites = LOOK[dx]
        age = float(np.clip(round(rng.normal(mean_age, 12) / 5) * 5, 0, 85))
        sex = rng.choice(labels.SEXES, p=[0.53, 0.46, 0.01])
        site = rng.choice(sites) if rng.random() < 0.7 else rng.choice(labels.SITES)
        lesion_seed = int(rng.integers(1 << 31))
        for _ in range(min(int(rng.integers(1, 4)), n_images - image_no)):
            image_id = f"ISIC_{9_000_000 + image_no:07d}"
            draw_lesion(rng, dx, lesion_seed).save(img_dir / f"{image_id}.jpg", quality=90)
            rows.append(
                dict(
                    lesion_id=f"HAM_{9_000_000 + lesion_no:07d}",
                    image_id=image_id,
                    dx=dx,
                    dx_type=SYNTHETIC_DX_TYPE,
                    age=age if rng.random() > 0.01 else None,
                    sex=sex,
                    localization=site,
                )
            )
            image_no += 1
        lesion_no += 1
    table = pd.DataFrame(rows)
    atomic_write_csv(out / "HAM10000_metadata.csv", table)
    return table
