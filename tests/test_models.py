"""models.py: the CIFAR ResNets have He et al.'s sizes, every model runs, and local weights load safely."""

import pytest
import torch
from safetensors.torch import save_file

import models


@pytest.mark.parametrize(
    "name, params", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)]
)
def test_cifar_resnets_have_the_papers_parameter_counts(name, params):
    model = models.build_model(name, 10)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert convs + 1 == models.CIFAR_DEPTHS[name]  # 6n+2 layers: 6n+1 convolutions and the classifier
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=0.05)


@pytest.mark.parametrize(
    "name, channels, size", [("resnet44", 3, 32), ("digits_cnn", 1, 8), ("resnet18", 3, 64), ("resnet18", 1, 64)]
)
def test_models_map_images_to_logits(name, channels, size):
    model = models.build_model(name, 7, channels).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_pretrained_weights_load_except_a_classifier_of_another_size(tmp_path):
    source = models.build_model("resnet18", 1000)
    save_file(source.state_dict(), str(tmp_path / "imagenet.safetensors"))
    model = models.build_model("resnet18", 14, weights=str(tmp_path / "imagenet.safetensors"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (14, 512)


def test_bad_weights_and_names_raise_one_line_errors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        models.build_model("resnet18", 10, weights=str(tmp_path / "bad.safetensors"))
    save_file(models.build_model("resnet20", 10).state_dict(), str(tmp_path / "r20.safetensors"))
    with pytest.raises(ValueError, match="do not fit this model"):
        models.build_model("resnet44", 10, weights=str(tmp_path / "r20.safetensors"))
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg", 10)
    assert models.default_model("digits", 8) == "digits_cnn" and models.default_model("cifar100", 32) == "resnet44"
