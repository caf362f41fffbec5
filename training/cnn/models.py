"""ResNet-18 from torchvision, and the fold ensemble that is exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights, resnet18

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


def resnet_forward(m: ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ResNet forward, keeping what explanations need: the last feature maps
    (N,512,h,w), their global average (the embedding, N,512) and the logits (N,C)."""
    f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    embedding = torch.flatten(m.avgpool(f), 1)
    return f, embedding, m.fc(embedding)


def class_activation_maps(m: ResNet, f: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al. 2016): the linear head applied at every position of the last feature maps,
    (N,C,h,w). With global average pooling it is exact: a map's mean plus the head's bias is the logit."""
    return nn.functional.conv2d(f, m.fc.weight[:, :, None, None])


class FoldEnsemble(nn.Module):
    """The served CNN: the members' softmax outputs averaged, in one graph. With `tta`, over the
    8 dihedral views of each image too (dermoscopy has no canonical orientation); 8x the cost.

    With `explain`, the graph also returns, for the image as given (not its flipped views) and
    averaged over the members: class activation maps, the embedding and the logits, which the
    service uses for heatmaps and its out-of-distribution score. Each is computed from the same
    pass that gives the probabilities, so it adds almost nothing to the graph's cost."""

    def __init__(self, members: list[nn.Module], tta: bool = False, explain: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta, self.explain = tta, explain

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n = x.shape[0]
        batches = dihedral_batches(x) if self.tta else [x]
        probs, maps, embeddings, logits = [], [], [], []
        for m in self.members:
            for i, b in enumerate(batches):
                if not self.explain:
                    probs.append(m(b).float().softmax(dim=1))
                    continue
                f, e, z = resnet_forward(m, b)  # the same layers as m(b), keeping what explanations need
                probs.append(z.float().softmax(dim=1))
                if i == 0:  # the first n rows of the first batch are the image as given
                    maps.append(class_activation_maps(m, f[:n]).float())
                    embeddings.append(e[:n].float())
                    logits.append(z[:n].float())
        # each is (views * N, classes), view-major: regroup to (views, N, classes) and average all
        p = torch.cat([q.reshape(-1, n, q.shape[1]) for q in probs]).mean(dim=0)
        if not self.explain:
            return p
        return p, *(torch.stack(v).mean(dim=0) for v in (maps, embeddings, logits))
