"""The prior_search section: off by default, and clear errors for wrong values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lesionwatch.config.schema import LesionWatchConfig, RetrieveMethod

PACS = {"ae_title": "PACS", "host": "pacs.example.org", "port": 104}


def load(prior_search: dict[str, object]) -> LesionWatchConfig:
    return LesionWatchConfig.model_validate({"prior_search": prior_search})


def test_off_by_default_and_move_when_on() -> None:
    assert LesionWatchConfig().prior_search.pacs is None
    pacs = load({"pacs": PACS}).prior_search.pacs
    assert pacs is not None and pacs.retrieve_method is RetrieveMethod.MOVE


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"pacs": PACS | {"retrieve_method": "fetch"}}, "'move' or 'get'"),
        ({"pacs": PACS | {"ae_title": "A" * 17}}, "at most 16 characters"),
        ({"pacs": {"host": "x", "port": 104}}, "ae_title"),
        ({"lookback_days": 0}, "greater than or equal to 1"),
        ({"deadline_s": 0}, "greater than 0"),
        ({"accession_link_attribute": "OrderNumber"}, "'OrderNumber' is not a DICOM keyword"),
        ({"accession_link_attribute": "ReferencedStudySequence"}, "is a sequence"),
        ({"accession_link_required": True}, "accession_link_required needs"),
    ],
)
def test_wrong_values_are_named(section: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        load(section)
    assert message in str(caught.value)
