"""Real U-Nets whose weights are set by hand so their output is known (threshold detectors)."""

from __future__ import annotations

import torch

from lesionwatch.models.unet3d import UNet3D


def channel_threshold_unet(
    in_channels: int, channel: int, threshold_z: float, gain: float
) -> UNet3D:
    """A real U-Net whose weights make it pointwise on one input channel:
    P(lesion) = sigmoid(gain * (relu(x[channel]) - t)).

    Every convolution is zero except the paths that carry that channel unchanged: the stem's
    1x1x1 projection, the skip path of each decoder block's projection, the head's centre taps;
    the classifier turns that into a threshold detector, so the pipeline's result is known.
    With 3 inputs and channel 2 it flags voxels whose difference channel (later minus
    earlier) exceeds the threshold.
    """
    model = UNet3D(in_channels=in_channels, out_classes=2, depth=3, base_width=2).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d | torch.nn.ConvTranspose3d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm3d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)  # exactly the identity
        model.stem.project[0].weight[0, channel] = 1.0
        for block in model.up:
            out_ch = block.block.project[0].out_channels
            block.block.project[0].weight[0, out_ch] = 1.0  # skip channel 0 -> channel 0
        for conv in (m for m in model.head if isinstance(m, torch.nn.Conv3d)):
            conv.weight[0, 0, 1, 1, 1] = 1.0
        model.classifier.weight[1, 0] = gain
        model.classifier.bias[1] = -gain * threshold_z
    return model


def intensity_threshold_unet(threshold_z: float, gain: float) -> UNet3D:
    """A one-channel bright-voxel detector: P(lesion) = sigmoid(gain * (relu(z) - t))."""
    return channel_threshold_unet(1, 0, threshold_z, gain)


def difference_threshold_unet(threshold_z: float, gain: float) -> UNet3D:
    """For the 3-channel tasks (earlier, later, difference): thresholds the difference."""
    return channel_threshold_unet(3, 2, threshold_z, gain)
