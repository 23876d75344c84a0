"""Network input channels per task, built the same way for training and for inference.

Shared by the pipelines (inference) and `models.datasets` (training cases), so a model
always sees at inference exactly the channels it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.normalisation import zscore_in_mask

__all__ = ["TASK_CHANNELS", "ChannelInputError", "build_channels"]

TASK_CHANNELS: dict[str, tuple[str, ...]] = {
    "flair": ("flair",),
    "new_lesions": ("prior_flair_registered", "current_flair", "difference"),
    "enhancing": ("t1_pre", "t1_post", "difference"),
}


class ChannelInputError(ValueError):
    """The volumes given cannot make the task's input channels."""


def _zscore(volume: ImageVolume, brain: ImageVolume) -> npt.NDArray[np.float32]:
    return zscore_in_mask(volume.with_array(volume.array.astype(np.float32)), brain).array


def build_channels(
    task: str, volumes: Mapping[str, ImageVolume], brain: ImageVolume
) -> npt.NDArray[np.float32]:
    """The task's input channels (C, Z, Y, X) from intensity volumes on one grid.

    Each acquisition is z-scored inside ``brain``; a ``difference`` channel is the later (or
    post-contrast) minus the earlier (pre-contrast) z-scored image, 0 outside the brain.
    ``volumes`` keys: flair: ``flair``; new_lesions: ``prior_flair_registered``,
    ``current_flair``; enhancing: ``t1_pre``, ``t1_post``.
    """
    if task not in TASK_CHANNELS:
        raise ChannelInputError(f"unknown task {task!r}; use one of {sorted(TASK_CHANNELS)}")
    needed = [name for name in TASK_CHANNELS[task] if name != "difference"]
    missing = [name for name in needed if name not in volumes]
    if missing:
        raise ChannelInputError(f"task {task} needs volumes {needed}; missing {missing}")
    arrays = [_zscore(volumes[name], brain) for name in needed]
    if "difference" in TASK_CHANNELS[task]:
        arrays.append((arrays[1] - arrays[0]) * (brain.array > 0))
    return np.stack(arrays).astype(np.float32, copy=False)
