"""Training batches augmented on the device: what they hold, and that evaluation is left alone."""

from __future__ import annotations

import numpy as np
import torch

from service.core.preprocess import ImageSpec, load_for_model, to_model_input
from training.cnn import loop as cnn_module
from training.cnn.batches import TrainBatches, augment_batch, normalise, train_augmentation

SPEC = ImageSpec(width=64, height=48)


def real_images(sample_dir, n: int = 128) -> np.ndarray:
    paths = sorted((sample_dir / "images").iterdir())[:n]
    return np.stack([load_for_model(p.read_bytes(), SPEC) for p in paths])


def test_device_normalisation_is_the_services():
    images = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    x = normalise(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, SPEC)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(x.numpy() - to_model_input(images, SPEC)).max() <= 1e-6


def test_augmented_batches_keep_the_images_statistics(sample_dir):
    images = real_images(sample_dir)
    torch.manual_seed(0)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    aug = augment_batch(train_augmentation(), batch, SPEC)
    plain = torch.from_numpy(to_model_input(images, SPEC))
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    changed = (aug - plain).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() >= 0.95  # every image gets its own random transform
    back = aug * torch.tensor(SPEC.std).view(1, 3, 1, 1) + torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5  # still images in [0, 1]
    original = batch.float() / 255.0
    ratio = back.mean((0, 2, 3)) / original.mean((0, 2, 3))
    assert ((ratio > 0.8) & (ratio < 1.1)).all(), ratio  # colour jitter and black rotated-in corners, no drift
    black = (back.amax(1) < 1e-3).flatten(1).float().mean(1)
    assert 0.2 <= (black > 0.01).float().mean() <= 0.9  # p=0.7 rotations leave black corners on some images
    # the flips alone: a flipped image's pixels are the original's, mirrored
    torch.manual_seed(1)
    flipped = train_augmentation()[0](original)
    mirrored = (flipped - original.flip(3)).abs().flatten(1).amax(1) < 1e-6
    same = (flipped - original).abs().flatten(1).amax(1) < 1e-6
    assert (mirrored | same).all() and 0.3 <= mirrored.float().mean() <= 0.7


def test_train_batches_visit_every_row_once_per_epoch():
    images = np.arange(10, dtype=np.uint8).repeat(2 * 2 * 3).reshape(10, 2, 2, 3)
    batches = TrainBatches(images, np.arange(10), batch_size=4, device=torch.device("cpu"), seed=0)
    assert len(batches) == 2  # drop_last: no tiny batch for BatchNorm
    epoch1 = torch.cat([y for _, y in batches])
    epoch2 = torch.cat([y for _, y in batches])
    assert len(set(epoch1.tolist())) == 8 and not torch.equal(epoch1, epoch2)
    for x, y in batches:
        assert x.shape == (4, 3, 2, 2) and x.dtype == torch.uint8 and (x[:, 0, 0, 0] == y).all()  # images follow labels
    small = TrainBatches(images[:3], np.arange(3), batch_size=4, device=torch.device("cpu"), seed=0)
    assert [len(y) for _, y in small] == [3]


def test_evaluation_sees_the_untouched_images(sample_dir):
    images = real_images(sample_dir, 8)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 7) + self.w

    cnn_module.predict_probs(Spy(), images, SPEC)
    assert np.array_equal(torch.cat(seen).numpy(), to_model_input(images, SPEC))
