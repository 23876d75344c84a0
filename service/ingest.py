"""Recording received instances: Study/Series/Instance rows, upserted in one transaction each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset
from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lesionwatch.config.schema import ClassificationConfig, PriorityConfig, SeriesClass
from lesionwatch.dicom_io.archive import ArchivedFile
from lesionwatch.dicom_io.classify import classify_series

from .db.models import URGENT_PRIORITY, Instance, Series, Study, StudyState, utcnow

__all__ = ["InstanceRecorder", "RecordError", "RecordResult"]

LOGGER = logging.getLogger(__name__)

_ATTEMPTS = 5  # concurrent associations of one study race to insert its study/series rows
_RETRY_PAUSE_S = 0.05
# last_received_at feeds the quiet-period check (tens of seconds); finer updates cost writes.
_TIMESTAMP_RESOLUTION = timedelta(seconds=1)
_ASSEMBLED_STATES = frozenset({StudyState.READY, StudyState.INCOMPLETE})

_SERIES_LOOKUP = (
    select(Series.id, Series.last_received_at, Study.id, Study.state, Study.last_received_at)
    .join(Study, Series.study_id == Study.id)
    .where(Series.series_instance_uid == bindparam("series_uid"))
)
_INSTANCE_LOOKUP = select(Instance.id, Instance.sha256, Instance.path).where(
    Instance.sop_instance_uid == bindparam("sop_uid")
)
_INSTANCE_INSERT = insert(Instance).returning(Instance.id)
_TOUCH_SERIES = (
    update(Series).where(Series.id == bindparam("row_id")).values(last_received_at=bindparam("now"))
)
_TOUCH_STUDY = (
    update(Study).where(Study.id == bindparam("row_id")).values(last_received_at=bindparam("now"))
)


class RecordError(Exception):
    """An instance could not be recorded in the database."""


@dataclass(frozen=True, slots=True)
class RecordResult:
    study_id: int
    series_id: int
    instance_id: int
    new_study: bool
    new_series: bool
    new_instance: bool
    content_changed: bool  # an existing instance was re-sent with other content
    # A new series reached a study the assembler already decided (READY/INCOMPLETE); the
    # late-series policy belongs to the assembler, so this is only reported.
    new_series_after_assembly: bool
    series_class: SeriesClass | None  # set when the series was classified by this call
    # The archive path the instance was recorded at before this re-send under other study or
    # series UIDs: that older copy is no longer the instance (the listener removes it).
    superseded_path: str | None = None


def _text(dataset: Dataset, keyword: str, max_length: int) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip()[:max_length]


def _integer(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # a malformed IS value must not refuse an otherwise fine instance


class InstanceRecorder:
    """Upserts the rows for one archived instance; safe under re-sends and parallel associations."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        classification: ClassificationConfig,
        *,
        priority: PriorityConfig | None = None,
    ) -> None:
        self._sessions = sessions
        self._classification = classification
        self._priority = priority or PriorityConfig()
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("InstanceRecorder needs a sessionmaker bound to an Engine")
        self._engine = bind

    @property
    def engine(self) -> Engine:
        return self._engine

    def record(
        self,
        dataset: Dataset,
        archived: ArchivedFile,
        *,
        transfer_syntax_uid: str,
        calling_ae_title: str = "",
        before_commit: Callable[[], object] | None = None,
        received_at: datetime | None = None,
    ) -> RecordResult:
        """Record ``dataset`` (its header is enough) stored in the archive as ``archived``.

        ``before_commit`` runs inside the transaction just before it commits (the listener
        makes the archive file durable there, so a row never points at a file that is not);
        an exception from it rolls the transaction back and propagates. It may run again when
        the transaction is retried, so it must be idempotent.

        ``received_at`` (default: now) is the instance row's receive time when it is recorded
        later than it was archived (:mod:`lesionwatch.service.record_backlog`); the study and
        series timestamps are always the recording time.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return self._record_once(
                    dataset,
                    archived,
                    transfer_syntax_uid,
                    calling_ae_title,
                    before_commit,
                    received_at,
                )
            except (IntegrityError, OperationalError) as exc:
                # IntegrityError: another association inserted the same study/series/instance
                # first; the retry finds its row. OperationalError: SQLite busy beyond timeout.
                if attempt == _ATTEMPTS:
                    raise RecordError(
                        f"cannot record instance {dataset.get('SOPInstanceUID')}: {exc.orig}"
                    ) from exc
                LOGGER.debug(
                    "record attempt %d raced another writer (%s); retrying", attempt, exc.orig
                )
                time.sleep(_RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    def _record_once(
        self,
        dataset: Dataset,
        archived: ArchivedFile,
        transfer_syntax_uid: str,
        calling_ae_title: str,
        before_commit: Callable[[], object] | None,
        received_at: datetime | None = None,
    ) -> RecordResult:
        # Cached Core statements on a plain connection, no ORM session, on the per-instance
        # path: an instance of a known series costs two SELECTs and one INSERT (timestamps are
        # refreshed at most once per _TIMESTAMP_RESOLUTION). Only a new series uses the ORM.
        now = utcnow()
        series_uid = str(dataset.SeriesInstanceUID)
        sop_uid = str(dataset.SOPInstanceUID)
        with self._engine.begin() as connection:
            new_study = new_series = False
            series_class: SeriesClass | None = None
            row = connection.execute(_SERIES_LOOKUP, {"series_uid": series_uid}).first()
            if row is None:
                # The session joins this connection's transaction and never commits it.
                with Session(bind=connection) as session:
                    series_id, study_id, study_state, new_study, series_class = self._new_series(
                        session, dataset, now, calling_ae_title
                    )
                new_series = True
            else:
                series_id, series_last, study_id, study_state, study_last = row
                if now - series_last >= _TIMESTAMP_RESOLUTION:
                    connection.execute(_TOUCH_SERIES, {"row_id": series_id, "now": now})
                if now - study_last >= _TIMESTAMP_RESOLUTION:
                    connection.execute(_TOUCH_STUDY, {"row_id": study_id, "now": now})

            values = {
                "series_id": series_id,
                "sop_class_uid": str(dataset.SOPClassUID),
                "transfer_syntax_uid": transfer_syntax_uid,
                "instance_number": _integer(dataset, "InstanceNumber"),
                "path": str(archived.relative_path),
                "size_bytes": archived.size_bytes,
                "sha256": archived.sha256,
                "calling_ae_title": calling_ae_title[:16],
                "received_at": received_at or now,
            }
            existing = connection.execute(_INSTANCE_LOOKUP, {"sop_uid": sop_uid}).first()
            content_changed = False
            superseded_path: str | None = None
            if existing is None:
                instance_id = connection.execute(
                    _INSTANCE_INSERT, {"sop_instance_uid": sop_uid, **values}
                ).scalar_one()
            else:
                instance_id, previous_sha256, previous_path = existing
                if previous_path != values["path"]:
                    superseded_path = previous_path
                if previous_sha256 != archived.sha256:
                    content_changed = True
                    LOGGER.warning(
                        "instance %s re-sent by %r with different content (sha256 %s -> %s)",
                        sop_uid,
                        calling_ae_title,
                        previous_sha256,
                        archived.sha256,
                    )
                    connection.execute(
                        update(Instance).where(Instance.id == instance_id).values(**values)
                    )
            if before_commit is not None:
                before_commit()

        new_series_after_assembly = new_series and study_state in _ASSEMBLED_STATES
        if new_series_after_assembly:
            LOGGER.info(
                "series %s arrived after study %s was assembled (%s)",
                series_uid,
                dataset.StudyInstanceUID,
                study_state,
            )
        return RecordResult(
            study_id=study_id,
            series_id=series_id,
            instance_id=instance_id,
            new_study=new_study,
            new_series=new_series,
            new_instance=existing is None,
            content_changed=content_changed,
            new_series_after_assembly=new_series_after_assembly,
            series_class=series_class,
            superseded_path=superseded_path,
        )

    def _new_series(
        self, session: Session, dataset: Dataset, now: datetime, calling_ae_title: str = ""
    ) -> tuple[int, int, StudyState, bool, SeriesClass]:
        """Insert the series (and its study when new); classify it from this first instance."""
        study_uid = str(dataset.StudyInstanceUID)
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        new_study = study is None
        if study is None:
            study = self._new_study(dataset, study_uid, now)
            study.priority = self.study_priority(dataset, calling_ae_title)
            session.add(study)
            session.flush()
        else:
            study.last_received_at = now
        classification = classify_series(dataset, self._classification)
        series = Series(
            study_id=study.id,
            series_instance_uid=str(dataset.SeriesInstanceUID),
            modality=_text(dataset, "Modality", 16),
            series_number=_integer(dataset, "SeriesNumber"),
            series_description=_text(dataset, "SeriesDescription", 64),
            manufacturer=_text(dataset, "Manufacturer", 64),
            series_class=classification.series_class,
            classification_reason=f"{classification.rule}: {classification.reason}",
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        session.flush()
        LOGGER.info(
            # No SeriesDescription: free text, where sites sometimes type a patient's name.
            "new series %s (#%s) in study %s classified %s by %s",
            series.series_instance_uid,
            series.series_number,
            study_uid,
            classification.series_class,
            classification.rule,
        )
        return series.id, study.id, study.state, new_study, classification.series_class

    def study_priority(self, dataset: Dataset, calling_ae_title: str) -> int:
        """URGENT_PRIORITY when the sender or the requested procedure priority says so."""
        urgent_aets = {a.strip() for a in self._priority.urgent_calling_ae_titles}
        if calling_ae_title.strip() in urgent_aets:
            return URGENT_PRIORITY
        requested = str(dataset.get("RequestedProcedurePriority", "") or "").strip().upper()
        urgent = {p.strip().upper() for p in self._priority.urgent_procedure_priorities}
        return URGENT_PRIORITY if requested and requested in urgent else 0

    @staticmethod
    def _new_study(dataset: Dataset, study_uid: str, now: datetime) -> Study:
        return Study(
            study_instance_uid=study_uid,
            patient_id=_text(dataset, "PatientID", 64),
            patient_name=_text(dataset, "PatientName", 324),
            patient_birth_date=_text(dataset, "PatientBirthDate", 8),
            study_date=_text(dataset, "StudyDate", 8),
            study_time=_text(dataset, "StudyTime", 16),
            accession_number=_text(dataset, "AccessionNumber", 16),
            study_description=_text(dataset, "StudyDescription", 64),
            first_received_at=now,
            last_received_at=now,
        )
