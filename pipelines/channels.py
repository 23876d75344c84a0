"""Network input channels per task, built the same way for training and for inference.

Shared by the pipelines (inference) and `models.datasets` (training cases), so a model
always sees at inference exactly the channels it was trained on. `TASK_CHANNELS` is each
task's default set; `TASK_CHANNEL_OPTIONS` lists every set a model card may name for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.steps.normalisation import zscore_in_mask

__all__ = [
    "TASK_CHANNELS",
    "TASK_CHANNEL_OPTIONS",
    "ChannelInputError",
    "build_channels",
    "channel_options",
    "resolve_channels",
]

# the default (shipped) channel set per task
TASK_CHANNELS: dict[str, tuple[str, ...]] = {
    "flair": ("flair",),
    "new_lesions": ("prior_flair_registered", "current_flair", "difference"),
    "enhancing": ("t1_pre", "t1_post", "difference"),
}

# every channel set a model of the task may be trained on, the default first; new_lesions
# may also go without the difference channel (what most MSSEG-2 teams fed their networks)
TASK_CHANNEL_OPTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "flair": (TASK_CHANNELS["flair"],),
    "new_lesions": (TASK_CHANNELS["new_lesions"], ("prior_flair_registered", "current_flair")),
    "enhancing": (TASK_CHANNELS["enhancing"],),
}


class ChannelInputError(ValueError):
    """The volumes given cannot make the task's input channels."""


def _zscore(volume: ImageVolume, brain: ImageVolume) -> npt.NDArray[np.float32]:
    return zscore_in_mask(volume.with_array(volume.array.astype(np.float32)), brain).array


def channel_options(task: str) -> tuple[tuple[str, ...], ...]:
    """The channel sets allowed for ``task``, its default first."""
    if task not in TASK_CHANNEL_OPTIONS:
        raise ChannelInputError(f"unknown task {task!r}; use one of {sorted(TASK_CHANNELS)}")
    return TASK_CHANNEL_OPTIONS[task]


def resolve_channels(task: str, channels: Sequence[str] | None = None) -> tuple[str, ...]:
    """``channels`` as a tuple (None: the task's default), refused unless allowed for ``task``."""
    options = channel_options(task)
    if channels is None:
        return options[0]
    chosen = tuple(channels)
    if chosen not in options:
        raise ChannelInputError(
            f"task {task} cannot take channels {list(chosen)}; allowed: "
            f"{[list(option) for option in options]}"
        )
    return chosen


def build_channels(
    task: str,
    volumes: Mapping[str, ImageVolume],
    brain: ImageVolume,
    channels: Sequence[str] | None = None,
) -> npt.NDArray[np.float32]:
    """The input channels (C, Z, Y, X) from intensity volumes on one grid.

    ``channels``: one of the task's allowed sets (`channel_options`); None: its default
    (`TASK_CHANNELS`). Each acquisition is z-scored inside ``brain``; a ``difference``
    channel is the later (or post-contrast) minus the earlier (pre-contrast) z-scored image,
    0 outside the brain. ``volumes`` keys: flair: ``flair``; new_lesions:
    ``prior_flair_registered``, ``current_flair``; enhancing: ``t1_pre``, ``t1_post``.
    """
    chosen = resolve_channels(task, channels)
    needed = [name for name in TASK_CHANNELS[task] if name != "difference"]
    missing = [name for name in needed if name not in volumes]
    if missing:
        raise ChannelInputError(f"task {task} needs volumes {needed}; missing {missing}")
    zscored = {name: _zscore(volumes[name], brain) for name in needed}
    if "difference" in chosen:
        zscored["difference"] = (zscored[needed[1]] - zscored[needed[0]]) * (brain.array > 0)
    return np.stack([zscored[name] for name in chosen]).astype(np.float32, copy=False)
