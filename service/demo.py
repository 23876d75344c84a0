"""`make demo`: the service on embedded defaults receives real MS studies over DICOM.

The studies are built from real MRI in tests/data (open_ms_data, CC-BY): patient 01's
baseline and follow-up exams (FLAIR, T1, T2 in scanner space) and patient 07's exam with
post-gadolinium T1. They are sent by C-STORE like a PACS would, then the demo shows what was
received, archived and classified and which jobs study assembly created.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

from lesionwatch.config import load_config
from lesionwatch.config.schema import DestinationConfig, SeriesClass
from lesionwatch.dicom_io.scu import Outcome, StoreItem, store_files
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.study_builder import (
    SeriesSpec,
    build_study_from_nifti,
    open_ms_longitudinal_specs,
)

from .db.models import StudyState
from .queries import list_jobs, list_studies
from .server import ListenerService
from .text_table import format_table

__all__ = ["run_demo"]

_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "open_ms_data"


def _identity(
    patient: str, name: str, birth: dt.date, sex: str, date: dt.date, accession: str
) -> StudyIdentity:
    return StudyIdentity(
        patient_id=patient,
        patient_name=name,
        birth_date=birth,
        sex=sex,
        study_instance_uid=derive_uid("lesionwatch-demo", patient, date.isoformat()),
        study_date=date,
        study_time=dt.time(9, 30),
        accession_number=accession,
        study_description="MRI BRAIN MS PROTOCOL",
    )


def _build_studies(out: Path) -> list[tuple[str, list[Path]]]:
    """Write the demo studies as DICOM; (label, files) per study, prior first."""
    if not _DATA.is_dir():
        raise FileNotFoundError(
            f"demo data not found at {_DATA} (run the demo from a source checkout)"
        )
    longitudinal = _DATA / "longitudinal" / "patient01"
    cross = _DATA / "cross_sectional" / "patient07"
    birth = dt.date(1980, 5, 17)
    studies = [
        (
            "open_ms patient01, baseline",
            open_ms_longitudinal_specs(longitudinal, 1),
            _identity(
                "OMS-LONG-01", "OpenMS^Patient01", birth, "F", dt.date(2024, 3, 12), "DEMO0101"
            ),
            "siemens",
        ),
        (
            "open_ms patient01, follow-up",
            open_ms_longitudinal_specs(longitudinal, 2),
            _identity(
                "OMS-LONG-01", "OpenMS^Patient01", birth, "F", dt.date(2025, 3, 20), "DEMO0102"
            ),
            "siemens",
        ),
        (
            "open_ms patient07, with gadolinium",
            [
                SeriesSpec(cross / "FLAIR.nii.gz", SeriesClass.FLAIR),
                SeriesSpec(cross / "T1.nii.gz", SeriesClass.T1_PRE),
                SeriesSpec(cross / "T1POST.nii.gz", SeriesClass.T1_POST),
            ],
            _identity(
                "OMS-CROSS-07",
                "OpenMS^Patient07",
                dt.date(1975, 1, 2),
                "M",
                dt.date(2025, 6, 3),
                "DEMO0701",
            ),
            "ge",
        ),
    ]
    built = []
    for index, (label, specs, identity, vendor) in enumerate(studies):
        series = build_study_from_nifti(specs, identity, out / f"study{index}", vendor=vendor)  # type: ignore[arg-type]
        built.append((label, [f for s in series for f in s.files]))
    return built


def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    root = workdir or Path(tempfile.mkdtemp(prefix="lesionwatch-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _run(root)
    finally:
        if workdir is None and not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\nwork folder kept: {root}")


def _run(root: Path) -> int:
    print("LesionWatch demo: building DICOM studies from real MS MRI (tests/data/NOTICE.md) ...")
    studies = _build_studies(root / "outgoing")
    # Embedded defaults, except a short quiet period so the demo does not wait a minute.
    config = load_config(
        None,
        environ={},
        overrides={
            "storage.data_dir": str(root / "lesionwatch"),
            "storage.min_free_disk_mb": 64,
            "listener.port": _free_port(),
            "assembly.quiet_period_s": 3,
            "assembly.deadline_s": 60,
            "assembly.poll_interval_s": 0.5,
        },
    )
    service = ListenerService(config)
    service.start()
    try:
        listener = config.listener
        print(
            f"service listening as {listener.ae_title} on {listener.host}:{listener.port} "
            "(embedded SQLite)"
        )
        destination = DestinationConfig(
            name="lesionwatch",
            ae_title=listener.ae_title,
            host=listener.host,
            port=listener.port,
            calling_ae_title="DEMO_PACS",
        )
        for label, files in studies:
            started = time.perf_counter()
            results = store_files(destination, [StoreItem(i, f) for i, f in enumerate(files)])
            sent = sum(r.outcome is Outcome.SUCCESS for r in results)
            failed = [r for r in results if r.outcome is not Outcome.SUCCESS]
            elapsed = time.perf_counter() - started
            print(f"  C-STORE {label}: {sent}/{len(files)} instances accepted in {elapsed:.1f} s")
            for result in failed[:3]:
                print(f"    failed: {result.reason}")
            if failed:
                return 1
        print("waiting for the studies to become stable (quiet period 3 s) ...")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with service.sessions() as session:
                open_studies = list_studies(session, StudyState.RECEIVING)
            if not open_studies:
                break
            time.sleep(0.5)
        _report(service, config.storage.data_dir)
    finally:
        service.stop()
    return 0


def _report(service: ListenerService, data_dir: Path) -> None:
    archive = data_dir / "archive"
    files = [p for p in archive.rglob("*.dcm")] if archive.is_dir() else []
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    with service.sessions() as session:
        studies = list_studies(session)
        jobs = list_jobs(session)
    print(f"\narchived: {len(files)} files, {size_mb:.1f} MB under {archive}")
    for study in studies:
        print(
            f"\nstudy {study.study_instance_uid}  patient {study.patient_id}  "
            f"date {study.study_date}"
        )
        print(f"  state: {study.state}" + (f" ({study.reason})" if study.reason else ""))
        rows = [
            (s.series_number, s.description, s.manufacturer, s.instances, s.series_class, s.reason)
            for s in study.series
        ]
        print(
            "  "
            + format_table(
                ["#", "description", "vendor", "images", "class", "reason"], rows, 160
            ).replace("\n", "\n  ")
        )
    print("\njobs created by study assembly (run by the workers in a later part):")
    print(
        format_table(
            ["job", "study", "pipeline", "state"],
            [(j.job_id, j.study_instance_uid, j.pipeline, j.state) for j in jobs],
            70,
        )
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
