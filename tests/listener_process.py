"""`lesionwatch listen` as a separate process, for tests and benchmarks that measure its memory.

Only the command line and a YAML config are used, so the same helper runs an older checkout's
executable (``bench_listener_memory.py --lesionwatch OTHER/.venv/bin/lesionwatch``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_LESIONWATCH", "ListenerProcess", "listener_process"]

DEFAULT_LESIONWATCH = Path(sys.executable).with_name("lesionwatch")
LISTENER_AE = "LESIONWATCH"
_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ListenerProcess:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path

    @property
    def archive_root(self) -> Path:
        return self.data_dir / "archive"

    def _status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise LookupError(f"{field} not in /proc/{self.process.pid}/status")

    def peak_rss_mb(self) -> float:
        """VmHWM: the most resident memory the listener has had since it started."""
        return self._status_kb("VmHWM") / 1024

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def listener_process(
    workdir: Path,
    *,
    executable: Path = DEFAULT_LESIONWATCH,
    listener: dict[str, Any] | None = None,
) -> Iterator[ListenerProcess]:
    """Start `lesionwatch listen` on a free port with SQLite in ``workdir/data``; stop it after.

    ``listener`` adds keys to the config's ``listener`` section (e.g. ``max_instance_mb``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    data_dir = workdir / "data"
    config: dict[str, Any] = {
        "listener": {"ae_title": LISTENER_AE, "host": "127.0.0.1", "port": port} | (listener or {}),
        "storage": {"data_dir": str(data_dir), "min_free_disk_mb": 16},
        "metrics": {"enabled": False},
    }
    config_path = workdir / "lesionwatch.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "listener.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LESIONWATCH_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(executable), "listen", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    running = ListenerProcess(process, port, data_dir, log_path)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _port_open(port):
            if not running.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"lesionwatch listen did not start:\n{running.log_tail()}")
            time.sleep(0.1)
        yield running
    finally:
        if running.alive():
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
