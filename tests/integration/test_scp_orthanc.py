"""A real PACS (Orthanc) forwards a study to LesionWatch, which archives and records all of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port, require_service
from orthanc_server import orthanc_executable, running_orthanc
from scp_harness import gunzip_series, running_listener, sop_instance_uids
from sqlalchemy import select

from lesionwatch.config.schema import AllowedCaller
from lesionwatch.service.db.models import Instance

pytestmark = pytest.mark.integration


def test_orthanc_forwards_a_study_and_every_instance_arrives(
    tmp_path: Path, database_url: str, siemens_t1_dir: Path
) -> None:
    require_service(orthanc_executable() is not None, "Orthanc is not installed (Debian package)")
    series = gunzip_series(siemens_t1_dir, tmp_path / "siemens")
    sent = sop_instance_uids(series)
    port = free_port()
    # Only Orthanc's AE title may send, from this machine.
    orthanc_caller = AllowedCaller(ae_title="ORTHANC", host="127.0.0.1")
    with (
        running_listener(
            tmp_path / "lw", database_url, port, allowed_callers=(orthanc_caller,)
        ) as listener,
        running_orthanc(
            tmp_path / "orthanc", modalities={"lesionwatch": ("LESIONWATCH", "127.0.0.1", port)}
        ) as orthanc,
    ):
        for path in sorted(series.iterdir()):
            orthanc.upload(path)
        assert orthanc.post_json("/modalities/lesionwatch/echo", {}) == {}
        studies = orthanc.get("/studies")
        assert len(studies) == 1
        orthanc.store_to_modality("lesionwatch", studies)

        with listener.sessions() as session:
            rows = session.scalars(select(Instance)).all()
        assert {row.sop_instance_uid for row in rows} == sent
        assert {row.calling_ae_title for row in rows} == {"ORTHANC"}
        for row in rows:
            assert (listener.archive_root / row.path).is_file()
