"""The pipeline registry: the three MS pipelines, what they need, and no training code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lesionwatch.config.schema import EnhancingPipelineConfig, PipelinesConfig, SeriesClass
from lesionwatch.dicom_io.codes import FindingType
from lesionwatch.pipelines.registry import (
    PIPELINES,
    UnknownPipelineError,
    config_problems,
    get_pipeline,
)


def test_every_pipeline_reports_its_finding_on_its_source_series() -> None:
    table = {
        name: (spec.task, spec.finding_type, spec.required_series, spec.result_series,
               spec.needs_prior)
        for name, spec in PIPELINES.items()
    }  # fmt: skip
    assert table == {
        "flair": ("flair", FindingType.MS_LESION, (SeriesClass.FLAIR,), SeriesClass.FLAIR, False),
        "new_lesions": (
            "new_lesions", FindingType.NEW_LESION, (SeriesClass.FLAIR,), SeriesClass.FLAIR, True,
        ),
        "enhancing": (
            "enhancing", FindingType.ENHANCING_LESION, (SeriesClass.T1_PRE, SeriesClass.T1_POST),
            SeriesClass.T1_POST, False,
        ),
    }  # fmt: skip
    # Config names and registry names are the same names.
    assert set(PIPELINES) == set(PipelinesConfig().enabled())


def test_unknown_pipeline_names_say_which_exist() -> None:
    with pytest.raises(UnknownPipelineError, match="known: flair, new_lesions, enhancing"):
        get_pipeline("flare")


def test_config_that_would_start_a_pipeline_without_its_series_is_flagged() -> None:
    assert config_problems(PipelinesConfig()) == []
    wrong = PipelinesConfig(
        enhancing=EnhancingPipelineConfig(required_series=(SeriesClass.T1_POST,))
    )
    [problem] = config_problems(wrong)
    assert "pipelines.enhancing.required_series must include T1_PRE" in problem


def test_pipelines_load_no_training_code() -> None:
    code = (
        "import sys\n"
        "import lesionwatch.pipelines.registry, lesionwatch.pipelines.model_cache\n"
        "import lesionwatch.pipelines.flair, lesionwatch.pipelines.new_lesions\n"
        "import lesionwatch.pipelines.enhancing\n"
        "import lesionwatch.service.job_execution, lesionwatch.service.worker\n"
        "print(sorted(m for m in sys.modules if m.startswith('lesionwatch.models')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert eval(loaded) == [  # noqa: S307 - our own subprocess's repr of a list of names
        "lesionwatch.models",
        "lesionwatch.models.device",
        "lesionwatch.models.unet3d",
        "lesionwatch.models.weights",
    ]
