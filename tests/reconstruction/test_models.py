"""The FC-DenseNet: shapes of both presets, the parameter count against a hand count and a closed form,
multiply-adds of single convolutions by hand, and the checks of its sizes."""

import pytest
import torch
from torch import nn

from stemdl.harness.errors import StemdlError
from stemdl.workloads.reconstruction.models import (PRESETS, DenseNetSpec, FCDenseNet, build_model,
                                                     flops_per_sample, parameter_count)


def conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def closed_form(spec: DenseNetSpec, cin: int) -> int:
    """Parameters counted from the architecture's description, independently of the module tree."""
    g, k = spec.growth, spec.kernel
    total, c, skips = conv_params(cin, spec.init_width, k), spec.init_width, []
    for layers in spec.down:
        total += sum(conv_params(c + i * g, g, k) for i in range(layers))
        c += layers * g
        skips.append(c)
        total += conv_params(c, c, 1)  # transition down
    total += sum(conv_params(c + i * g, g, k) for i in range(spec.bottleneck))
    new = spec.bottleneck * g
    for layers, skip in zip(spec.up, reversed(skips)):
        total += conv_params(new, new, spec.up_kernel)  # transposed: (in, out, k, k) + out
        c = new + skip
        total += sum(conv_params(c + i * g, g, k) for i in range(layers))
        new = layers * g
    return total + conv_params(c + new, 1, 1)


def test_parameter_count_of_a_tiny_network_by_hand():
    # in 2 -> first conv 3 (57); down: 1 layer 3->2 (56), 5 channels, 1x1 5->5 (30); bottleneck 5->2 (92);
    # up: transposed 2->2 3x3 (38), concat 2+5=7, 1 layer 7->2 (128), last block keeps 9; 1x1 9->1 (10)
    spec = DenseNetSpec(growth=2, down=(1,), bottleneck=1, up=(1,), kernel=3, up_kernel=3, init_width=3)
    assert parameter_count(FCDenseNet(2, spec)) == 57 + 56 + 30 + 92 + 38 + 128 + 10 == 411


@pytest.mark.parametrize("spec", [DenseNetSpec(growth=3, down=(2, 1), bottleneck=2, up=(1, 3), kernel=5,
                                                up_kernel=2, init_width=4), PRESETS["cpu"]])
def test_parameter_count_matches_the_closed_form(spec):
    assert parameter_count(FCDenseNet(7, spec)) == closed_form(spec, 7)


def test_the_cpu_preset_maps_the_patterns_to_the_central_target():
    torch.manual_seed(0)
    model = build_model("cpu", in_channels=16, out_size=32)
    x = torch.randn(2, 16, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 32, 32)
    out.abs().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    full = build_model("cpu", in_channels=16)  # out_size None: the whole S x S
    full.load_state_dict(model.state_dict())
    full.eval()
    with torch.no_grad():
        assert full(x).shape == (2, 1, 64, 64)
        assert torch.equal(full(x)[..., 16:48, 16:48], model(x))  # the crop is the centre (ORNL's N/4)
        assert torch.equal(model(x), model(x))  # dropout off in eval


def test_the_ornl_preset_on_the_meta_device():
    with torch.device("meta"):
        model = build_model("ornl", in_channels=16, out_size=32)
        assert model(torch.empty(2, 16, 64, 64)).shape == (2, 1, 32, 32)
    spec = PRESETS["ornl"]
    assert (spec.growth, spec.down, spec.bottleneck, spec.up, spec.kernel) == (256, (1, 2, 4), 3, (4, 2, 1), 5)
    assert parameter_count(model) == closed_form(spec, 16)
    assert flops_per_sample(model, (16, 64, 64)) > 1e11


def test_flops_of_a_convolution_and_a_transposed_convolution_by_hand():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    assert flops_per_sample(conv, (3, 8, 8)) == 5 * 8 * 8 * (3 * 3 * 3)  # each output: 27 products
    assert flops_per_sample(nn.Conv2d(4, 6, 1, stride=2, groups=2), (4, 8, 8)) == 6 * 4 * 4 * 2
    up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
    assert flops_per_sample(up, (4, 5, 5)) == 4 * 5 * 5 * (2 * 3 * 3)  # each input into 18 outputs
    assert up(torch.zeros(1, 4, 5, 5)).shape[-1] == 10


def test_flops_leave_the_model_as_it_was():
    model = build_model("cpu", in_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    macs = flops_per_sample(model, (8, 4, 32, 32))  # a batch size is ignored
    assert macs == flops_per_sample(model, (4, 32, 32)) > 0
    assert model.training and all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    # 4x the pixels, 4x the multiply-adds (every layer is fully convolutional)
    assert flops_per_sample(model, (4, 64, 64)) == 4 * macs


@pytest.mark.parametrize("overrides", [dict(kernel=4), dict(up=(1, 2)), dict(dropout=1.0), dict(growth=0),
                                       dict(up_kernel=1)])
def test_bad_sizes_are_refused(overrides):
    with pytest.raises(StemdlError, match="FC-DenseNet"):
        build_model("cpu", in_channels=4, **overrides)


def test_bad_inputs_are_refused():
    model = build_model("cpu", in_channels=4, out_size=32)
    with pytest.raises(StemdlError, match="divisible by 8"):
        model(torch.zeros(1, 4, 36, 36))
    with pytest.raises(StemdlError, match="output size 32"):
        model(torch.zeros(1, 4, 24, 24))
    with pytest.raises(StemdlError, match="unknown model"):
        build_model("huge", in_channels=4)
