"""A job that always fails permanently is dead-lettered with its reason after the configured
attempts, and an operator sees it in `lesionwatch jobs`: real worker, real executor process."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from work_harness import BACKENDS, seed_flair_jobs, site, wait_for

from lesionwatch.service.cli import main
from lesionwatch.service.db.models import Instance, Job, JobState
from lesionwatch.service.messages import decode_message
from lesionwatch.service.server import Roles, ServiceProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_poison_job_is_dead_lettered_after_its_attempts(
    backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with site(backend, tmp_path, **{"worker.max_attempts": 2}) as where:
        process = ServiceProcess(where.config, Roles(work=True))
        try:
            [job_id] = seed_flair_jobs(process.sessions, 1)
            # The FLAIR "images" in the archive are not DICOM: the series cannot be read.
            with process.sessions() as session:
                relative = session.scalars(select(Instance.path)).one()
            archived = where.config.storage.data_dir / "archive" / relative
            archived.parent.mkdir(parents=True)
            archived.write_bytes(b"not a DICOM file" * 64)
            process.start()
            process.runtime.relay.publish_pending()

            def failed() -> bool:
                with process.sessions() as session:
                    return session.get_one(Job, job_id).state is JobState.FAILED

            wait_for(failed, 180, "the job to be dead-lettered")
            with process.sessions() as session:
                job = session.get_one(Job, job_id)
                assert job.attempt == 2 and job.failure_kind == "permanent"
                assert job.reason.startswith("dead-lettered after 2 attempt(s)")
                assert "no DICOM image" in job.reason
                # Nothing was measured: no report job.
                assert session.scalars(select(Job).where(Job.id != job_id)).all() == []
            wait_for(lambda: process.runtime.broker.depth("jobs").dead == 1, 30, "a dead letter")
            [dead] = process.runtime.broker.dead_letters("jobs")
            assert decode_message(dead.body).job_id == job_id  # type: ignore[union-attr]
            assert "dead-lettered after 2 attempt(s)" in dead.reason
        finally:
            process.request_stop()
            process.stop()

        monkeypatch.setenv("LESIONWATCH_BROKER__QUEUE_PREFIX", where.queue_prefix)
        assert main(["jobs", "--state", "failed", *where.cli_args()]) == 0
        listing = capsys.readouterr().out
        assert f"\n{job_id} " in listing and "dead-lettered after 2 attempt(s)" in listing
        assert main(["jobs", "show", str(job_id), *where.cli_args()]) == 0
        shown = capsys.readouterr().out
        assert shown.count("job.running") == 2 and "job.retrying" in shown
        assert "job.failed" in shown
        assert main(["status", *where.cli_args()]) == 0
        status = capsys.readouterr().out
        assert "failed 1" in status
        [jobs_row] = [line.split() for line in status.splitlines() if line.startswith("jobs ")]
        assert jobs_row[-1] == "1"  # the dead-letter column of the jobs queue
