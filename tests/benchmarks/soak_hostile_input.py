"""Soak: thousands of hostile C-STORE requests against `lesionwatch listen` (issue 15).

The corpus of ``tests/integration/test_hostile_input.py`` (``tests/hostile_corpus.py``), longer:
by default 2,000 cases in batches of 25, one association per batch, against the listener run as
its own process with ``listener.max_instance_mb`` 4 (so the bombs and oversized instances are
cheap to send). After every batch: C-ECHO, a fresh valid instance stored, nothing accepted
earlier lost or replaced, no temporary file left. At the end every archive file is read with
dcmdump. Prints answers by kind and by status, accepted/refused counts and the listener's peak
resident memory (VmHWM); exits 1 if anything was wrong.

Run: ``.venv/bin/python tests/benchmarks/soak_hostile_input.py [--cases 2000] [--seed 15]``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from hostile_corpus import CorpusBuilder, Outcome, batches, status_name  # noqa: E402
from hostile_sender import (  # noqa: E402
    ArchiveWatch,
    RawSender,
    SendResult,
    raw_sending,
    unreadable,
)
from listener_process import DEFAULT_LESIONWATCH, listener_process  # noqa: E402

__all__ = ["main"]


def _report(results: list[SendResult], problems: list[str], peak_mb: float, idle_mb: float) -> None:
    by_kind: dict[str, Counter[str]] = {}
    for result in results:
        by_kind.setdefault(result.case.kind, Counter())[status_name(result.status)] += 1
    print(f"\n{'kind':36} answers")
    for kind, counts in sorted(by_kind.items()):
        print(f"{kind:36} {', '.join(f'{name} {n}' for name, n in sorted(counts.items()))}")
    statuses = Counter(status_name(result.status) for result in results)
    outcomes = Counter(result.case.outcome.value for result in results)
    accepted = statuses.get("SUCCESS", 0)
    print(f"\n{len(results)} cases ({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))})")
    print(f"accepted {accepted}, refused {len(results) - accepted}")
    for name, count in statuses.most_common():
        print(f"  {name:36} {count}")
    print(f"listener peak RSS (VmHWM) {peak_mb:.0f} MB (idle {idle_mb:.0f} MB)")
    print(f"{len(problems)} problems" + (":" if problems else ""))
    for problem in problems[:60]:
        print(f"  {problem}")


def _temporary() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="lw-soak-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--max-instance-mb", type=int, default=4)
    parser.add_argument("--lesionwatch", type=Path, default=DEFAULT_LESIONWATCH)
    parser.add_argument(
        "--workdir", type=Path, help="keep the listener's data and log here (default: temporary)"
    )
    args = parser.parse_args(argv)
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        parser.error("dcmdump (dcmtk) is not installed")

    builder = CorpusBuilder(seed=args.seed, max_instance_mb=args.max_instance_mb)
    results: list[SendResult] = []
    problems: list[str] = []
    started = time.monotonic()
    with (
        contextlib.nullcontext(args.workdir) if args.workdir else _temporary() as workdir,
        listener_process(
            Path(workdir),
            executable=args.lesionwatch,
            listener={"max_instance_mb": args.max_instance_mb},
        ) as listener,
        raw_sending(),
    ):
        idle_mb = listener.peak_rss_mb()
        sender = RawSender(listener.port, Path(workdir) / "send")
        watch = ArchiveWatch(listener.archive_root, dcmdump=None)  # dcmdump once, at the end
        for number, batch in enumerate(batches(builder.cases(args.cases), args.batch)):
            probe = builder.valid_case("probe")
            with sender.associate([*batch, probe]) as assoc:
                batch_results = [assoc.store(case) for case in batch]
                echo = assoc.echo()
                probe_result = assoc.store(probe)
                drops = assoc.drops
            results += batch_results
            problems += [
                f"{r.case.name}: {status_name(r.status)} {r.comment!r}, expected "
                f"{r.case.expected()}"
                for r in batch_results
                if not r.ok
            ]
            if drops or echo != 0 or not probe_result.ok:
                problems.append(
                    f"batch {number}: {drops} dropped associations, C-ECHO "
                    f"{status_name(echo)}, valid instance {status_name(probe_result.status)}"
                )
            checked = watch.check_batch([*batch_results, probe_result])
            problems += [f"batch {number}: {problem}" for problem in checked]
            if not listener.alive():
                problems.append(f"batch {number}: the listener died:\n{listener.log_tail()}")
                break
            if number % 10 == 9:
                print(f"{len(results)} cases sent, {time.monotonic() - started:.0f} s", flush=True)
        files = [
            path for path in listener.archive_root.rglob("*.dcm") if ".incoming" not in path.parts
        ]
        for path, reason in unreadable(dcmdump, files).items():
            problems.append(
                f"dcmdump cannot read {path.relative_to(listener.archive_root)}: {reason}"
            )
        peak_mb = listener.peak_rss_mb()
    expected_accepts = sum(r.case.outcome is Outcome.ACCEPT for r in results)
    print(f"\n{time.monotonic() - started:.0f} s; {len(files)} archive files read by dcmdump")
    print(f"{expected_accepts} cases had to be accepted")
    _report(results, problems, peak_mb, idle_mb)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
