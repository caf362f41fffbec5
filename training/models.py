"""ResNet-18 from torchvision, and the fold ensemble that is exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from training.errors import WeightsError

IMAGENET_URL = ResNet18_Weights.IMAGENET1K_V1.url


def load_imagenet_state(url: str) -> dict:
    """torchvision's own download and cache ($TORCH_HOME/hub/checkpoints), sha256-prefix checked."""
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsError(
            f"could not get ImageNet weights from {url} ({exc}). Offline? Use --weights none "
            "(train from scratch) or --weights PATH (a resnet18 state dict on disk)."
        ) from None


def build_resnet18(num_classes: int, weights: str = "none") -> nn.Module:
    """weights: 'imagenet' (torchvision download), 'none' (random init) or a path to a state dict."""
    model = resnet18(weights=None)
    if weights == "imagenet":
        state = load_imagenet_state(IMAGENET_URL)
    elif weights == "none":
        state = None
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file; use imagenet, none or a path to a state dict")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise WeightsError(
                f"--weights {weights}: not a resnet18 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def dihedral_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square applied to a batch (N,3,H,W): its 4 flips, and the 4 flips of
    its transpose (W,H: a second batch, as a non-square image changes shape)."""
    return [torch.cat([v, v.flip(3), v.flip(2), v.flip((2, 3))]) for v in (x, x.transpose(2, 3))]


class FoldEnsemble(nn.Module):
    """The served CNN: the members' softmax outputs averaged, in one graph. With `tta`, over the
    8 dihedral views of each image too (dermoscopy has no canonical orientation); 8x the cost."""

    def __init__(self, members: list[nn.Module], tta: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batches = dihedral_batches(x) if self.tta else [x]
        probs = [m(b).float().softmax(dim=1) for m in self.members for b in batches]
        # each is (views * N, classes), view-major: regroup to (views, N, classes) and average all
        return torch.cat([p.reshape(-1, x.shape[0], p.shape[1]) for p in probs]).mean(dim=0)
