"""Which PACS studies may be a patient's prior, and which series of it to fetch (no network)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from lesionwatch.config.schema import ClassificationConfig, SeriesClass
from lesionwatch.service.prior_matching import (
    CurrentStudy,
    choose_series,
    series_query,
    study_query,
    usable_priors,
)

CURRENT = CurrentStudy(
    study_instance_uid="1.2.3.9",
    patient_id="P1",
    study_date="20240601",
    study_time="093000",
    accession_number="ACC9",
)


def match(uid: str, date: str, time: str = "080000", **extra: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = uid
    ds.PatientID = extra.pop("patient_id", "P1")
    ds.StudyDate = date
    ds.StudyTime = time
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def uids(found: list[Dataset]) -> list[str]:
    return [str(ds.StudyInstanceUID) for ds in found]


def test_study_query_asks_for_this_patients_mr_studies_within_the_look_back() -> None:
    query = study_query(CURRENT, 365, match_issuer=False)
    assert query.QueryRetrieveLevel == "STUDY"
    assert query.PatientID == "P1"
    assert query.ModalitiesInStudy == "MR"
    assert query.StudyDate == "20230602-20240601"
    assert query.IssuerOfPatientID == ""  # returned, not matched on
    linked = study_query(CURRENT, 365, match_issuer=False, accession_number="ACC1")
    assert linked.AccessionNumber == "ACC1"


def test_most_recent_earlier_study_first() -> None:
    found, rejected = usable_priors(
        CURRENT,
        [match("1.1", "20220101"), match("1.3", "20240301"), match("1.2", "20230101")],
        1825,
        match_issuer=False,
    )
    assert uids(found) == ["1.3", "1.2", "1.1"]
    assert rejected == []


def test_guards_against_wrong_matches() -> None:
    candidates = [
        match("1.2.3.9", "20240101"),  # the current study itself
        match("1.4", "20240101", AccessionNumber="ACC9"),  # same order as the current study
        match("1.5", "20240101", patient_id="P2"),  # a PACS answering with fuzzy matching
        match("1.6", "20250101"),  # later
        match("1.7", "20240601", "100000"),  # same day, later time
        match("1.8", "20240601", ""),  # same day, time unknown
        match("1.9", ""),  # no date
        match("1.10", "20100101"),  # beyond the look-back
        match("1.11", "20240601", "080000"),  # same day, earlier: a prior
    ]
    found, rejected = usable_priors(CURRENT, candidates, 365 * 5, match_issuer=False)
    assert uids(found) == ["1.11"]
    why = {r.study_instance_uid: r.why for r in rejected}
    assert why == {
        "1.2.3.9": "it is the current study",
        "1.4": "same accession number as the current study",
        "1.5": "another Patient ID",
        "1.6": "later than the current study",
        "1.7": "same day, not known to be earlier",
        "1.8": "same day, not known to be earlier",
        "1.9": "no study date to compare",
        "1.10": "older than the look-back",
    }


def test_issuer_of_patient_id() -> None:
    current = CurrentStudy("1.2.3.9", "P1", "20240601", issuer_of_patient_id="HOSP-A")
    candidates = [
        match("1.1", "20240101", IssuerOfPatientID="HOSP-B"),  # another ID domain
        match("1.2", "20230101", IssuerOfPatientID="HOSP-A"),
        match("1.3", "20230601"),  # issuer not given by the PACS
    ]
    loose, _ = usable_priors(current, candidates, 1825, match_issuer=False)
    assert uids(loose) == ["1.3", "1.2"]  # a different issuer is never the same patient
    strict, rejected = usable_priors(current, candidates, 1825, match_issuer=True)
    assert uids(strict) == ["1.2"]  # matching on: the issuer must be shown to be the same
    assert {r.study_instance_uid for r in rejected} == {"1.1", "1.3"}
    # Matching on, but the current study has no issuer: nothing can be proven the same.
    no_issuer = CurrentStudy("1.2.3.9", "P1", "20240601")
    assert usable_priors(no_issuer, candidates, 1825, match_issuer=True)[0] == []


def series(uid: str, description: str, number: int, images: int, modality: str = "MR") -> Dataset:
    ds = series_query("1.1")
    ds.SeriesInstanceUID = uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.SeriesNumber = number
    ds.NumberOfSeriesRelatedInstances = images
    return ds


def test_choose_series_classifies_c_find_answers_like_received_series() -> None:
    answers = [
        series("1.1.1", "Ax T1 SE", 2, 40),
        series("1.1.2", "Ax T2 FLAIR", 3, 30),
        series("1.1.3", "Sag 3D FLAIR", 4, 176),  # the 3D acquisition: most images
        series("1.1.4", "FLAIR lesion map", 90, 200, modality="SEG"),  # our own output: never
    ]
    chosen = choose_series(answers, [SeriesClass.FLAIR], ClassificationConfig())
    assert chosen is not None
    assert str(chosen[SeriesClass.FLAIR].SeriesInstanceUID) == "1.1.3"
    assert choose_series(answers[:1], [SeriesClass.FLAIR], ClassificationConfig()) is None
    assert (
        choose_series(answers, [SeriesClass.FLAIR, SeriesClass.T2], ClassificationConfig()) is None
    )
