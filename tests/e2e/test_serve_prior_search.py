"""End to end: `lesionwatch serve` finds the patient's prior by itself (issue 14).

1. Orthanc is the PACS and holds the prior (open_ms_data longitudinal patient01, baseline:
   FLAIR and T1). Only the follow-up's FLAIR is sent to LesionWatch. It queries Orthanc,
   fetches the prior's FLAIR by C-MOVE, and Orthanc receives a SEG with the new lesions and
   an SR that compares with that prior. The prior itself is not processed.
2. The PACS does not answer (a socket that accepts and then says nothing): the study is
   still processed once the search deadline passes, and its SR says that no prior could be
   retrieved from PACS.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from conftest import free_port, require_executable, require_service
from orthanc_server import OrthancServer, orthanc_executable, running_orthanc
from prior_studies import identity, write_study

from lesionwatch.config.schema import SeriesClass
from lesionwatch.dicom_io.sr_reader import read_report_summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LESIONWATCH = [sys.executable, "-m", "lesionwatch.service.cli"]
LW_AE = "LW_PRIOR"
CURRENT = identity("e2e-current", dt.date(2024, 6, 1), accession_number="E2E-CUR")
PRIOR = identity("e2e-prior", dt.date(2023, 3, 1), accession_number="E2E-PRIOR")
# Central 120 mm of each volume: one sliding-window position per pipeline on CPU.
CROP_MM = 120.0


def _config(tmp_path: Path, port: int, extra: dict[str, Any]) -> dict[str, str]:
    config = tmp_path / "lesionwatch.yaml"
    settings = {
        "listener": {"ae_title": LW_AE, "port": port},
        "storage": {"data_dir": str(tmp_path / "lw"), "min_free_disk_mb": 16},
        "assembly": {"quiet_period_s": 2, "poll_interval_s": 0.5},
        "inference": {"step_mm": 128},  # fewer windows: same model, less CPU
        "metrics": {"port": 0},
        "delivery": {"poll_interval_s": 1},
    }
    config.write_text(yaml.safe_dump(settings | extra))
    return {**os.environ, "LESIONWATCH_CONFIG": str(config)}


@contextlib.contextmanager
def _serving(env: dict[str, str]) -> Iterator[Served]:
    """`lesionwatch serve` until the block ends (SIGTERM); its output is in the failure."""
    log = Path(env["LESIONWATCH_CONFIG"]).with_name("serve.log")
    with log.open("w") as out:
        server = subprocess.Popen(
            LESIONWATCH + ["serve"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    served = Served(server, log)
    try:
        yield served
    except BaseException as exc:
        _stop(server)
        raise AssertionError(f"{exc}\n--- serve output:\n{log.read_text()[-6000:]}") from exc
    assert _stop(server) == 0, log.read_text()[-3000:]
    served.output = log.read_text()


@dataclass
class Served:
    process: subprocess.Popen[str]
    log: Path
    output: str = ""

    def poll(self) -> int | None:
        return self.process.poll()


def _wait(check: Callable[[], bool], timeout_s: float, what: str, server: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "lesionwatch serve exited"
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _send_current(storescu: str, port: int, tmp_path: Path, server: Any) -> None:
    _wait(
        lambda: (
            subprocess.run(
                ["echoscu", "-aec", LW_AE, "127.0.0.1", str(port)], capture_output=True
            ).returncode
            == 0
        ),
        120,
        "the listener",
        server,
    )
    write_study(CURRENT, 2, [SeriesClass.FLAIR], tmp_path / "outgoing", crop_mm=CROP_MM)
    store = subprocess.run(
        [storescu, "-aet", "MODALITY1", "-aec", LW_AE, "+sd", "+r", "127.0.0.1", str(port),
         str(tmp_path / "outgoing")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert store.returncode == 0, store.stderr


def _stop(server: subprocess.Popen[str]) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(timeout=120)


def _db(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "lw" / "lesionwatch.db") as db:
        return db.execute(sql).fetchall()


def _lesionwatch_objects(orthanc: OrthancServer) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for instance in orthanc.instances():
        data = orthanc.request("GET", f"/instances/{instance}/file")
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        if ds.get("Manufacturer") == "LesionWatch":
            found.setdefault(str(ds.Modality), []).append(ds)
    return found


def test_serve_fetches_the_prior_from_orthanc_and_reports_new_lesions(tmp_path: Path) -> None:
    storescu = require_executable("storescu")
    require_service(orthanc_executable() is not None, "Orthanc is not installed")
    port = free_port()
    prior_series = write_study(
        PRIOR, 1, [SeriesClass.FLAIR, SeriesClass.T1_PRE], tmp_path / "pacs", crop_mm=CROP_MM
    )
    with running_orthanc(
        tmp_path / "orthanc", modalities={"lesionwatch": (LW_AE, "127.0.0.1", port)}
    ) as orthanc:
        for series in prior_series:
            for path in series.files:
                orthanc.upload(path)
        pacs = {"ae_title": orthanc.ae_title, "host": orthanc.host, "port": orthanc.dicom_port}
        env = _config(
            tmp_path,
            port,
            {
                "destinations": [{"name": "ORTHANC", **pacs}],
                "prior_search": {"pacs": pacs, "deadline_s": 120},
            },
        )
        with _serving(env) as server:
            _send_current(storescu, port, tmp_path, server)

            def report_received() -> bool:
                return bool(_lesionwatch_objects(orthanc).get("SR"))

            _wait(report_received, 300, "the report at Orthanc", server)
            results = _lesionwatch_objects(orthanc)
        output = server.output

    [sr] = results["SR"]
    summary = read_report_summary(sr)
    assert sr.StudyInstanceUID == CURRENT.study_instance_uid
    assert {f.label for f in summary.findings} == {"MS lesion (FLAIR)", "New MS lesion"}
    assert any(
        s.startswith("Compared with prior study") and PRIOR.study_instance_uid in s
        for s in summary.statements
    ), summary.statements
    # The change summary: counts, activity, and each FLAIR lesion's status since the prior.
    [change] = [s for s in summary.statements if s.startswith("Change since prior")]
    counts = {f.label: f.lesion_count for f in summary.findings}
    assert f"Change since prior: {counts['New MS lesion']} new, " in change, change
    assert summary.radiological_activity is not None
    assert f"Radiological activity: {'yes' if summary.radiological_activity else 'no'}" in change
    statuses = summary.change_statuses.get("MS lesion (FLAIR)", {})
    assert sum(statuses.values()) <= counts["MS lesion (FLAIR)"]
    assert set(statuses) <= {"New", "Enlarged", "No change", "Decreased"}
    for word, meaning in (("enlarging", "Enlarged"), ("stable", "No change")):
        assert f"{statuses.get(meaning, 0)} {word}" in change, (statuses, change)
    labels = {str(ds.SegmentSequence[0].SegmentLabel): ds for ds in results["SEG"]}
    assert set(labels) == {"MS lesion (FLAIR)", "New MS lesion"}
    assert {str(ds.StudyInstanceUID) for group in results.values() for ds in group} == {
        CURRENT.study_instance_uid
    }  # nothing was made for the prior
    # The search: found at the PACS; the prior is here (its FLAIR only), marked, not processed.
    [(state, source)] = _db(tmp_path, "SELECT state, source FROM prior_search")
    assert (state, source) == ("found", "pacs")
    rows = _db(
        tmp_path,
        "SELECT s.state, COUNT(DISTINCT se.id), COUNT(j.id) FROM study s "
        "JOIN series se ON se.study_id = s.id LEFT JOIN job j ON j.study_id = s.id "
        f"WHERE s.study_instance_uid = '{PRIOR.study_instance_uid}' GROUP BY s.id",
    )
    assert rows == [("prior", 1, 0)]
    assert "prior search on: ORTHANC@127.0.0.1" in output
    assert "OMS-LONG-01" not in output and "OpenMS" not in output  # no patient ID/name in logs


def test_serve_without_an_answering_pacs_processes_the_study_by_the_deadline(
    tmp_path: Path,
) -> None:
    storescu = require_executable("storescu")
    port = free_port()
    # A PACS that accepts connections and never answers (hung, or a firewall that drops).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    deadline_s = 15
    env = _config(
        tmp_path,
        port,
        {
            "prior_search": {
                "pacs": {
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": silent.getsockname()[1],
                    "timeout_s": 4,
                },
                "deadline_s": deadline_s,
                "retry_initial_delay_s": 1,
            },
        },
    )
    with _serving(env) as server:
        _send_current(storescu, port, tmp_path, server)
        _wait(lambda: bool(_sr_files(tmp_path)), 300, "the report", server)
    silent.close()

    [sr_path] = _sr_files(tmp_path)
    summary = read_report_summary(pydicom.dcmread(sr_path))
    assert {f.label for f in summary.findings} == {"MS lesion (FLAIR)"}
    assert summary.radiological_activity is None  # nothing compared, nothing claimed
    assert not any(s.startswith("Change since prior") for s in summary.statements)
    [note] = [s for s in summary.statements if "New lesions" in s]
    assert note.startswith("No prior study available: New lesions since the prior study not ")
    assert "no prior could be retrieved from PACS (search still searching at its deadline" in note
    assert "did not answer the association request within 4 s" in note
    # Processed by the deadline: the new-lesion decision was made when it passed, not later.
    [(received, decided)] = _db(
        tmp_path,
        "SELECT s.first_received_at, j.created_at FROM study s JOIN job j ON j.study_id = s.id "
        "WHERE j.pipeline = 'new_lesions'",
    )
    waited_s = (dt.datetime.fromisoformat(decided) - dt.datetime.fromisoformat(received)).seconds
    assert deadline_s - 1 <= waited_s <= deadline_s + 5
    [(state, reason)] = _db(tmp_path, "SELECT state, reason FROM prior_search")
    assert state in ("searching", "failed"), reason


def _sr_files(tmp_path: Path) -> list[Path]:
    return [
        path
        for path in (tmp_path / "lw" / "results").rglob("*.dcm")
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR"
    ]
