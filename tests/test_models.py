"""The model registry: torchvision's ResNet parameter counts, shapes, channels_last, and the small CNN."""

import pytest
import torch
from torch import nn

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.models import MODELS, build_model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet_parameter_counts_equal_torchvision():
    assert n_params(build_model("resnet50", 1000, 3)) == 25_557_032
    assert n_params(build_model("resnet18", 1000, 3)) == 11_689_512


@pytest.mark.parametrize("name,in_channels", [("resnet50", 3), ("resnet50", 1), ("resnet18", 1)])
def test_resnet_forward_shapes_and_channels_last(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, 230, in_channels).eval()
    x = torch.randn(2, in_channels, 128, 128)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 230)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


def test_resnet_trains_in_channels_last():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, 3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    assert model.conv1.weight.grad is not None


def test_resnet_v1_5_stride_and_initialization():
    model = build_model("resnet50", 10, 3)
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.weight.eq(1).all() and bn.bias.eq(0).all() for bn in bns)
    w = model.layer4[0].conv2.weight  # kaiming normal, fan_out = 512 * 3 * 3
    assert w.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name,last", [("resnet50", "bn3"), ("resnet18", "bn2")])
def test_zero_init_residual(name, last):
    model = build_model(name, 10, 3, zero_init_residual=True)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(getattr(b, last).weight.eq(0).all() for b in blocks)
    assert model.bn1.weight.eq(1).all()


@pytest.mark.parametrize("num_classes", [7, 230])
def test_small_cnn_size_and_any_input_size(num_classes):
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes, 3)
    assert 200_000 <= n_params(model) <= 500_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for size in (64, 48, 100):
        out = model(torch.randn(4, 3, size, size))
        assert out.shape == (4, num_classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model = build_model("small_cnn", num_classes, 1).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, num_classes)


def test_small_cnn_fits_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3, dropout=0.0)
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_unknown_model_lists_the_choices():
    assert set(MODELS) == {"resnet50", "resnet18", "small_cnn"}
    with pytest.raises(StemdlError, match="choices: resnet50, resnet18, small_cnn"):
        build_model("vgg16", 10, 3)
