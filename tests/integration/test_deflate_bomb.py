"""Issue 15: a deflate bomb (1.5 GiB inflated, ~1.6 MB sent) against `lesionwatch listen`.

The listener runs as its own process so that its peak resident memory (VmHWM) can be read.
It must refuse the bomb with 0xA700 naming ``listener.max_instance_mb`` (default 1024 MB),
stay under :data:`PEAK_RSS_BOUND_MB` the whole time, and go on serving: C-ECHO, then a valid
instance stored, on the same association.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hostile_corpus import OUT_OF_RESOURCES, CorpusBuilder, status_name
from hostile_sender import RawSender, raw_sending
from listener_process import DEFAULT_LESIONWATCH, listener_process

pytestmark = pytest.mark.integration

BOMB_PIXEL_BYTES = 3 << 29  # 1.5 GiB of zeros once inflated
# An idle listener holds ~115 MB; receiving streams to disk (one P-DATA fragment at a time)
# and inflation stops at the size limit, so nothing should come near this bound. Before the
# change, the same bomb took the listener past 3 GB.
PEAK_RSS_BOUND_MB = 300


def test_deflate_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    assert DEFAULT_LESIONWATCH.exists(), f"{DEFAULT_LESIONWATCH} missing: pip install -e ."
    builder = CorpusBuilder(seed=16)
    bomb, chunks = builder.deflate_bomb_case(BOMB_PIXEL_BYTES)
    valid = builder.valid_case()
    with listener_process(tmp_path / "listener") as listener, raw_sending():
        idle_mb = listener.peak_rss_mb()
        with RawSender(listener.port, tmp_path / "send").associate([bomb, valid]) as assoc:
            started = time.monotonic()
            refused = assoc.store(bomb, chunks)
            elapsed_s = time.monotonic() - started
            echo = assoc.echo()
            stored = assoc.store(valid)
        peak_mb = listener.peak_rss_mb()
        leftovers = sorted((listener.archive_root / ".incoming").glob("*"))
        archived = sorted(p.name for p in listener.archive_root.rglob("*.dcm"))
    print(
        f"\ndeflate bomb ({BOMB_PIXEL_BYTES / 2**30:.1f} GiB inflated): "
        f"{status_name(refused.status)} {refused.comment!r} in {elapsed_s:.1f} s; listener "
        f"peak RSS {peak_mb:.0f} MB (idle {idle_mb:.0f} MB, bound {PEAK_RSS_BOUND_MB} MB)"
    )
    assert refused.status == OUT_OF_RESOURCES, (
        f"bomb answered {status_name(refused.status)} {refused.comment!r}"
    )
    assert "listener.max_instance_mb" in refused.comment, refused.comment
    assert peak_mb < PEAK_RSS_BOUND_MB, f"listener peak RSS {peak_mb:.0f} MB"
    assert (echo, stored.status) == (0, 0), (status_name(echo), status_name(stored.status))
    assert archived == [f"{valid.sop_instance_uid}.dcm"], archived  # nothing of the bomb
    assert not leftovers, f"temporary files left: {leftovers}"
