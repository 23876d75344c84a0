"""Who may associate: calling-AE/host allow-list, called AE title, association limit, TLS."""

from __future__ import annotations

import logging
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, require_executable
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification
from scp_harness import count_instances, run_storescu, running_listener

from lesionwatch.config.schema import AllowedCaller, TlsConfig
from lesionwatch.dicom_io.access_control import CallerPolicy

pytestmark = pytest.mark.integration

MODALITY = AllowedCaller(ae_title="MODALITY", host="127.0.0.1")


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lw.db'}"


def _associate(
    port: int, calling: str, called: str = "LESIONWATCH", **kwargs: object
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called, **kwargs)  # type: ignore[arg-type]


def _rejection(assoc: Association) -> tuple[int, int, str]:
    assert assoc.is_rejected, "association was not rejected"
    primitive = assoc.acceptor.primitive
    return int(primitive.result_source), int(primitive.diagnostic), str(primitive.reason_str)


def test_unlisted_calling_ae_is_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lesionwatch")
    with running_listener(
        tmp_path / "lw", _sqlite(tmp_path), free_port(), allowed_callers=(MODALITY,)
    ) as listener:
        assert _rejection(_associate(listener.port, "INTRUDER")) == (
            1,
            3,
            "Calling AE title not recognised",
        )
        accepted = _associate(listener.port, "MODALITY")
        assert accepted.is_established
        assert accepted.send_c_echo().Status == 0
        accepted.release()
    assert "association rejected" in caplog.text
    assert "calling AE title 'INTRUDER' is not allowed from 127.0.0.1" in caplog.text


def test_storescu_from_unlisted_ae_stores_nothing(tmp_path: Path, ge_t1_dir: Path) -> None:
    require_executable("storescu")
    with running_listener(
        tmp_path / "lw", _sqlite(tmp_path), free_port(), allowed_callers=(MODALITY,)
    ) as listener:
        result = run_storescu(listener.port, sorted(ge_t1_dir.iterdir())[0], calling_ae="INTRUDER")
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
        assert count_instances(listener.sessions) == 0
        assert listener.archived_files() == []


def test_allowed_ae_from_another_host_is_rejected(tmp_path: Path) -> None:
    pinned = AllowedCaller(ae_title="MODALITY", host="192.0.2.10")
    anyone_local = AllowedCaller(ae_title="*", host="127.0.0.1")
    with running_listener(
        tmp_path / "lw", _sqlite(tmp_path), free_port(), allowed_callers=(pinned,)
    ) as listener:
        assert _rejection(_associate(listener.port, "MODALITY"))[:2] == (1, 3)
    with running_listener(
        tmp_path / "lw2", _sqlite(tmp_path), free_port(), allowed_callers=(pinned, anyone_local)
    ) as listener:
        for calling in ("MODALITY", "ANY_OTHER"):
            assoc = _associate(listener.port, calling)
            assert assoc.is_established
            assoc.release()


def test_wrong_called_ae_is_rejected_unless_not_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lesionwatch")
    with running_listener(tmp_path / "lw", _sqlite(tmp_path), free_port()) as listener:
        assert _rejection(_associate(listener.port, "MODALITY", called="NOT_LW")) == (
            1,
            7,
            "Called AE title not recognised",
        )
    assert "called AE title 'NOT_LW' is not this listener's 'LESIONWATCH'" in caplog.text
    with running_listener(
        tmp_path / "lw2", _sqlite(tmp_path), free_port(), require_called_ae_title=False
    ) as listener:
        assoc = _associate(listener.port, "MODALITY", called="NOT_LW")
        assert assoc.is_established
        assoc.release()


def test_association_limit_rejects_with_local_limit_exceeded(tmp_path: Path) -> None:
    with running_listener(
        tmp_path / "lw", _sqlite(tmp_path), free_port(), max_associations=1
    ) as listener:
        first = _associate(listener.port, "MODALITY")
        assert first.is_established
        try:
            assert _rejection(_associate(listener.port, "MODALITY")) == (
                3,
                2,
                "Local limit exceeded",
            )
        finally:
            first.release()
        again = _associate(listener.port, "MODALITY")
        assert again.is_established
        again.release()


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = require_executable("openssl")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _client_context(server_cert: Path, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    if client is not None:
        context.load_cert_chain(certfile=str(client[0]), keyfile=str(client[1]))
    return context


def test_tls_association_stores_and_plain_tcp_gets_nothing(tmp_path: Path, ge_t1_dir: Path) -> None:
    cert, key = _self_signed(tmp_path, "lesionwatch")
    tls = TlsConfig(cert_file=cert, key_file=key)
    dataset = pydicom.dcmread(sorted(ge_t1_dir.iterdir())[0])
    with running_listener(tmp_path / "lw", _sqlite(tmp_path), free_port(), tls=tls) as listener:
        assoc = _associate(listener.port, "MODALITY", tls_args=(_client_context(cert), "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_store(dataset).Status == 0
        assoc.release()
        assert count_instances(listener.sessions) == 1

        plain = _associate(listener.port, "MODALITY")
        assert not plain.is_established


def test_tls_with_required_client_certificate(tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path, "lesionwatch")
    client_cert, client_key = _self_signed(tmp_path, "modality")
    tls = TlsConfig(
        cert_file=server_cert, key_file=server_key, ca_file=client_cert, require_client_cert=True
    )
    with running_listener(tmp_path / "lw", _sqlite(tmp_path), free_port(), tls=tls) as listener:
        without = _associate(
            listener.port, "MODALITY", tls_args=(_client_context(server_cert), "127.0.0.1")
        )
        assert not without.is_established
        with_cert = _associate(
            listener.port,
            "MODALITY",
            tls_args=(_client_context(server_cert, (client_cert, client_key)), "127.0.0.1"),
        )
        assert with_cert.is_established
        assert with_cert.send_c_echo().Status == 0
        with_cert.release()


@pytest.mark.parametrize(
    ("calling", "host", "admitted"),
    [
        ("MODALITY", "127.0.0.1", True),
        ("MODALITY", "::ffff:127.0.0.1", True),  # IPv4-mapped IPv6 is the same host
        ("MODALITY", "10.0.0.7", False),
        ("PACS", "10.0.0.7", True),  # admitted from anywhere
        ("OTHER", "10.0.0.8", True),  # any AE title from this host
        ("OTHER", "10.0.0.9", False),
    ],
)
def test_caller_policy_matches_ae_title_and_host(calling: str, host: str, admitted: bool) -> None:
    policy = CallerPolicy(
        (
            MODALITY,
            AllowedCaller(ae_title="PACS"),
            AllowedCaller(ae_title="*", host="10.0.0.8"),
        ),
        ae_title="LESIONWATCH",
    )
    reason = policy.rejection(calling, "LESIONWATCH", host)
    assert (reason is None) == admitted, reason
    assert policy.rejection(calling, "ELSEWHERE", host) is not None
