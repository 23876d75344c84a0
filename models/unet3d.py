"""The 3D U-Net of the seed study (Duong et al., AJNR 2019, FLAIR lesion segmentation).

Shape of the network, as published:
- an encoder of `depth` down-sampling blocks (stride-2 3x3x3 convolution) and a decoder of as
  many up-sampling blocks (stride-2 transposed convolution), with skip connections between
  the levels of equal resolution;
- every block holds 3x3x3 convolutions with dilation 2 (a wider receptive field at the same
  cost) and a residual connection; where the channel count changes the residual path is a
  1x1x1 projection;
- after the decoder, 3 conv-ReLU-BatchNorm layers and a 1x1x1 classifier whose softmax gives
  per-voxel class probabilities.

`forward` returns logits (what a loss wants); `predict_proba` applies the softmax head.
The published network had depth 4; depths 3 and 5 were the alternates the study compared.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet3D", "UNet3DInputError"]


class UNet3DInputError(ValueError):
    """The input tensor does not fit the network (channels or spatial size)."""


def _conv3(in_ch: int, out_ch: int, *, dilation: int = 1, stride: int = 1) -> nn.Conv3d:
    # padding == dilation keeps the spatial size for a 3x3x3 kernel at stride 1
    return nn.Conv3d(
        in_ch, out_ch, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class ResidualBlock(nn.Module):
    """Two dilated 3x3x3 conv-BN layers plus a residual path (1x1x1 projection if needed)."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv3(in_ch, out_ch, dilation=dilation),
            nn.BatchNorm3d(out_ch),
            nn.ReLU(inplace=True),
            _conv3(out_ch, out_ch, dilation=dilation),
            nn.BatchNorm3d(out_ch),
        )
        self.project: nn.Module = (
            nn.Identity()
            if in_ch == out_ch
            else nn.Sequential(
                nn.Conv3d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm3d(out_ch)
            )
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.project(x))


class DownBlock(nn.Module):
    """Halve the resolution with a stride-2 convolution, double the width, then a residual block."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 2) -> None:
        super().__init__()
        self.down = nn.Sequential(
            _conv3(in_ch, out_ch, stride=2), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)
        )
        self.block = ResidualBlock(out_ch, out_ch, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class UpBlock(nn.Module):
    """Double the resolution (stride-2 transposed conv), join the skip, residual block."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, dilation: int = 2) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose3d(in_ch, out_ch, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm3d(out_ch),
            nn.ReLU(inplace=True),
        )
        # the concatenation changes the width, so this block's residual is a 1x1x1 projection
        self.block = ResidualBlock(out_ch + skip_ch, out_ch, dilation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.up(x), skip), dim=1))


class UNet3D(nn.Module):
    """Residual, dilated 3D U-Net (Duong 2019).

    Parameters
    ----------
    in_channels:
        Input channels (1 for FLAIR; 3 for prior/current/difference in the new-lesion model).
    out_classes:
        Classes of the softmax head (2: background, lesion).
    depth:
        Number of down-sampling (and up-sampling) blocks; 4 in the paper, 3 or 5 as alternates.
        Input sizes must be divisible by ``2**depth``.
    base_width:
        Channels at full resolution; each level doubles it.
    dilation:
        Dilation of the 3x3x3 convolutions inside the residual blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_classes: int = 2,
        *,
        depth: int = 4,
        base_width: int = 8,
        dilation: int = 2,
    ) -> None:
        super().__init__()
        if depth not in (3, 4, 5):
            raise ValueError(f"depth must be 3, 4 or 5 (the seed's variants), got {depth}")
        if in_channels < 1 or out_classes < 2 or base_width < 1:
            raise ValueError(
                f"need in_channels >= 1, out_classes >= 2, base_width >= 1; got "
                f"{in_channels}, {out_classes}, {base_width}"
            )
        self.in_channels = in_channels
        self.out_classes = out_classes
        self.depth = depth
        self.base_width = base_width
        self.dilation = dilation
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.stem = ResidualBlock(in_channels, widths[0], dilation)
        self.down = nn.ModuleList(
            DownBlock(widths[i], widths[i + 1], dilation) for i in range(depth)
        )
        self.up = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], dilation) for i in reversed(range(depth))
        )
        head: list[nn.Module] = []
        for _ in range(3):
            head += [_conv3(widths[0], widths[0]), nn.ReLU(inplace=True), nn.BatchNorm3d(widths[0])]
        self.head = nn.Sequential(*head)
        self.classifier = nn.Conv3d(widths[0], out_classes, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return int(2**self.depth)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise UNet3DInputError(
                f"expected input (batch, {self.in_channels}, z, y, x), got shape {tuple(x.shape)}"
            )
        bad = [s for s in x.shape[2:] if s % self.size_multiple]
        if bad:
            raise UNet3DInputError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by {self.size_multiple} "
                f"(2**depth); pad the input or pick another patch size"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (batch, out_classes, z, y, x)."""
        self._check_input(x)
        x = self.stem(x)
        skips = [x]
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level is x itself
        for block in self.up:
            x = block(x, skips.pop())
        return self.classifier(self.head(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax head: class probabilities, shape (batch, out_classes, z, y, x)."""
        return torch.softmax(self.forward(x), dim=1)
