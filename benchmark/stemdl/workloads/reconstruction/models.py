"""The reconstruction network: a fully convolutional DenseNet (FC-DenseNet, "Tiramisu", Jégou et al. 2017)
from the N² CBED patterns of a probe grid, stacked as channels (B, N², S, S), to the projected-potential
image of the scanned region (B, 1, T, T).

    model = build_model("ornl", in_channels=64, out_size=32)          # or "cpu"; or FCDenseNet(...)
    parameter_count(model), flops_per_sample(model, (64, 64, 64))

Written from ORNL's description of their TF1 model (not from their code):
    5x5 convolutions, growth rate 256; dense blocks of [1, 2, 4] layers down, 3 in the bottleneck,
    [4, 2, 1] up; 1x1 convolution + 2x2 average pool down, stride-2 transposed convolution up,
    concatenated with the skip; ReLU, dropout 0.2, no batch norm; a 1x1 convolution to one channel.
Where the description is silent this follows the Tiramisu paper, with batch norm left out:
* a dense layer is ReLU -> k x k conv (growth channels) -> dropout, fed the concatenation of its block's
  input and every earlier layer of the block (pre-activation, the paper's order);
* a down block passes on (and keeps as its skip) its input with its new features; the bottleneck and the
  up blocks pass on only their new features (so the channel count does not explode), except the last up
  block, whose whole stack goes to the final 1x1 convolution;
* transition down: ReLU -> 1x1 conv (same width) -> dropout -> 2x2 average pool;
  transition up: a stride-2 transposed convolution of `up_kernel` (3, the paper's) on the new features of
  the block below, at the same width, exactly doubling the size;
* a first k x k convolution from the N² patterns to `init_width` channels (the paper's 48 at 3x3).
* weights: torch's default initialization (no batch norm to rescale, the network is shallow).

Output size. The input's pixels are detector angles, the output's are positions in the specimen: no pixel
of one corresponds to a pixel of the other, so the size of the output is a choice. The network keeps the
FC-DenseNet's own shape, output size = input size S (any S divisible by 2^len(down)), and returns the
central T x T of it (`out_size`; None: all S x S). Cropping rather than resizing: the target is itself the
central half of its specimen image (ORNL's [N/4:3N/4]), so with the default S = 2T the full S x S output
is the whole specimen window at the target's pixel size and the loss reads its scanned centre, the part
farthest from the convolutions' zero padding. The crop sits inside `forward`, so the loss, the evaluator
and `flops_per_sample` all see (B, 1, T, T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from stemdl.harness.errors import StemdlError


@dataclass(frozen=True)
class DenseNetSpec:
    """Every size of the network (in_channels = N², out_size = T are given when it is built)."""

    growth: int = 12  # channels each dense layer adds
    down: tuple[int, ...] = (1, 2, 4)  # layers per dense block on the way down (one pooling after each)
    bottleneck: int = 3  # layers in the bottleneck block
    up: tuple[int, ...] = (4, 2, 1)  # layers per dense block on the way up (len(up) == len(down))
    kernel: int = 3  # the dense layers' and the first convolution's kernel (odd)
    up_kernel: int = 3  # the transposed convolutions' kernel
    init_width: int = 16  # channels of the first convolution
    dropout: float = 0.2


# CPU: one training step on (8, 16, 64, 64) in well under a second on two cores (docs in the report);
# ORNL: the reference's sizes (its first convolution's width is not given: growth-rate wide here).
PRESETS: dict[str, DenseNetSpec] = {
    "cpu": DenseNetSpec(growth=12, kernel=3, init_width=16),
    "ornl": DenseNetSpec(growth=256, kernel=5, init_width=256),
}


class DenseLayer(nn.Sequential):
    def __init__(self, cin: int, growth: int, kernel: int, dropout: float):
        super().__init__(nn.ReLU(), nn.Conv2d(cin, growth, kernel, padding=kernel // 2), nn.Dropout(dropout))


class DenseBlock(nn.Module):
    """`layers` dense layers; returns the new features, or the input with them (keep_input)."""

    def __init__(self, cin: int, layers: int, growth: int, kernel: int, dropout: float, keep_input: bool):
        super().__init__()
        self.keep_input = keep_input
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, kernel, dropout) for i in range(layers))
        self.new_channels = layers * growth
        self.out_channels = cin + self.new_channels if keep_input else self.new_channels

    def forward(self, x):
        stack, new = x, []
        for layer in self.layers:
            out = layer(stack)
            new.append(out)
            stack = torch.cat([stack, out], dim=1)
        return stack if self.keep_input else torch.cat(new, dim=1)


class TransitionDown(nn.Sequential):
    def __init__(self, channels: int, dropout: float):
        super().__init__(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.Dropout(dropout), nn.AvgPool2d(2))


def transition_up(channels: int, kernel: int) -> nn.ConvTranspose2d:
    """Stride 2, exactly doubling the size for any kernel: out = 2(in − 1) − 2p + k + op = 2 in."""
    return nn.ConvTranspose2d(channels, channels, kernel, stride=2, padding=(kernel - 1) // 2,
                              output_padding=kernel % 2)


class FCDenseNet(nn.Module):
    """(B, in_channels, S, S) -> (B, 1, T, T): see the module docstring."""

    def __init__(self, in_channels: int, spec: DenseNetSpec = DenseNetSpec(), out_size: int | None = None):
        super().__init__()
        check_spec(spec, in_channels, out_size)
        self.spec, self.in_channels, self.out_size = spec, in_channels, out_size
        g, k, p = spec.growth, spec.kernel, spec.dropout
        self.first = nn.Conv2d(in_channels, spec.init_width, k, padding=k // 2)
        c, skips = spec.init_width, []
        self.down_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        for layers in spec.down:
            block = DenseBlock(c, layers, g, k, p, keep_input=True)
            c = block.out_channels
            skips.append(c)
            self.down_blocks.append(block)
            self.downs.append(TransitionDown(c, p))
        self.bottleneck = DenseBlock(c, spec.bottleneck, g, k, p, keep_input=False)
        new = self.bottleneck.new_channels
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i, (layers, skip) in enumerate(zip(spec.up, reversed(skips))):
            self.ups.append(transition_up(new, spec.up_kernel))
            block = DenseBlock(new + skip, layers, g, k, p, keep_input=i == len(spec.up) - 1)
            self.up_blocks.append(block)
            new = block.new_channels
        self.last = nn.Conv2d(self.up_blocks[-1].out_channels, 1, 1)

    def forward(self, x):
        size, factor = x.shape[-1], 2 ** len(self.downs)
        if x.shape[-2] != size or size % factor or (self.out_size or 0) > size:
            raise StemdlError(f"FC-DenseNet: input {tuple(x.shape)} must be square with a side divisible by "
                              f"{factor} and at least the output size {self.out_size}")
        x = self.first(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return central_crop(self.last(x), self.out_size)


def central_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The central size x size of (..., S, S), starting at (S − size) // 2 (ORNL's N/4 for size N/2)."""
    if size is None or size == x.shape[-1]:
        return x
    a = (x.shape[-1] - size) // 2
    return x[..., a:a + size, a:a + size]


def check_spec(spec: DenseNetSpec, in_channels: int, out_size: int | None) -> None:
    problems = []
    if in_channels < 1 or spec.growth < 1 or spec.init_width < 1 or spec.bottleneck < 1:
        problems.append("in_channels, growth, init_width and bottleneck must be at least 1")
    if not spec.down or len(spec.up) != len(spec.down) or min(spec.down + spec.up) < 1:
        problems.append(f"down {spec.down} and up {spec.up} must be equally long lists of layer counts >= 1")
    if spec.kernel < 1 or spec.kernel % 2 == 0 or spec.up_kernel < 2:
        problems.append(f"kernel {spec.kernel} must be odd, up_kernel {spec.up_kernel} at least 2")
    if not 0.0 <= spec.dropout < 1.0:
        problems.append(f"dropout {spec.dropout} must lie in [0, 1)")
    if out_size is not None and out_size < 1:
        problems.append(f"out_size {out_size} must be at least 1")
    if problems:
        raise StemdlError("FC-DenseNet: " + "; ".join(problems))


def build_model(name: str, in_channels: int, out_size: int | None = None, **overrides) -> FCDenseNet:
    """A preset (`PRESETS`) with any of DenseNetSpec's fields overridden."""
    if name not in PRESETS:
        raise StemdlError(f"unknown model {name!r}; choices: {', '.join(PRESETS)}")
    fields = {**asdict(PRESETS[name]), **overrides}
    for key in ("down", "up"):
        fields[key] = tuple(fields[key])
    return FCDenseNet(in_channels, DenseNetSpec(**fields), out_size)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (weights and biases)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_macs(module, inputs, output) -> int:
    """Multiply-adds of one (transposed) convolution call, per sample; biases not counted.

    Conv: every output element sums C_in/groups · kh · kw products. Transposed conv: every INPUT element
    is multiplied into C_out/groups · kh · kw outputs (the adjoint's count; output_padding adds none).
    """
    kernel = module.weight.shape[2] * module.weight.shape[3]
    if isinstance(module, nn.ConvTranspose2d):
        x = inputs[0]
        return x[0].numel() * module.out_channels // module.groups * kernel
    return output[0].numel() * module.in_channels // module.groups * kernel


def flops_per_sample(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of the convolutions and transposed convolutions in one forward pass of one sample
    of `input_shape` (C, H, W) (a leading batch size is ignored). One multiply-add counts once (fvcore's
    and torchvision's convention; twice that is the count of floating-point operations). Pooling,
    activations, dropout and biases are left out (under 1 % here). Counted with forward hooks while the
    model runs on meta tensors (its own parameters untouched): no memory, no arithmetic, any size."""
    shape = tuple(int(n) for n in input_shape)[-3:]
    total = [0]

    def hook(module, inputs, output):
        total[0] += _conv_macs(module, inputs, output)

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            torch.func.functional_call(model, meta, (torch.empty((1, *shape), device="meta"),))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total[0]
