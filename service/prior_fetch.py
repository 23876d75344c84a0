"""The PACS half of a prior search: find the most recent usable prior, then fetch its series.

`PriorFetcher.find` asks the PACS for the patient's earlier MR studies (study level), keeps
those the matching rules allow (service.prior_matching), and checks them most recent first at
series level until one has every series the new-lesion pipeline needs. `retrieve` brings
those series here: by C-MOVE they arrive through LesionWatch's own listener like any
C-STORE; by C-GET they come back on the same association and `ArchiveStore` files them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from lesionwatch.config.schema import (
    ClassificationConfig,
    PriorSearchConfig,
    RetrieveMethod,
    SeriesClass,
)
from lesionwatch.dicom_io.archive import Archive
from lesionwatch.dicom_io.query_retrieve import QueryRetrieveClient, RetrieveOutcome

from .ingest import InstanceRecorder
from .prior_matching import CurrentStudy, choose_series, series_query, study_query, usable_priors

__all__ = ["ArchiveStore", "PacsAnswer", "PacsPrior", "PriorFetcher"]

log = logging.getLogger(__name__)

# Most candidate studies checked at series level per search (one C-FIND each).
_MAX_STUDIES_CHECKED = 5


@dataclass(frozen=True)
class PacsPrior:
    study_instance_uid: str
    study_date: str
    series_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class PacsAnswer:
    prior: PacsPrior | None
    reason: str  # why there is none (or what was chosen)


class PriorFetcher:
    def __init__(
        self,
        client: QueryRetrieveClient,
        settings: PriorSearchConfig,
        classification: ClassificationConfig,
        required: Sequence[SeriesClass],
        *,
        move_destination: str,
        store: ArchiveStore | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.classification = classification
        self.required = tuple(required)
        self.move_destination = move_destination
        self.store = store

    def find(self, current: CurrentStudy) -> PacsAnswer:
        """The most recent usable prior at the PACS; QueryRetrieveError when a query fails."""
        linked = current.linked_accession_number
        if linked:
            answer = self._search(current, accession_number=linked)
            if answer.prior is not None or self.settings.accession_link_required:
                return answer
        return self._search(current)

    def _search(self, current: CurrentStudy, accession_number: str | None = None) -> PacsAnswer:
        query = study_query(
            current,
            self.settings.lookback_days,
            match_issuer=self.settings.match_issuer_of_patient_id,
            accession_number=accession_number,
        )
        matches = self.client.find(query)
        usable, rejected = usable_priors(
            current,
            matches,
            self.settings.lookback_days,
            match_issuer=self.settings.match_issuer_of_patient_id,
        )
        for rejection in rejected:
            log.info(
                "PACS study %s is not a prior of %s: %s",
                rejection.study_instance_uid,
                current.study_instance_uid,
                rejection.why,
            )
        scope = f" with accession number {accession_number}" if accession_number else ""
        if not usable:
            return PacsAnswer(
                None,
                f"no earlier MR study{scope} for this patient at the PACS within "
                f"{self.settings.lookback_days} days",
            )
        wanted = ", ".join(c.value for c in self.required)
        for study in usable[:_MAX_STUDIES_CHECKED]:
            uid = str(study.StudyInstanceUID)
            chosen = choose_series(
                self.client.find(series_query(uid)), self.required, self.classification
            )
            if chosen is None:
                log.info("PACS study %s has no usable %s series", uid, wanted)
                continue
            prior = PacsPrior(
                uid,
                str(study.get("StudyDate", "")),
                tuple(str(chosen[c].SeriesInstanceUID) for c in self.required),
            )
            return PacsAnswer(prior, f"study of {prior.study_date} at the PACS")
        checked = min(len(usable), _MAX_STUDIES_CHECKED)
        return PacsAnswer(
            None,
            f"the {checked} most recent earlier MR studies{scope} at the PACS have no "
            f"{wanted} series",
        )

    def retrieve(self, prior: PacsPrior) -> RetrieveOutcome:
        """Fetch the prior's chosen series; QueryRetrieveError when a retrieve fails."""
        completed = failed = warning = 0
        for series_uid in prior.series_instance_uids:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "SERIES"
            identifier.StudyInstanceUID = prior.study_instance_uid
            identifier.SeriesInstanceUID = series_uid
            if self.settings.pacs is not None and (
                self.settings.pacs.retrieve_method == RetrieveMethod.GET
            ):
                assert self.store is not None, "C-GET needs an ArchiveStore"
                outcome = self.client.get(identifier, self.store)
            else:
                outcome = self.client.move(identifier, self.move_destination)
            completed += outcome.completed
            failed += outcome.failed
            warning += outcome.warning
        return RetrieveOutcome(completed, failed, warning)


class ArchiveStore:
    """Files the instances of a C-GET: archive first, then the database rows (as the listener
    does for a C-STORE), and answers with a C-STORE status."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000

    def __init__(self, archive: Archive, recorder: InstanceRecorder, calling_ae_title: str) -> None:
        self.archive = archive
        self.recorder = recorder
        self.calling_ae_title = calling_ae_title

    def __call__(self, dataset: Dataset, transfer_syntax_uid: str) -> int:
        try:
            buffer = io.BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            content = buffer.getvalue()
            header = dcmread(io.BytesIO(content), stop_before_pixels=True)
        except Exception:
            log.exception("C-GET: cannot encode a received instance")
            return self.CANNOT_UNDERSTAND
        try:
            archived = self.archive.store(
                str(header.StudyInstanceUID),
                str(header.SeriesInstanceUID),
                str(header.SOPInstanceUID),
                [content],
            )
            self.recorder.record(
                header,
                archived,
                transfer_syntax_uid=transfer_syntax_uid,
                calling_ae_title=self.calling_ae_title,
            )
        except Exception:
            log.exception("C-GET: cannot store instance %s", header.get("SOPInstanceUID"))
            return self.OUT_OF_RESOURCES
        return self.SUCCESS
