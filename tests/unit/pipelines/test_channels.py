"""Input channels per task: the default set, the allowed alternatives, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.channels import (
    TASK_CHANNELS,
    ChannelInputError,
    build_channels,
    channel_options,
    resolve_channels,
)

TWO_CHANNEL = ("prior_flair_registered", "current_flair")


def _volume(array: np.ndarray) -> ImageVolume:
    return ImageVolume(array=array, spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0))


@pytest.fixture
def pair() -> tuple[dict[str, ImageVolume], ImageVolume]:
    rng = np.random.default_rng(0)
    brain = np.zeros((8, 8, 8), np.uint8)
    brain[2:6, 2:6, 2:6] = 1
    prior = rng.normal(100.0, 10.0, brain.shape).astype(np.float32)
    current = prior.copy()
    current[3, 3, 3] += 80.0  # a new lesion
    volumes = {"prior_flair_registered": _volume(prior), "current_flair": _volume(current)}
    return volumes, _volume(brain)


def test_default_is_the_first_option_of_every_task() -> None:
    for task, channels in TASK_CHANNELS.items():
        assert channel_options(task)[0] == channels == resolve_channels(task)
    assert channel_options("new_lesions") == (TASK_CHANNELS["new_lesions"], TWO_CHANNEL)
    assert channel_options("flair") == (("flair",),)


def test_two_channel_new_lesions_drops_only_the_difference(pair) -> None:
    volumes, brain = pair
    default = build_channels("new_lesions", volumes, brain)
    assert default.shape == (3, 8, 8, 8) and default.dtype == np.float32
    inside = brain.array > 0
    assert np.allclose(default[2], (default[1] - default[0]) * inside)
    assert abs(float(default[0][inside].mean())) < 1e-5  # z-scored in the brain
    two = build_channels("new_lesions", volumes, brain, TWO_CHANNEL)
    assert two.shape == (2, 8, 8, 8) and two.dtype == np.float32
    assert np.array_equal(two, default[:2])
    assert np.array_equal(build_channels("new_lesions", volumes, brain, list(TWO_CHANNEL)), two)


@pytest.mark.parametrize(
    ("task", "channels"),
    [
        ("new_lesions", ("current_flair", "prior_flair_registered")),  # order matters
        ("new_lesions", ("current_flair",)),
        ("new_lesions", ("prior_flair_registered", "current_flair", "difference", "flair")),
        ("enhancing", ("t1_pre", "t1_post")),  # the alternative is new_lesions' only
        ("flair", TWO_CHANNEL),
    ],
)
def test_a_channel_set_not_allowed_for_the_task_is_refused(pair, task, channels) -> None:
    volumes, brain = pair
    with pytest.raises(ChannelInputError, match=f"task {task} cannot take channels"):
        build_channels(task, volumes, brain, channels)


def test_unknown_task_and_missing_volumes_are_refused(pair) -> None:
    volumes, brain = pair
    with pytest.raises(ChannelInputError, match="unknown task 'pet'"):
        channel_options("pet")
    with pytest.raises(ChannelInputError, match="missing"):
        build_channels(
            "new_lesions", {"current_flair": volumes["current_flair"]}, brain, TWO_CHANNEL
        )
