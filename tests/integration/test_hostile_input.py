"""Issue 15: a real listener under a seeded corpus of hostile C-STORE requests.

300 cases (truncations, inconsistent pixel data, VR encodings that contradict the presentation
context, undefined lengths, invalid UIDs, small deflate bombs, oversized instances, broken
re-sends of accepted instances, ...) in batches of 25, each batch on its own association.
Every request must get the answer its case allows (never a dropped association, never 0x0110),
and after every batch: C-ECHO succeeds, a fresh valid instance is stored, every new archive
file reads with dcmdump, no file accepted earlier changed or disappeared (unless its instance
was validly re-sent) and no temporary file is left behind.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from conftest import free_port, require_executable
from hostile_corpus import CorpusBuilder, batches, status_name
from hostile_sender import ArchiveWatch, RawSender, SendResult, raw_sending
from scp_harness import running_listener

pytestmark = pytest.mark.integration

CASES = 300
BATCH = 25
MAX_INSTANCE_MB = 4  # listener.max_instance_mb: the corpus' bombs inflate to 6 MiB


def _wrong(result: SendResult) -> str:
    case = result.case
    return (
        f"{case.name}: {status_name(result.status)} {result.comment!r}, expected {case.expected()}"
    )


def _summary(results: list[SendResult]) -> str:
    by_kind: dict[str, Counter[str]] = {}
    for result in results:
        by_kind.setdefault(result.case.kind, Counter())[status_name(result.status)] += 1
    return "\n".join(
        f"  {kind:34} {', '.join(f'{name} {n}' for name, n in sorted(counts.items()))}"
        for kind, counts in sorted(by_kind.items())
    )


def test_corpus_is_deterministic() -> None:
    def digest() -> str:
        sha = hashlib.sha256()
        for case in CorpusBuilder(seed=15, max_instance_mb=MAX_INSTANCE_MB).cases(60):
            sha.update(f"{case.name} {case.transfer_syntax} {case.outcome}".encode())
            sha.update(case.payload)
        return sha.hexdigest()

    assert digest() == digest()


def test_hostile_corpus_is_refused_and_the_listener_keeps_serving(tmp_path: Path) -> None:
    dcmdump = require_executable("dcmdump")
    builder = CorpusBuilder(seed=15, max_instance_mb=MAX_INSTANCE_MB)
    results: list[SendResult] = []
    problems: list[str] = []
    with (
        running_listener(
            tmp_path / "lw",
            f"sqlite:///{tmp_path / 'lw.db'}",
            free_port(),
            max_instance_mb=MAX_INSTANCE_MB,
        ) as lw,
        raw_sending(),
    ):
        sender = RawSender(lw.port, tmp_path / "send")
        watch = ArchiveWatch(lw.archive_root, dcmdump)
        for number, batch in enumerate(batches(builder.cases(CASES), BATCH)):
            probe = builder.valid_case("probe")
            with sender.associate([*batch, probe]) as assoc:
                batch_results = [assoc.store(case) for case in batch]
                echo = assoc.echo()
                probe_result = assoc.store(probe)
                drops = assoc.drops
            results += batch_results
            problems += [_wrong(result) for result in batch_results if not result.ok]
            if drops:
                problems.append(f"batch {number}: the listener dropped the association {drops}x")
            if echo != 0:
                problems.append(f"batch {number}: C-ECHO answered {status_name(echo)}")
            if not probe_result.ok:
                problems.append(f"batch {number}: valid instance {_wrong(probe_result)}")
            problems += [
                f"batch {number}: {problem}"
                for problem in watch.check_batch([*batch_results, probe_result])
            ]

    assert len(results) == CASES
    print(f"\n{len(results)} hostile cases, statuses by kind:\n{_summary(results)}")
    assert not problems, (
        f"{len(problems)} problems (first 60):\n"
        + "\n".join(problems[:60])
        + f"\n\nstatuses by kind:\n{_summary(results)}"
    )


def test_a_pdu_over_the_advertised_maximum_aborts_only_its_association(tmp_path: Path) -> None:
    """pynetdicom would hold any PDU whole in memory: one over the advertised maximum ends
    its association before its body is read; the listener serves the next one."""
    builder = CorpusBuilder(seed=15, max_instance_mb=MAX_INSTANCE_MB)
    case = builder.valid_case("big-pdu")
    with (
        running_listener(
            tmp_path / "lw", f"sqlite:///{tmp_path / 'lw.db'}", free_port(), maximum_pdu_size=16384
        ) as lw,
        raw_sending(),
    ):
        sender = RawSender(lw.port, tmp_path / "send", send_pdu_bytes=None)
        with sender.associate([case]) as assoc:
            advertised = assoc.max_pdu_from_listener()
            assert advertised == 16384
            assoc.override_max_pdu(4 * 2**20)  # what a misbehaving sender does
            oversized = assoc.store(case)
        assert status_name(oversized.status) == "DROPPED"
        assert not lw.archived_files()
        with sender.associate([case]) as assoc:  # the listener still serves
            assert assoc.store(case).status == 0
