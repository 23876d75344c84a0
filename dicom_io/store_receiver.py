"""A small C-STORE receiver that writes what it is sent to a folder: the demo's stand-in PACS.

`make demo` starts one to receive LesionWatch's results (when no Orthanc is installed), and
the end-to-end tests use it to count what arrives. Files are named by SOP Instance UID, so a
resent instance replaces its file; `received` counts every C-STORE, resends included.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["StoreReceiver"]


class StoreReceiver:
    """Accepts C-STORE from anyone on `host:port` as `ae_title`; files land in `folder`."""

    def __init__(
        self, folder: Path, *, ae_title: str = "RESULTS", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.received: Counter[str] = Counter()  # SOP Instance UID -> C-STORE count
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the receiver first"
        return int(self._server.server_address[1])

    def start(self) -> StoreReceiver:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax)
        self._server = ae.start_server(
            (self.host, self._requested_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        dataset: Dataset = event.dataset
        dataset.file_meta = event.file_meta
        uid = str(dataset.SOPInstanceUID)
        path = self.folder / f"{dataset.Modality}_{uid}.dcm"
        temporary = path.with_suffix(".tmp")
        dataset.save_as(temporary, enforce_file_format=True)
        temporary.replace(path)
        with self._lock:
            self.received[uid] += 1
        return 0x0000

    def files(self, modality: str | None = None) -> list[Path]:
        pattern = f"{modality}_*.dcm" if modality else "*.dcm"
        return sorted(self.folder.glob(pattern))

    def __enter__(self) -> StoreReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
