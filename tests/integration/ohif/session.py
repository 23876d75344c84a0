"""One viewer session, run where only loopback exists (a network namespace of its own).

Usage: python session.py JOB.json

Starts Orthanc with its DICOMweb plugin (Orthanc 1.10 listens on every interface, hence the
namespace), uploads JOB["files"], then runs probe.cjs (OHIF in headless Chromium) with the
job completed by Orthanc's URL. The probe writes JOB["result_path"]; this exits with its code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for orthanc_server

from orthanc_server import running_orthanc  # noqa: E402


def main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    work = Path(job["out_dir"])
    with running_orthanc(work / "orthanc", dicomweb=True) as orthanc:
        for name in job["files"]:
            orthanc.upload(Path(name))
        job["orthanc_url"] = orthanc.url
        probe_job = work / "probe-job.json"
        probe_job.write_text(json.dumps(job))
        run = subprocess.run(
            [job["node"], str(HERE / "probe.cjs"), str(probe_job)],
            timeout=float(job.get("probe_timeout_s", 240)),
        )
        return run.returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
