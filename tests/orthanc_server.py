"""Start a real Orthanc (Debian package) on free ports for tests and benchmarks.

Reusable: ``running_orthanc(workdir)`` yields an :class:`OrthancServer` that accepts C-STORE
from any AE on ``dicom_port`` and exposes its REST API at ``url``; pass ``modalities`` to
register peers (e.g. LesionWatch) that Orthanc can send to.

    peers = {"lw": ("LESIONWATCH", "127.0.0.1", port)}
    with running_orthanc(tmp_path / "orthanc", modalities=peers) as orthanc:
        orthanc.upload(path)
        orthanc.store_to_modality("lw", orthanc.instances())

``running_orthanc(workdir, dicomweb=True)`` also loads the DICOMweb plugin (Debian package
'orthanc-dicomweb') and serves it at ``url + "/dicom-web"``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OrthancError",
    "OrthancServer",
    "dicomweb_plugin",
    "orthanc_executable",
    "running_orthanc",
]

_START_TIMEOUT_S = 60.0
_PLUGIN_DIRS = (
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc/plugins",
    "/usr/local/share/orthanc/plugins",
)


class OrthancError(Exception):
    """Orthanc did not start, or a REST call failed."""


def orthanc_executable() -> str | None:
    return shutil.which("Orthanc")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library (Debian: orthanc-dicomweb), or None."""
    for folder in _PLUGIN_DIRS:
        path = Path(folder) / "libOrthancDicomWeb.so"
        if path.is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    url: str  # REST base URL, e.g. http://127.0.0.1:8042
    dicom_port: int
    ae_title: str
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log_file(self) -> Path:
        return self.workdir / "orthanc.log"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout_s: float = 300,
        content_type: str = "application/json",
    ) -> Any:
        """One REST call; returns the decoded JSON answer (or raw bytes when not JSON)."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            message = f"Orthanc {method} {path} failed: HTTP {exc.code}: {detail}"
            raise OrthancError(message) from exc
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, body: Any, *, timeout_s: float = 300) -> Any:
        return self.request("POST", path, json.dumps(body).encode(), timeout_s=timeout_s)

    def upload(self, path: Path) -> str:
        """POST /instances one DICOM file; returns its Orthanc instance id."""
        answer = self.request(
            "POST", "/instances", path.read_bytes(), content_type="application/dicom"
        )
        return str(answer["ID"])

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for instance_id in self.instances():
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            uids.add(str(tags["SOPInstanceUID"]))
        return uids

    def store_to_modality(
        self, modality: str, resources: list[str], *, timeout_s: float = 600
    ) -> Any:
        """C-STORE ``resources`` (Orthanc ids) to a registered modality, synchronously."""
        return self.post_json(
            f"/modalities/{modality}/store",
            {"Resources": resources, "Synchronous": True, "Timeout": int(timeout_s)},
            timeout_s=timeout_s,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextmanager
def running_orthanc(
    workdir: Path,
    *,
    ae_title: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    extra_config: dict[str, Any] | None = None,
    dicomweb: bool = False,
) -> Iterator[OrthancServer]:
    """Start Orthanc with a generated config in ``workdir``; stop it (and keep its log) after."""
    executable = orthanc_executable()
    if executable is None:
        raise OrthancError("Orthanc is not installed (Debian package 'orthanc')")
    plugins: list[str] = []
    if dicomweb:
        plugin = dicomweb_plugin()
        if plugin is None:
            raise OrthancError("the DICOMweb plugin is not installed (Debian 'orthanc-dicomweb')")
        plugins.append(str(plugin))
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = _free_port(), _free_port()
    config: dict[str, Any] = {
        "Name": f"lesionwatch-test-{dicom_port}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,  # accept C-STORE from any AE
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "StorageCompression": False,
        "Plugins": plugins,
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        "DicomModalities": {
            name: [peer_ae, host, port]
            for name, (peer_ae, host, port) in (modalities or {}).items()
        },
        "DicomScuTimeout": 60,
        "StableAge": 2,
    } | (extra_config or {})
    config_file = workdir / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log_file = workdir / "orthanc.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [executable, str(config_file)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    server = OrthancServer(f"http://127.0.0.1:{http_port}", dicom_port, ae_title, workdir, process)
    try:
        _wait_until_up(server)
        yield server
    finally:
        server.stop()


def _wait_until_up(server: OrthancServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            server.get("/system")
            return
        except (OSError, OrthancError):
            time.sleep(0.2)
    log_tail = server.log_file.read_text(errors="replace")[-3000:]
    raise OrthancError(f"Orthanc did not start on {server.url}; log:\n{log_tail}")
