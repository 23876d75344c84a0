"""Listener memory (issue 15): peak resident memory of `lesionwatch listen` per scenario.

Each scenario runs against a fresh listener process (VmHWM only grows) started from the
``--lesionwatch`` executable with a plain config, so an older checkout's executable measures
"before" with the same sender:

- idle: started, nothing sent;
- plain instance (default 100 MiB, Explicit VR LE, valid) sent in 16 KiB P-DATA PDUs (as storescu);
- the same in the largest PDUs the listener advertises (``listener.maximum_pdu_size``; 0 was
  "unlimited": one PDU, and pynetdicom reads a whole PDU into memory);
- the same as one PDU whatever the listener advertised (a misbehaving sender: the listener
  now aborts such an association before reading the PDU);
- the same sent by dcmtk ``storescu`` (if installed);
- a deflate bomb (default 1.5 GiB inflated, ~1.6 MB sent).

Run: ``.venv/bin/python tests/benchmarks/bench_listener_memory.py [--lesionwatch PATH]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from hostile_corpus import CorpusBuilder, status_name  # noqa: E402
from hostile_sender import RawSender, raw_sending, write_part10  # noqa: E402
from listener_process import DEFAULT_LESIONWATCH, ListenerProcess, listener_process  # noqa: E402

__all__ = ["main"]

_IDLE_SETTLE_S = 2.0


def _pynetdicom_large(
    instance_mb: int, send_pdu_bytes: int | None, *, ignore_maximum: bool = False
) -> Callable[..., str]:
    def scenario(listener: ListenerProcess, workdir: Path) -> str:
        case, chunks = CorpusBuilder(seed=17).large_case(instance_mb << 20)
        sender = RawSender(listener.port, workdir, send_pdu_bytes=send_pdu_bytes)
        with sender.associate([case]) as assoc:
            if ignore_maximum:
                assoc.override_max_pdu((instance_mb + 1) << 20)
            result = assoc.store(case, chunks)
        return status_name(result.status)

    return scenario


def _storescu_large(instance_mb: int) -> Callable[..., str]:
    def scenario(listener: ListenerProcess, workdir: Path) -> str:
        case, chunks = CorpusBuilder(seed=17).large_case(instance_mb << 20)
        path = write_part10(workdir / "large.dcm", case, chunks)
        run = subprocess.run(
            ["storescu", "-aec", "LESIONWATCH", "127.0.0.1", str(listener.port), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        path.unlink()
        return "SUCCESS" if run.returncode == 0 else f"storescu exit {run.returncode}"

    return scenario


def _bomb(inflated_gib: float) -> Callable[..., str]:
    def scenario(listener: ListenerProcess, workdir: Path) -> str:
        pixel_bytes = int(inflated_gib * 2**30) // (2 << 20) * (2 << 20)
        builder = CorpusBuilder(seed=17)
        case, chunks = builder.deflate_bomb_case(pixel_bytes)
        with RawSender(listener.port, workdir).associate([case]) as assoc:
            result = assoc.store(case, chunks)
        return status_name(result.status)

    return scenario


def _idle(listener: ListenerProcess, workdir: Path) -> str:
    return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesionwatch", type=Path, default=DEFAULT_LESIONWATCH)
    parser.add_argument("--instance-mb", type=int, default=100, help="plain instance size (MiB)")
    parser.add_argument("--bomb-gib", type=float, default=1.5, help="deflate bomb, inflated")
    args = parser.parse_args(argv)
    scenarios: list[tuple[str, Callable[..., str]]] = [
        ("idle", _idle),
        (f"plain {args.instance_mb} MiB, 16 KiB PDUs", _pynetdicom_large(args.instance_mb, 16384)),
        (
            f"plain {args.instance_mb} MiB, largest PDUs allowed",
            _pynetdicom_large(args.instance_mb, None),
        ),
        (
            f"plain {args.instance_mb} MiB, one PDU anyway",
            _pynetdicom_large(args.instance_mb, None, ignore_maximum=True),
        ),
    ]
    if shutil.which("storescu"):
        scenarios.append(
            (f"plain {args.instance_mb} MiB, storescu", _storescu_large(args.instance_mb))
        )
    scenarios.append((f"deflate bomb {args.bomb_gib:g} GiB", _bomb(args.bomb_gib)))

    print(f"listener: {args.lesionwatch}")
    print(f"{'scenario':38} {'answer':22} {'peak RSS MB':>11} {'idle MB':>8} {'s':>6}")
    for name, scenario in scenarios:
        with (
            tempfile.TemporaryDirectory(prefix="lw-mem-") as workdir,
            listener_process(Path(workdir), executable=args.lesionwatch) as listener,
            raw_sending(),
        ):
            time.sleep(_IDLE_SETTLE_S)
            idle_mb = listener.peak_rss_mb()
            started = time.monotonic()
            answer = scenario(listener, Path(workdir))
            elapsed_s = time.monotonic() - started
            peak_mb = listener.peak_rss_mb()
            if not listener.alive():
                answer = "listener died"
        print(f"{name:38} {answer:22} {peak_mb:11.0f} {idle_mb:8.0f} {elapsed_s:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
