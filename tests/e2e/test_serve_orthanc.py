"""End to end through the installed command, with Orthanc as the PACS.

dcmtk's storescu sends a real MS study (open_ms_data patient 07: FLAIR, T1, T1 post-gadolinium)
to `lesionwatch serve` on embedded defaults. With no person in the loop, Orthanc then holds
exactly the expected results, each stored once: one SEG per finding type (FLAIR lesions on the
FLAIR grid, enhancing lesions on the T1-post grid), the secondary captures, and one SR for the
study that says new lesions were not assessed (no prior). Re-processing the FLAIR job
(`lesionwatch jobs retry`) sends a new version that replaces the old one in Orthanc: still one
SR, now saying it is version 2. SIGTERM stops the service cleanly.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import TEST_DATA, free_port, require_executable, require_service
from orthanc_server import orthanc_executable, running_orthanc

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.sr_reader import read_report_summary
from lesionwatch.dicom_io.study_builder import SeriesSpec, build_study_from_nifti

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LESIONWATCH = [sys.executable, "-m", "lesionwatch.service.cli"]
PATIENT07 = TEST_DATA / "open_ms_data" / "cross_sectional" / "patient07"


def _cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(LESIONWATCH + args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _wait(check, timeout_s: float, what: str, server: subprocess.Popen[str]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "lesionwatch serve exited"
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _orthanc_results(orthanc) -> dict[str, list[pydicom.Dataset]]:  # type: ignore[no-untyped-def]
    """LesionWatch's objects in Orthanc by modality (SEG, SR, OT)."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for instance in orthanc.instances():
        data = orthanc.request("GET", f"/instances/{instance}/file")
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        if ds.get("Manufacturer") == "LesionWatch":
            found.setdefault(str(ds.Modality), []).append(ds)
    return found


def test_serve_sends_seg_and_sr_to_orthanc_once_and_reprocessing_replaces(
    tmp_path: Path,
) -> None:
    storescu = require_executable("storescu")
    require_service(orthanc_executable() is not None, "Orthanc is not installed")
    identity = StudyIdentity(
        patient_id="OMS-CROSS-07",
        patient_name="OpenMS^Patient07",
        birth_date=dt.date(1975, 1, 2),
        sex="M",
        study_instance_uid=derive_uid("e2e", "patient07"),
        study_date=dt.date(2025, 6, 3),
        study_time=dt.time(9, 30),
    )
    specs = [
        SeriesSpec(PATIENT07 / "FLAIR.nii.gz", SeriesClass.FLAIR),
        SeriesSpec(PATIENT07 / "T1.nii.gz", SeriesClass.T1_PRE),
        SeriesSpec(PATIENT07 / "T1POST.nii.gz", SeriesClass.T1_POST),
    ]
    built = build_study_from_nifti(specs, identity, tmp_path / "outgoing", vendor="ge")
    sent = sum(len(s.files) for s in built)

    # Orthanc keeps the newest copy of an instance re-sent with the same UID (the way
    # LesionWatch replaces an earlier version); without this it would keep the first.
    with running_orthanc(
        tmp_path / "orthanc", extra_config={"OverwriteInstances": True}
    ) as orthanc:
        port = free_port()
        data_dir = tmp_path / "lw"
        config = tmp_path / "lesionwatch.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listener": {"ae_title": "LW_E2E", "port": port},
                    "storage": {"data_dir": str(data_dir), "min_free_disk_mb": 16},
                    "assembly": {"quiet_period_s": 2, "poll_interval_s": 0.5},
                    "inference": {"step_mm": 128},  # fewer windows: same model, less CPU
                    "metrics": {"port": 0},
                    "destinations": [
                        {
                            "name": "ORTHANC",
                            "ae_title": orthanc.ae_title,
                            "host": orthanc.host,
                            "port": orthanc.dicom_port,
                        }
                    ],
                    "delivery": {"poll_interval_s": 1},
                }
            )
        )
        env = {**os.environ, "LESIONWATCH_CONFIG": str(config)}
        server = subprocess.Popen(
            LESIONWATCH + ["serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            _wait(
                lambda: (
                    subprocess.run(
                        ["echoscu", "-aec", "LW_E2E", "127.0.0.1", str(port)], capture_output=True
                    ).returncode
                    == 0
                ),
                120,
                "the listener",
                server,
            )
            store = subprocess.run(
                [storescu, "-aet", "MODALITY1", "-aec", "LW_E2E", "+sd", "+r", "127.0.0.1",
                 str(port), str(tmp_path / "outgoing")],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert store.returncode == 0, store.stderr

            def report_received() -> bool:
                return len(_orthanc_results(orthanc).get("SR", [])) == 1

            _wait(report_received, 600, "the report at Orthanc", server)
            _wait(lambda: _deliveries_done(env), 60, "every delivery", server)

            results = _orthanc_results(orthanc)
            [sr] = results["SR"]
            segs = {str(ds.SeriesInstanceUID): ds for ds in results["SEG"]}
            assert len(segs) == 2  # FLAIR lesions and enhancing lesions, one SEG each
            labels = sorted(str(ds.SegmentSequence[0].SegmentLabel) for ds in results["SEG"])
            assert labels == ["Enhancing MS lesion", "MS lesion (FLAIR)"]
            studies = {str(ds.StudyInstanceUID) for group in results.values() for ds in group}
            assert studies == {identity.study_instance_uid}
            summary = read_report_summary(sr)
            assert {f.label for f in summary.findings} == {
                "MS lesion (FLAIR)",
                "Enhancing MS lesion",
            }
            assert any("New lesions" in s and "no prior" in s for s in summary.statements)
            # The enhancing result says it is unvalidated and what the guard removed.
            assert any("not validated on real enhancing-lesion masks" in s
                       for s in summary.statements)  # fmt: skip
            # Each object was sent once: one C-STORE per instance in LesionWatch's audit trail.
            sent_objects = _sent_objects(data_dir)
            assert sent_objects and set(sent_objects.values()) == {1}
            assert set(sent_objects) == {
                str(ds.SOPInstanceUID) for group in results.values() for ds in group
            }

            studies_table = _cli(["studies"], env)
            row = next(
                line for line in studies_table.splitlines() if identity.study_instance_uid in line
            )
            assert row.split()[3:5] == ["3", str(sent)]  # series, instances
            jobs = _cli(["jobs"], env)
            flair_job = next(
                line.split()[0] for line in jobs.splitlines() if " flair " in f" {line} "
            )

            # Re-processing: the FLAIR job runs again and a second report version replaces
            # the first in Orthanc (same UIDs), instead of a second report appearing.
            assert "pending" in _cli(["jobs", "retry", flair_job], env)

            def second_version() -> bool:
                [ds] = _orthanc_results(orthanc)["SR"]
                return any("version 2" in s for s in read_report_summary(ds).statements)

            _wait(second_version, 600, "the second report version", server)
            after = _orthanc_results(orthanc)
            assert len(after["SR"]) == 1 and len(after["SEG"]) == 2
            assert after["SR"][0].SOPInstanceUID == sr.SOPInstanceUID
        finally:
            server.send_signal(signal.SIGTERM)
            output, _ = server.communicate(timeout=120)
        assert server.returncode == 0, output[-3000:]
        assert "LesionWatch listening as LW_E2E" in output


def _deliveries_done(env: dict[str, str]) -> bool:
    status = _cli(["status"], env)
    line = next(line for line in status.splitlines() if line.startswith("deliveries:"))
    return "pending" not in line


def _sent_objects(data_dir: Path) -> Counter[str]:
    import sqlite3

    with sqlite3.connect(data_dir / "lesionwatch.db") as db:
        rows = db.execute(
            "SELECT sop_instance_uid FROM audit_event WHERE action = 'object.sent'"
        ).fetchall()
    return Counter(uid for (uid,) in rows)
