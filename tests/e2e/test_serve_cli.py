"""End to end through the installed command: `lesionwatch serve` receives a real study sent by
dcmtk's storescu, archives and classifies it, assembles it into jobs, and shuts down cleanly."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_DATA, free_port, require_executable

from lesionwatch.dicom_io.series_identity import StudyIdentity, derive_uid
from lesionwatch.dicom_io.study_builder import build_study_from_nifti, open_ms_longitudinal_specs

pytestmark = pytest.mark.integration

LESIONWATCH = [sys.executable, "-m", "lesionwatch.service.cli"]


def _run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(LESIONWATCH + args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_receives_classifies_and_assembles(tmp_path: Path) -> None:
    storescu = require_executable("storescu")
    identity = StudyIdentity(
        patient_id="OMS-LONG-01",
        patient_name="OpenMS^Patient01",
        birth_date=dt.date(1980, 5, 17),
        sex="F",
        study_instance_uid=derive_uid("e2e", "patient01", "study2"),
        study_date=dt.date(2025, 3, 20),
        study_time=dt.time(9, 30),
    )
    specs = open_ms_longitudinal_specs(TEST_DATA / "open_ms_data" / "longitudinal" / "patient01", 2)
    built = build_study_from_nifti(specs, identity, tmp_path / "outgoing")
    sent = sum(len(s.files) for s in built)

    port = free_port()
    data_dir = tmp_path / "lw"
    env = {
        **os.environ,
        "LESIONWATCH_STORAGE__DATA_DIR": str(data_dir),
        "LESIONWATCH_STORAGE__MIN_FREE_DISK_MB": "16",
        "LESIONWATCH_ASSEMBLY__QUIET_PERIOD_S": "2",
        "LESIONWATCH_ASSEMBLY__POLL_INTERVAL_S": "0.5",
    }
    server = subprocess.Popen(
        LESIONWATCH + ["serve", "--port", str(port), "--ae-title", "LW_E2E"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(100):  # wait until the listener accepts connections
            echo = subprocess.run(
                ["echoscu", "-aec", "LW_E2E", "127.0.0.1", str(port)], capture_output=True
            )
            if echo.returncode == 0:
                break
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            time.sleep(0.2)
        store = subprocess.run(
            [
                storescu,
                "-aet",
                "MODALITY1",
                "-aec",
                "LW_E2E",
                "+sd",
                "+r",
                "127.0.0.1",
                str(port),
                str(tmp_path / "outgoing"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert store.returncode == 0, store.stderr

        deadline = time.monotonic() + 60
        jobs = ""
        while time.monotonic() < deadline:
            jobs = _run(["jobs"], env)
            if "flair" in jobs:
                break
            time.sleep(0.5)
        assert "flair" in jobs and "pending" in jobs
        studies = _run(["studies"], env)
        assert identity.study_instance_uid in studies
        row = next(line for line in studies.splitlines() if identity.study_instance_uid in line)
        assert row.split()[3:5] == ["3", str(sent)]  # series, instances
        assert "ready" in studies
        assert len(list((data_dir / "archive").rglob("*.dcm"))) == sent
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "LesionWatch listening as LW_E2E" in output
