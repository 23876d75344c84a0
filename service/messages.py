"""The messages that travel through the broker: small, versioned JSON, never pixels, never pickle.

A message only names work whose state is already committed in the database (a job row, a
delivery row); the consumer reads everything else from there. `version` lets a consumer
refuse a message from a newer producer it does not understand (dead-lettered with the reason)
instead of guessing; fields a consumer does not know are ignored, so adding one is compatible.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = [
    "DELIVERY_QUEUE",
    "MESSAGE_VERSION",
    "DeliveryMessage",
    "JobMessage",
    "Message",
    "MessageFormatError",
    "decode_message",
]

MESSAGE_VERSION = 1
DELIVERY_QUEUE = "deliveries"  # the dispatcher's own queue


class MessageFormatError(ValueError):
    """A message body is not a message this version of LesionWatch understands."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1] = 1  # MESSAGE_VERSION

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class JobMessage(_Message):
    """Run job `job_id` (pipeline `pipeline` on study `study_instance_uid`)."""

    kind: Literal["job"] = "job"
    job_id: int
    study_instance_uid: str = Field(max_length=64)
    pipeline: str = Field(max_length=32)
    generation: int = Field(ge=0)
    attempt: int = Field(ge=0, description="attempts already made when this was published")


class DeliveryMessage(_Message):
    """Results of `job_id` were queued for delivery: the dispatcher should send what is due."""

    kind: Literal["delivery"] = "delivery"
    job_id: int | None = None
    study_instance_uid: str = Field("", max_length=64)


Message = Annotated[JobMessage | DeliveryMessage, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[JobMessage | DeliveryMessage] = TypeAdapter(Message)


def decode_message(body: bytes) -> JobMessage | DeliveryMessage:
    """Parse a message body; `MessageFormatError` says what is wrong with it."""
    try:
        return _ADAPTER.validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
            for err in exc.errors()
        )
        raise MessageFormatError(f"not a LesionWatch message (version 1): {problems}") from exc
