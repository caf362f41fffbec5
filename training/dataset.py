"""Torch datasets over the decoded image cache.

Training batches are augmented uint8 images; evaluation batches are the cached images
untouched. Both are normalised by `service.core.preprocess.to_model_input`, the service's code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from service.core.preprocess import ImageSpec, to_model_input


def train_transforms() -> v2.Compose:
    """Dermoscopy has no canonical orientation: flips and any rotation are label-preserving."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=180, scale=(0.9, 1.15))], p=0.7),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15),
        ]
    )


class ImageDataset(Dataset):
    """Items are (uint8 CHW tensor, label). `augment=False` is the evaluation transform (none)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # N,3,H,W view, no copy
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = train_transforms() if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[i]


def normalise_batch(batch_uint8: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float32 model input via the service's `to_model_input`."""
    x = to_model_input(batch_uint8.permute(0, 2, 3, 1).numpy(), spec)
    return torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
