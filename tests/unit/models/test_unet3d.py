"""The seed's 3D U-Net: shapes, the published structure, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lesionwatch.models.unet3d import ResidualBlock, UNet3D, UNet3DInputError


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_output_shape_and_softmax_for_each_depth(depth: int) -> None:
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_classes=2, depth=depth, base_width=2).eval()
    x = torch.randn(2, 1, 32, 32, 64)
    with torch.inference_mode():
        logits = model(x)
        probabilities = model.predict_proba(x)
    assert logits.shape == (2, 2, 32, 32, 64)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, 32, 32, 64), atol=1e-6)
    assert torch.allclose(probabilities, torch.softmax(logits, dim=1))


def test_structure_matches_the_paper() -> None:
    depth, width = 4, 4
    model = UNet3D(in_channels=3, out_classes=2, depth=depth, base_width=width)
    convs = [m for m in model.modules() if type(m) is nn.Conv3d]
    strided = [c for c in convs if c.stride == (2, 2, 2)]
    assert len(strided) == depth and all(c.kernel_size == (3, 3, 3) for c in strided)
    transposed = [m for m in model.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert len(transposed) == depth and all(t.stride == (2, 2, 2) for t in transposed)
    # every 3x3x3 convolution inside a residual block is dilated by 2
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 1 + 2 * depth
    for block in blocks:
        inner = [m for m in block.body if isinstance(m, nn.Conv3d)]
        assert [c.dilation for c in inner] == [(2, 2, 2), (2, 2, 2)]
        channels_change = inner[0].in_channels != inner[0].out_channels
        projections = [m for m in block.project.modules() if isinstance(m, nn.Conv3d)]
        assert bool(projections) == channels_change
        assert all(p.kernel_size == (1, 1, 1) for p in projections)
    # head: 3 x (conv, ReLU, BatchNorm), then a 1x1x1 classifier to the classes
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.Conv3d, nn.ReLU, nn.BatchNorm3d] * 3
    assert model.classifier.kernel_size == (1, 1, 1) and model.classifier.out_channels == 2
    assert model.stem.body[0].in_channels == 3
    widest = max(c.out_channels for c in convs)
    assert widest == width * 2**depth


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = UNet3D(in_channels=1, out_classes=2, depth=3, base_width=2).train()
    x = torch.randn(2, 1, 16, 16, 16)
    target = (x[:, 0] > 0).long()
    nn.functional.cross_entropy(model(x), target).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_bad_inputs_are_refused_with_the_reason() -> None:
    model = UNet3D(in_channels=1, depth=4, base_width=2)
    with pytest.raises(UNet3DInputError, match=r"not divisible by 16"):
        model(torch.zeros(1, 1, 16, 16, 40))
    with pytest.raises(UNet3DInputError, match=r"\(batch, 1, z, y, x\)"):
        model(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="depth must be 3, 4 or 5"):
        UNet3D(depth=6)
    with pytest.raises(ValueError, match="out_classes >= 2"):
        UNet3D(out_classes=1)
