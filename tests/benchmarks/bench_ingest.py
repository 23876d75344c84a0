"""Ingest throughput: LesionWatch's listener against dcmtk storescp and Orthanc, in one run.

The same ~500 real MR instances (the GE and Siemens T1 series, repeated with new UIDs) are sent
by the same client (dcmtk ``storescu``, one association) to each receiver:

- LesionWatch: StoreSCP + archive + SQLite database, fsync on (the real durable path);
- dcmtk ``storescp`` writing files to disk (no database, no fsync);
- Orthanc (Debian package, SQLite index, default storage settings).

Run: ``.venv/bin/python tests/benchmarks/bench_ingest.py [--instances 500] [--rounds 2]``.
Prints instances/s per receiver (best of the rounds) and LesionWatch's ratios to the others.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "integration"))

from orthanc_server import running_orthanc  # noqa: E402
from scp_harness import gunzip_series, running_listener  # noqa: E402

from lesionwatch.config.schema import AllowedCaller  # noqa: E402

__all__ = ["main"]

DICOM_T1 = TESTS / "data" / "dicom_t1"
Receiver = Callable[[Path, int], AbstractContextManager[object]]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_instances(workdir: Path, count: int) -> Path:
    """``count`` instances: the real series cycled, every copy a new series with new UIDs."""
    siemens = gunzip_series(DICOM_T1 / "siemens_xa30_t1_tfl3d", workdir / "siemens")
    sources = sorted(siemens.iterdir())
    sources += sorted((DICOM_T1 / "ge_signa_t1_mprage").iterdir())
    target = workdir / "send"
    target.mkdir()
    series_uids: dict[tuple[int, str], str] = {}
    for index in range(count):
        copy, source = divmod(index, len(sources))
        dataset = pydicom.dcmread(sources[source])
        key = (copy, str(dataset.SeriesInstanceUID))
        if copy > 0:
            dataset.SeriesInstanceUID = series_uids.setdefault(key, generate_uid())
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.save_as(target / f"{index:05d}.dcm", enforce_file_format=True)
    return target


def send(port: int, called_ae: str, directory: Path) -> float:
    """Seconds for storescu to send every file in one association."""
    started = time.perf_counter()
    result = subprocess.run(
        [
            "storescu",
            "-aet",
            "BENCH",
            "-aec",
            called_ae,
            "+sd",
            "127.0.0.1",
            str(port),
            str(directory),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr[-2000:]}")
    return elapsed


@contextmanager
def lesionwatch(
    workdir: Path, port: int, *, fsync: bool = True, sqlite_synchronous: str | None = None
) -> Iterator[object]:
    with running_listener(
        workdir,
        f"sqlite:///{workdir / 'lesionwatch.db'}",
        port,
        storage={"fsync": fsync, "min_free_disk_mb": 512},
        sqlite_synchronous=sqlite_synchronous,
        allowed_callers=(AllowedCaller(ae_title="*", host="127.0.0.1"),),
    ) as listener:
        yield listener


def lesionwatch_like_orthanc(workdir: Path, port: int) -> AbstractContextManager[object]:
    """For information, at Orthanc's durability: no file fsync, SQLite synchronous=NORMAL.

    Orthanc 1.10 does not fsync storage files and runs its SQLite index in WAL mode with
    synchronous=NORMAL: safe against a process crash, not against power loss.
    """
    return lesionwatch(workdir, port, fsync=False, sqlite_synchronous="NORMAL")


@contextmanager
def storescp(workdir: Path, port: int) -> Iterator[object]:
    (workdir / "out").mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(workdir / "out"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def orthanc(workdir: Path, port: int) -> Iterator[object]:
    with running_orthanc(workdir, ae_title="ORTHANC", extra_config={"DicomPort": port}) as server:
        yield server


def _wait_for_port(port: int, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


RECEIVERS: dict[str, tuple[str, Receiver]] = {
    "lesionwatch": ("LESIONWATCH", lesionwatch),
    "lw-as-orthanc": ("LESIONWATCH", lesionwatch_like_orthanc),
    "storescp": ("STORESCP", storescp),
    "orthanc": ("ORTHANC", orthanc),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many sends each")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument(
        "--nagle", action="store_true", help="leave dcmtk's Nagle default (TCP_NODELAY unset)"
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian packages dcmtk, orthanc)")
    logging.basicConfig(level=logging.WARNING)
    if not args.nagle:
        # This dcmtk build leaves Nagle's algorithm on unless TCP_NODELAY=1; with it on, every
        # dcmtk peer (storescu, storescp, Orthanc) stalls ~40 ms per instance on delayed ACKs.
        os.environ["TCP_NODELAY"] = "1"

    with tempfile.TemporaryDirectory(dir=args.workdir) as temp:
        workdir = Path(temp)
        files = prepare_instances(workdir, args.instances)
        megabytes = sum(p.stat().st_size for p in files.iterdir()) / 1e6
        nagle = "Nagle on" if args.nagle else "TCP_NODELAY=1"
        print(f"{args.instances} instances, {megabytes:.0f} MB, storescu, one association, {nagle}")
        best_s = dict.fromkeys(RECEIVERS, float("inf"))
        # Rounds interleave the receivers, so load from elsewhere on the machine hits all alike.
        for round_index in range(args.rounds):
            for name, (called_ae, receiver) in RECEIVERS.items():
                port = _free_port()
                with receiver(workdir / f"{name}-{round_index}", port):
                    seconds = send(port, called_ae, files)
                print(f"  round {round_index + 1} {name:12s} {seconds:6.2f} s")
                best_s[name] = min(best_s[name], seconds)
        rates = {name: args.instances / seconds for name, seconds in best_s.items()}
        for name, rate in rates.items():
            print(f"{name:12s} {rate:8.1f} instances/s  ({best_s[name]:.2f} s, best round)")
        lw = rates["lesionwatch"]
        print(f"lesionwatch / orthanc  = {lw / rates['orthanc']:.2f} (target >= 1)")
        print(f"lesionwatch / storescp = {lw / rates['storescp']:.2f} (target >= 0.5)")
        same = rates["lw-as-orthanc"]
        print(f"at Orthanc's durability: lw-as-orthanc / orthanc = {same / rates['orthanc']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
