"""Ingest throughput: LesionWatch's listener against dcmtk storescp and Orthanc, in one run.

The same ~500 real MR instances (the GE and Siemens T1 series, repeated with new UIDs) are sent
by the same client (dcmtk ``storescu``, one association, TCP_NODELAY) to each receiver, in
interleaved rounds so that load from elsewhere on the machine hits all receivers alike:

- LesionWatch: StoreSCP + archive + SQLite index (the real durable path: file fsync, rename,
  directory fsync, then a WAL commit; see ``service/reconcile.py``);
- dcmtk ``storescp`` writing files to disk (no index, no fsync);
- Orthanc 1.10 (Debian package, SQLite index, default storage settings: no file fsync).

For information it also runs LesionWatch without fsync ("lw-no-fsync", Orthanc's durability)
and every receiver that serves associations in parallel (LesionWatch, Orthanc) with the files
split over ``--parallel`` storescu processes at once, as a PACS often sends.

Run: ``.venv/bin/python tests/benchmarks/bench_ingest.py [--instances 500] [--rounds 3]``.
Prints best and median instances/s per receiver, the ratios and the targets.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "integration"))

from orthanc_server import running_orthanc  # noqa: E402
from scp_harness import gunzip_series, running_listener  # noqa: E402

from lesionwatch.config.schema import AllowedCaller  # noqa: E402
from lesionwatch.dicom_io.archive import Archive  # noqa: E402

__all__ = ["main"]

DICOM_T1 = TESTS / "data" / "dicom_t1"


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


def _storescu(port: int, called_ae: str, directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", called_ae, "+sd", "127.0.0.1", str(port)]
        + [str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def send(port: int, called_ae: str, directories: Sequence[Path]) -> float:
    """Seconds for one storescu per directory (in parallel, one association each) to send."""
    started = time.perf_counter()
    senders = [_storescu(port, called_ae, directory) for directory in directories]
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - started
    for sender, error in zip(senders, errors, strict=True):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu to {called_ae} failed: {error[-2000:]}")
    return elapsed


def split(files: Path, parts: int) -> list[Path]:
    """``parts`` directories sharing ``files`` round-robin (hard links, no copies)."""
    directories = [files.parent / f"{files.name}-{index + 1}of{parts}" for index in range(parts)]
    for directory in directories:
        directory.mkdir()
    for index, path in enumerate(sorted(files.iterdir())):
        os.link(path, directories[index % parts] / path.name)
    return directories


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


def lesionwatch_no_fsync(workdir: Path, port: int) -> AbstractContextManager[object]:
    """For information, at Orthanc's durability: no file fsync (``storage.fsync: false``)."""
    return lesionwatch(workdir, port, fsync=False)


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


_FLOOR = "fsync floor"


def fsync_floor(files: Path, workdir: Path) -> float:
    """Seconds to archive every file durably, in one thread, with nothing else around it."""
    placed = []
    for path in sorted(files.iterdir()):
        uids = pydicom.dcmread(path, stop_before_pixels=True)
        identity = (uids.StudyInstanceUID, uids.SeriesInstanceUID, uids.SOPInstanceUID)
        placed.append((tuple(map(str, identity)), path.read_bytes()))
    archive = Archive(workdir, fsync=True)
    started = time.perf_counter()
    for (study, series, instance), data in placed:
        archive.store(study, series, instance, (data,))
    return time.perf_counter() - started


@dataclass(frozen=True)
class Receiver:
    called_ae: str
    start: Callable[[Path, int], AbstractContextManager[object]]
    durability: str
    parallel: bool = False  # also sent to with several associations at once


RECEIVERS: dict[str, Receiver] = {
    "lesionwatch": Receiver(
        "LESIONWATCH",
        lesionwatch,
        "file fsync + rename + dir fsync, then WAL commit (NORMAL) before success; "
        "index rebuilt from the archive at start",
        parallel=True,
    ),
    "lw-no-fsync": Receiver(
        "LESIONWATCH", lesionwatch_no_fsync, "as lesionwatch without any fsync (information)"
    ),
    "storescp": Receiver("STORESCP", storescp, "file written, no fsync, no index"),
    "orthanc": Receiver(
        "ORTHANC", orthanc, "Orthanc 1.10: no file fsync, SQLite index", parallel=True
    ),
}


def _rate(instances: int, seconds: list[float]) -> tuple[float, float]:
    """(best, median) instances/s."""
    return instances / min(seconds), instances / statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="sends per receiver (interleaved)")
    parser.add_argument(
        "--parallel", type=int, default=3, help="associations at once in the parallel runs"
    )
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
        print(f"{args.instances} instances, {megabytes:.0f} MB, storescu, {nagle}")
        runs: list[tuple[str, Receiver, list[Path]]] = [
            (name, receiver, [files]) for name, receiver in RECEIVERS.items()
        ]
        if args.parallel > 1:
            parts = split(files, args.parallel)
            runs += [
                (f"{name} x{args.parallel}", receiver, parts)
                for name, receiver in RECEIVERS.items()
                if receiver.parallel
            ]
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        # Rounds interleave the receivers, so load from elsewhere on the machine hits all alike.
        for round_index in range(args.rounds):
            for name, receiver, directories in runs:
                port = _free_port()
                with receiver.start(workdir / f"{name.replace(' ', '')}-{round_index}", port):
                    elapsed = send(port, receiver.called_ae, directories)
                print(f"  round {round_index + 1} {name:16s} {elapsed:6.2f} s", flush=True)
                seconds[name].append(elapsed)
            elapsed = fsync_floor(files, workdir / f"floor-{round_index}")
            print(f"  round {round_index + 1} {_FLOOR:16s} {elapsed:6.2f} s", flush=True)
            seconds.setdefault(_FLOOR, []).append(elapsed)

        rates = {name: _rate(args.instances, values) for name, values in seconds.items()}
        print(f"\n{'receiver':16s} {'best/s':>8s} {'median/s':>9s}  durability")
        for name, receiver, _ in runs:
            best, median = rates[name]
            print(f"{name:16s} {best:8.1f} {median:9.1f}  {receiver.durability}")
        best, median = rates[_FLOOR]
        print(
            f"{_FLOOR:16s} {best:8.1f} {median:9.1f}  no network, no DICOM, no index: only the "
            "disk's file fsync + rename + dir fsync, the ceiling of any durable receiver with "
            "one association"
        )
        print("\none association, LesionWatch (durable) against the others, best | median:")
        for other, target in (("orthanc", 1.0), ("storescp", 0.5)):
            ratios = [
                lw / rate for lw, rate in zip(rates["lesionwatch"], rates[other], strict=True)
            ]
            verdict = "met" if ratios[0] >= target else "NOT met"
            print(
                f"  lesionwatch / {other:9s} = {ratios[0]:.2f} | {ratios[1]:.2f}"
                f"  (target >= {target}: {verdict} on best)"
            )
        same = rates["lw-no-fsync"][0] / rates["orthanc"][0]
        print(f"  at Orthanc's durability: lw-no-fsync / orthanc = {same:.2f} (best)")
        if args.parallel > 1:
            name = f"lesionwatch x{args.parallel}"
            ratio = rates[name][0] / rates["orthanc"][0]
            print(f"  {name} / orthanc (one association) = {ratio:.2f} (best)")
            other = f"orthanc x{args.parallel}"
            print(f"  {name} / {other} = {rates[name][0] / rates[other][0]:.2f} (best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
