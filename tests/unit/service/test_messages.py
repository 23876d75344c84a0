"""Job and delivery messages: small versioned JSON, refused with a reason when not understood."""

from __future__ import annotations

import json

import pytest

from lesionwatch.service.messages import (
    DeliveryMessage,
    JobMessage,
    MessageFormatError,
    decode_message,
)


def test_a_job_message_is_small_json_and_round_trips() -> None:
    message = JobMessage(
        job_id=7, study_instance_uid="1.2.3", pipeline="flair", generation=1, attempt=0
    )
    body = message.encode()
    assert json.loads(body) == {
        "version": 1, "kind": "job", "job_id": 7, "study_instance_uid": "1.2.3",
        "pipeline": "flair", "generation": 1, "attempt": 0,
    }  # fmt: skip
    assert len(body) < 200  # never pixels
    assert decode_message(body) == message
    assert isinstance(decode_message(DeliveryMessage(job_id=7).encode()), DeliveryMessage)


def test_fields_a_newer_producer_adds_are_ignored() -> None:
    body = json.dumps({"version": 1, "kind": "delivery", "job_id": 3, "trace_id": "x"})
    assert decode_message(body.encode()) == DeliveryMessage(job_id=3)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x80\x04pickle", "not a LesionWatch message"),
        (b'{"version": 2, "kind": "job", "job_id": 1}', "version"),
        (b'{"version": 1, "kind": "study"}', "kind"),
        (b'{"version": 1, "kind": "job", "job_id": "seven"}', "job_id"),
    ],
)
def test_what_is_not_understood_is_refused_with_the_reason(body: bytes, problem: str) -> None:
    with pytest.raises(MessageFormatError, match=problem):
        decode_message(body)
