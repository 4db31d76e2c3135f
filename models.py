"""Models: the CIFAR ResNets of He et al. 2016, torchvision's ResNet-18/50, and a small CNN for 8x8 digits.

CIFAR ResNets (`resnet20/32/44/56/110`): 6n+2 layers, three stages of n basic blocks with 16/32/64
channels on 32x32 inputs, global average pooling and one linear layer. Shortcuts are option A of
He et al. (identity; where the shape changes, stride-2 subsampling and zero-padded channels), the
parameter-free shortcut of the original CIFAR experiments: ResNet-44 has 0.66M parameters. The
paper trains ResNet-44 on CIFAR-100.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
MODELS = (*CIFAR_DEPTHS, "resnet18", "resnet50", "digits_cnn")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad_channels = planes - in_planes
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem conv 16, stages of n blocks at 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_cnn(num_classes: int, in_channels: int = 1) -> nn.Module:
    """Three conv-BN-ReLU layers (16/32/64 channels, one 2x2 max-pool) and a linear head, for 8x8 inputs."""

    def conv_bn(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn(in_channels, 16),
        *conv_bn(16, 32),
        nn.MaxPool2d(2),
        *conv_bn(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}  # torchvision's IMAGENET1K_V1


def torchvision_resnet(name: str, num_classes: int, in_channels: int, weights: str | None) -> nn.Module:
    """torchvision ResNet-18/50; `weights`: a local safetensors file (a classifier of another size is dropped),
    'imagenet' (torchvision's ImageNet weights without their 1,000-class classifier) or None / 'none'."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if weights == "imagenet":
        state = {k: v for k, v in imagenet_state_dict(name).items() if not k.startswith("fc.")}
        load_pretrained(model, state, f"torchvision's {name} ImageNet weights")
    elif weights and weights != "none":
        load_pretrained(model, read_weights(weights), weights)
    return model


def check_weights(weights: str | None, model: str | None) -> None:
    """Raise ValueError unless weights is None, 'none', 'imagenet' for a torchvision ResNet, or an existing file."""
    if weights in (None, "none"):
        return
    if weights == "imagenet":
        if model not in IMAGENET_WEIGHTS:
            raise ValueError(
                f"--weights imagenet needs --model {' or '.join(IMAGENET_WEIGHTS)} (got {model or 'the model by input size'}): "
                "or pass --weights none or a local safetensors file"
            )
        return
    if not os.path.isfile(weights):
        raise ValueError(f"--weights {weights}: no such file; pass a local safetensors file, 'imagenet' or 'none'")


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights of `name` through its weights API (downloaded once into the torch hub cache)."""
    import socket
    import urllib.error

    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # torch.hub's urlopen has none: a firewall that drops packets would hang the run
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise ValueError(
            f"--weights imagenet: cannot download {weights.url} ({why}); on a machine without internet, "
            f"pass a local file: --weights {name}_imagenet.safetensors (docs/data.md: 'ImageNet weights')"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one-line ValueError if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise ValueError(
            f"cannot read weights {path!r} ({e}): pass a safetensors file saved from the same architecture"
        ) from None


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict, skipping only tensors whose shape differs (the classifier of another task) and fc.*."""
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in kept and not k.startswith("fc.")]
    if missing:
        raise ValueError(
            f"weights {source!r} do not fit this model: {len(missing)} tensors missing, e.g. {missing[0]!r}"
        )
    model.load_state_dict(kept, strict=False)


def build_model(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    """Return the model called `name` (one of MODELS) with `num_classes` outputs."""
    if name in CIFAR_DEPTHS:
        model = CifarResNet(CIFAR_DEPTHS[name], num_classes, in_channels)
    elif name in ("resnet18", "resnet50"):
        return torchvision_resnet(name, num_classes, in_channels, weights)
    elif name == "digits_cnn":
        model = digits_cnn(num_classes, in_channels)
    else:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if weights == "imagenet":
        check_weights(weights, name)  # raises: ImageNet weights exist for the torchvision ResNets only
    elif weights and weights != "none":
        load_pretrained(model, read_weights(weights), weights)
    return model


def default_model(dataset: str, image_size: int) -> str:
    """The paper's choice by input size: digits_cnn for 8x8, ResNet-44 up to 64x64, ResNet-50 above."""
    if image_size <= 16:
        return "digits_cnn"
    return "resnet44" if image_size <= 64 else "resnet50"
