"""Training batches, augmented where the model trains; evaluation batches untouched.

The decoded uint8 cache of a fold's training rows moves to the training device once (the full
10,015 images at 256x192 are about 1.5 GB). Each step takes a shuffled batch there, augments the
whole batch at once with kornia (every image gets its own random flip, rotation, scale and colour
jitter) and normalises it on the device: no per-image DataLoader workers, and the host sends no
float32 copies to a GPU. Evaluation batches go through `service.core.preprocess.to_model_input`,
the service's own code; `normalise` is its device twin for training (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Iterator

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn

from service.core.preprocess import ImageSpec, to_model_input


def train_augmentation() -> nn.Module:
    """Dermoscopy has no canonical orientation: flips and any rotation are label-preserving.
    Works on float images in [0, 1], (N,3,H,W); rotated-in corners are black."""
    return nn.Sequential(
        K.RandomHorizontalFlip(),
        K.RandomVerticalFlip(),
        K.RandomAffine(degrees=180, scale=(0.9, 1.15), p=0.7),
        K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, p=1.0),
    )


def normalise(batch: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Images in [0, 1] (N,3,H,W) on any device -> the model input `to_model_input` gives, channels-last."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


class TrainBatches:
    """Shuffled (uint8 images (N,3,H,W), labels) batches of the training rows, held on `device`.

    Shuffling uses its own seeded generator, so a fold's batch order does not depend on what
    else drew random numbers. With `world` > 1 processes (torchrun), every process draws the same
    order and takes rows rank, rank + world, ... of each global batch: together they see the rows
    one process would (each with its own batch-norm statistics and weighted-loss normalisation, so
    the gradients are close to, not equal to, one process's)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # NHWC on the device, NCHW view
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.drop_last = len(labels) > batch_size  # no tiny last batch (BatchNorm), unless that is all there is
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.generator).to(self.labels.device)
        for i in range(len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            yield self.images[rows], self.labels[rows]


@torch.no_grad()
def augment_batch(augment: nn.Module, batch_uint8: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """A training batch: uint8 (N,3,H,W) on the device -> augmented, normalised float32 input."""
    return normalise(augment(batch_uint8.float() / 255.0), spec)


def eval_batch(batch_uint8: np.ndarray, spec: ImageSpec, device: torch.device) -> torch.Tensor:
    """An evaluation batch: uint8 (N,H,W,3) -> the service's `to_model_input`, on the device."""
    x = torch.from_numpy(to_model_input(batch_uint8, spec))
    return x.to(device).contiguous(memory_format=torch.channels_last)
