"""`make demo`: real MS studies go in over DICOM and come back as SEG and SR, untouched by hand.

The studies are built from real MRI in tests/data (open_ms_data, CC-BY): patient 01's
baseline and follow-up exams (FLAIR, T1, T2 in scanner space) and patient 07's exam with
post-gadolinium T1. The demo starts `lesionwatch serve` on embedded defaults (SQLite, the
embedded queue, one worker) plus a stand-in PACS (a C-STORE receiver), sends the studies like
a PACS would, and waits until every result has been delivered. Then it reads the reports the
stand-in PACS received and prints, per study, lesion counts and volumes, what was not
assessed and why, the time each stage took, and where the files are.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select

from lesionwatch.config import load_config
from lesionwatch.config.schema import DestinationConfig, LesionWatchConfig, SeriesClass
from lesionwatch.dicom_io.scu import Outcome, StoreItem, store_files
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.sr_reader import read_report_summary
from lesionwatch.dicom_io.store_receiver import StoreReceiver
from lesionwatch.dicom_io.study_builder import (
    SeriesSpec,
    build_study_from_nifti,
    open_ms_longitudinal_specs,
)

from .db.delivery_models import Delivery, DeliveryState
from .db.models import REPORT_PIPELINE, Job, JobState, Study, StudyState
from .server import Roles, ServiceProcess

__all__ = ["run_demo"]

_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "open_ms_data"
_TIMEOUT_S = 1500.0


@dataclass(frozen=True)
class _DemoStudy:
    label: str
    study_instance_uid: str
    files: list[Path]


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


def _build_studies(out: Path) -> list[_DemoStudy]:
    """Write the demo studies as DICOM, prior first."""
    if not _DATA.is_dir():
        raise FileNotFoundError(
            f"demo data not found at {_DATA} (run the demo from a source checkout)"
        )
    longitudinal = _DATA / "longitudinal" / "patient01"
    cross = _DATA / "cross_sectional" / "patient07"
    birth = dt.date(1980, 5, 17)
    studies = [
        (
            "patient01 baseline",
            open_ms_longitudinal_specs(longitudinal, 1),
            _identity(
                "OMS-LONG-01", "OpenMS^Patient01", birth, "F", dt.date(2024, 3, 12), "DEMO0101"
            ),
            "siemens",
        ),
        (
            "patient01 follow-up",
            open_ms_longitudinal_specs(longitudinal, 2),
            _identity(
                "OMS-LONG-01", "OpenMS^Patient01", birth, "F", dt.date(2025, 3, 20), "DEMO0102"
            ),
            "siemens",
        ),
        (
            "patient07 with gadolinium",
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
        built.append(
            _DemoStudy(label, identity.study_instance_uid, [f for s in series for f in s.files])
        )
    return built


def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    root = workdir or Path(tempfile.mkdtemp(prefix="lesionwatch-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    keep = keep or workdir is not None
    try:
        return _run(root)
    finally:
        if keep:
            print(f"\nwork folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            print("\n(work folder removed; `lesionwatch demo --keep` keeps the files)")


def _demo_config(root: Path, pacs: StoreReceiver) -> LesionWatchConfig:
    # Embedded defaults, except a short quiet period so the demo does not wait a minute.
    return load_config(
        None,
        environ={},
        overrides={
            "storage.data_dir": str(root / "lesionwatch"),
            "storage.min_free_disk_mb": 64,
            "listener.port": _free_port(),
            "assembly.quiet_period_s": 3,
            "assembly.deadline_s": 60,
            "assembly.poll_interval_s": 0.5,
            "metrics.port": 0,
            "log_level": "WARNING",
            "destinations": [
                {
                    "name": "DEMO_PACS",
                    "ae_title": pacs.ae_title,
                    "host": pacs.host,
                    "port": pacs.port,
                }
            ],
            "delivery.poll_interval_s": 1,
        },
    )


def _run(root: Path) -> int:
    started = time.perf_counter()
    print("LesionWatch demo: building DICOM studies from real MS MRI (tests/data/NOTICE.md) ...")
    studies = _build_studies(root / "outgoing")
    pacs = StoreReceiver(root / "pacs", ae_title="DEMO_PACS").start()
    config = _demo_config(root, pacs)
    service = ServiceProcess(config, Roles(listen=True, work=True, dispatch=True))
    service.start()
    try:
        listener = config.listener
        print(
            f"lesionwatch serve: listening as {listener.ae_title} on {listener.host}:"
            f"{listener.port}, embedded SQLite + queue, {config.worker.concurrency} worker; "
            f"results go to DEMO_PACS on port {pacs.port}"
        )
        if service.metrics_server is not None:
            print(f"metrics: http://127.0.0.1:{service.metrics_server.port}/metrics")
        sender = DestinationConfig(
            name="lesionwatch",
            ae_title=listener.ae_title,
            host=listener.host,
            port=listener.port,
            calling_ae_title="DEMO_SCANNER",
        )
        send_s: dict[str, float] = {}
        for study in studies:
            began = time.perf_counter()
            results = store_files(sender, [StoreItem(i, f) for i, f in enumerate(study.files)])
            failed = [r for r in results if r.outcome is not Outcome.SUCCESS]
            send_s[study.study_instance_uid] = time.perf_counter() - began
            print(
                f"  C-STORE {study.label}: {len(results) - len(failed)}/{len(study.files)} "
                f"images accepted in {send_s[study.study_instance_uid]:.1f} s"
            )
            for result in failed[:3]:
                print(f"    failed: {result.reason}")
            if failed:
                return 1
        print("waiting for assembly (quiet period 3 s), the pipelines and delivery ...")
        if not _wait(service, pacs, [s.study_instance_uid for s in studies], started):
            print("the demo did not finish in time; see `lesionwatch jobs` in the work folder")
            return 1
        _report(service, pacs, studies, send_s, config)
    finally:
        service.stop()
        pacs.stop()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _wait(service: ServiceProcess, pacs: StoreReceiver, uids: list[str], started: float) -> bool:
    """Until every study is decided, every job finished and every result delivered."""
    deadline = time.monotonic() + _TIMEOUT_S
    announced: set[int] = set()
    while time.monotonic() < deadline:
        with service.sessions() as session:
            studies = session.scalars(select(Study).where(Study.study_instance_uid.in_(uids))).all()
            jobs = session.scalars(select(Job).order_by(Job.id)).all()
            pending_deliveries = session.scalars(
                select(Delivery.id).where(Delivery.state == DeliveryState.PENDING)
            ).all()
            labels = {s.id: s.study_instance_uid for s in studies}
            for job in jobs:
                if job.id in announced or not job.state.terminal or job.state == JobState.SKIPPED:
                    continue
                announced.add(job.id)
                took = (
                    (job.finished_at - job.started_at).total_seconds()
                    if job.finished_at and job.started_at
                    else 0.0
                )
                print(
                    f"  [{time.perf_counter() - started:5.0f} s] job {job.id} {job.pipeline:<11} "
                    f"{job.state.value} in {took:.0f} s: {job.reason}  "
                    f"(study ...{labels.get(job.study_id, '?')[-12:]})"
                )
        decided = len(studies) == len(uids) and all(
            s.state != StudyState.RECEIVING for s in studies
        )
        busy = any(j.state in (JobState.PENDING, JobState.RUNNING, JobState.RETRYING) for j in jobs)
        reports_done = all(
            any(
                j.pipeline == REPORT_PIPELINE and j.study_id == s.id and j.state.terminal
                for j in jobs
            )
            for s in studies
            if s.state == StudyState.READY
        )
        if decided and not busy and reports_done and not pending_deliveries and jobs:
            return True
        time.sleep(1.0)
    return False


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{(b - a).total_seconds():.1f} s"


def _report(
    service: ServiceProcess,
    pacs: StoreReceiver,
    studies: list[_DemoStudy],
    send_s: dict[str, float],
    config: LesionWatchConfig,
) -> None:
    received = {}
    for path in pacs.files("SR"):
        ds = pydicom.dcmread(path)
        received[str(ds.StudyInstanceUID)] = (path, read_report_summary(ds))
    data_dir = config.storage.data_dir.resolve()
    with service.sessions() as session:
        for demo in studies:
            study = session.scalars(
                select(Study).where(Study.study_instance_uid == demo.study_instance_uid)
            ).one()
            jobs = session.scalars(
                select(Job).where(Job.study_id == study.id).order_by(Job.id)
            ).all()
            print(f"\n=== {demo.label}: study {study.study_instance_uid} ({study.study_date})")
            if demo.study_instance_uid not in received:
                print(f"  no report received ({study.state.value}: {study.state_reason})")
                continue
            path, summary = received[demo.study_instance_uid]
            print("  report received by DEMO_PACS:")
            for finding in summary.findings:
                largest = max(finding.lesion_volumes_ml, default=0.0)
                print(
                    f"    {finding.label:<22} {finding.lesion_count:3d} lesions, "
                    f"{finding.total_volume_ml:6.2f} mL total (largest {largest:.2f} mL)"
                )
            for statement in summary.statements:
                print(f"    - {statement}")
            print("  time per stage:")
            send = send_s[demo.study_instance_uid]
            print(f"    C-STORE of {len(demo.files)} images       {send:.1f} s")
            print(
                f"    quiet period and assembly  "
                f"{_seconds(study.last_received_at, study.assembled_at)}"
            )
            for job in jobs:
                if job.state == JobState.SKIPPED:
                    print(f"    {job.pipeline:<12} not run: {job.reason}")
                    continue
                steps = json.loads(job.timings_json or "{}")
                major = ", ".join(
                    f"{name} {seconds:.1f} s"
                    for name, seconds in steps.items()
                    if name in ("load_series", "inference", "build_results", "build_report")
                    or name.startswith("registration")
                )
                print(
                    f"    {job.pipeline:<12} queued {_seconds(job.created_at, job.started_at)}, "
                    f"ran {_seconds(job.started_at, job.finished_at)} ({major})"
                )
            sent = session.scalars(
                select(Delivery).where(Delivery.job_id.in_([j.id for j in jobs]))
            ).all()
            last_sent = max((d.sent_at for d in sent if d.sent_at), default=None)
            last_done = max((j.finished_at for j in jobs if j.finished_at), default=None)
            print(
                f"    delivery of {len(sent)} objects     {_seconds(last_done, last_sent)} "
                "after the last job"
            )
            print("  files:")
            print(f"    received by DEMO_PACS: {path.parent}")
            written = data_dir / "results" / study.study_instance_uid
            print(f"    results written by LesionWatch: {written}")
    counts = {uid: n for uid, n in pacs.received.items()}
    print(
        f"\nDEMO_PACS received {len(counts)} objects "
        f"({sum(counts.values())} C-STOREs; each object exactly once: "
        f"{all(n == 1 for n in counts.values())})"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
