"""BlurPool (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again") as FFCV applies it to
torchvision ResNets (libffcv/ffcv-imagenet train_imagenet.py, BlurPoolConv2d / apply_blurpool): every
Conv2d with a stride above 1 and at least 16 input channels first blurs its input with a fixed 3x3
binomial filter, per channel, at stride 1. On a ResNet-50: the 3 stride-2 3x3 convs and the 3 stride-2
downsample convs; the stem conv (3 input channels) is left alone.

Unlike FFCV's wrapper module, BlurConv2d IS the Conv2d (a subclass holding the same parameters) and its
filter is a non-persistent buffer, so the state_dict keys are torchvision's: a --blurpool checkpoint loads
into a plain torchvision model and pretrained weights load into a --blurpool one. The filter is a constant,
rebuilt with the model; `fasttrain eval` reads --blurpool from the checkpoint's config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BINOMIAL_3x3 = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))  # / 16: sums to 1, so the mean is kept


class BlurConv2d(torch.nn.Conv2d):
    """conv(blur(x)): a depthwise 3x3 binomial blur at stride 1 (padding 1), then the strided convolution."""

    def __init__(self, conv: torch.nn.Conv2d):
        # Built on the meta device and handed the original's parameters: no new initialisation (it would
        # draw from the RNG), no copy.
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        blur = torch.tensor(BINOMIAL_3x3, dtype=conv.weight.dtype, device=conv.weight.device) / 16.0
        self.register_buffer("blur_filter", blur.expand(conv.in_channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def apply_blurpool(model: torch.nn.Module) -> int:
    """Replace, in place, every Conv2d with stride > 1 and >= 16 input channels; returns how many."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, BlurConv2d(child))
            count += 1
        else:
            count += apply_blurpool(child)
    return count
