"""`lesionwatch send-test DEST`: check a destination before results depend on it.

Three steps, each with a plain-language explanation when it fails:
1. C-ECHO (Verification): reachability, AE titles, TLS.
2. Negotiation of the result SOP classes LesionWatch sends (SEG, SR, Secondary Capture).
3. C-STORE of a tiny Secondary Capture image, clearly labelled as a LesionWatch
   connectivity test (patient "LESIONWATCH^CONNECTIVITY TEST"), that an admin may delete.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from lesionwatch.config.schema import DestinationConfig
from lesionwatch.dicom_io.scu import (
    AssociationFailure,
    AssociationFailureKind,
    Outcome,
    RejectSource,
    RejectUserReason,
    associate,
    classify_store_status,
    echo,
)

__all__ = [
    "RESULT_SOP_CLASSES",
    "SendTestReport",
    "StepResult",
    "StepStatus",
    "build_test_object",
    "check_destination",
    "explain_failure",
    "format_report",
]

# What LesionWatch sends: lesion SEG, the lesion report SR, burned-in overlay fallback images.
RESULT_SOP_CLASSES = {
    "Segmentation (lesion masks)": SegmentationStorage,
    "Comprehensive 3D SR (lesion report)": Comprehensive3DSRStorage,
    "Comprehensive SR (lesion report)": ComprehensiveSRStorage,
    "Secondary Capture (overlay images)": SecondaryCaptureImageStorage,
}
TEST_PATIENT_NAME = "LESIONWATCH^CONNECTIVITY TEST"
TEST_PATIENT_ID = "LESIONWATCH-SEND-TEST"


class StepStatus(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StepResult:
    name: str
    status: StepStatus
    detail: str
    explanation: str = ""  # what to do, when the step did not pass


@dataclass
class SendTestReport:
    destination: DestinationConfig
    steps: list[StepResult] = field(default_factory=list)
    test_sop_instance_uid: str | None = None

    @property
    def ok(self) -> bool:
        """True when results can be delivered (warnings allowed)."""
        return all(step.status in (StepStatus.OK, StepStatus.WARNING) for step in self.steps)


def explain_failure(dest: DestinationConfig, failure: AssociationFailure) -> str:
    """What an admin should check or change, for an association that failed."""
    where = f"{dest.host}:{dest.port}"
    kind = failure.kind
    if kind == AssociationFailureKind.CONNECTION_REFUSED:
        return (
            f"Nothing listens on {where}: check the port number, that the PACS's DICOM "
            "service is running, and any firewall in between."
        )
    if kind == AssociationFailureKind.TIMEOUT:
        return (
            f"No answer from {where} within {dest.timeout_s:g} s: the host may be down or a "
            "firewall may silently drop the traffic; check host, port and routing."
        )
    if kind == AssociationFailureKind.HOST_NOT_FOUND:
        return f"The host name {dest.host!r} does not resolve: check its spelling or the DNS."
    if kind == AssociationFailureKind.NETWORK_ERROR:
        return f"The network refused the connection to {where}; check routing and firewalls."
    if kind == AssociationFailureKind.TLS_CONFIG:
        return "Fix the file paths under this destination's `tls` settings (CA, cert, key)."
    if kind == AssociationFailureKind.TLS_CERTIFICATE:
        return (
            "The PACS's TLS certificate is not trusted: set `tls.ca_file` to the CA that "
            f"signed it, and check that it is issued for {dest.host!r} (or set "
            "`tls.check_hostname: false`)."
        )
    if kind == AssociationFailureKind.TLS_HANDSHAKE:
        return (
            f"The TLS handshake with {where} failed: the port may not speak TLS (use the "
            "PACS's TLS port, or remove `tls`), or the PACS requires a client certificate "
            "(`tls.cert_file`/`tls.key_file`) or TLS versions this side does not offer."
        )
    if kind == AssociationFailureKind.REJECTED_PERMANENT and failure.rejection is not None:
        _result, source, diagnostic = failure.rejection
        if source == RejectSource.SERVICE_USER:
            if diagnostic == RejectUserReason.CALLING_AE_TITLE_NOT_RECOGNISED:
                return (
                    f"The PACS does not know LesionWatch's AE title {dest.calling_ae_title!r}: "
                    f"add AE title {dest.calling_ae_title!r} (with this machine's IP address) "
                    "to the PACS's allowed modalities / DICOM nodes."
                )
            if diagnostic == RejectUserReason.CALLED_AE_TITLE_NOT_RECOGNISED:
                return (
                    f"The PACS's AE title is not {dest.ae_title!r}: set `ae_title` of this "
                    "destination to the PACS's own AE title (AE titles are case-sensitive)."
                )
        return (
            "The PACS refuses associations from LesionWatch; check that its AE title "
            f"{dest.calling_ae_title!r} and this machine's address are registered there, "
            "and see the PACS's log for its reason."
        )
    if kind == AssociationFailureKind.REJECTED_TRANSIENT:
        return (
            "The PACS is busy or at its association limit; LesionWatch retries such "
            "failures with backoff. Try again later or raise the PACS's association limit."
        )
    if kind == AssociationFailureKind.NO_ACCEPTED_CONTEXT:
        return (
            "The PACS accepted the connection but none of the proposed SOP classes / transfer "
            "syntaxes: enable storage of these object types on the PACS."
        )
    if kind == AssociationFailureKind.ABORTED:
        return (
            "The PACS accepted the TCP connection but then aborted: a TLS-only port contacted "
            "without TLS, or a PACS that checks AE titles after connecting. See the PACS's log."
        )
    return failure.reason


def build_test_object(dest: DestinationConfig) -> Dataset:
    """A 16x16 Secondary Capture image that says what it is in every description field.

    Study and series UIDs are fixed per destination so repeated tests land in one study.
    """
    study_uid = generate_uid(entropy_srcs=["lesionwatch-send-test-study", dest.name])
    series_uid = generate_uid(entropy_srcs=["lesionwatch-send-test-series", dest.name])
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = TEST_PATIENT_NAME
    ds.PatientID = TEST_PATIENT_ID
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    now = time.gmtime()
    ds.StudyDate = ds.ContentDate = time.strftime("%Y%m%d", now)
    ds.StudyTime = ds.ContentTime = time.strftime("%H%M%S", now)
    ds.StudyID = "LWTEST"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "LesionWatch connectivity test - not a patient"
    ds.SeriesDescription = "LesionWatch send-test object - safe to delete"
    ds.ImageComments = f"Sent by `lesionwatch send-test {dest.name}` to check DICOM delivery."
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 9999
    ds.InstanceNumber = 1
    ds.Manufacturer = "LesionWatch"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ramp = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8
    ds.PixelData = ramp.tobytes()
    return ds


def _echo_step(dest: DestinationConfig) -> tuple[StepResult, bool]:
    """The C-ECHO step, and whether later steps can still work."""
    started = time.monotonic()
    result = echo(dest)
    elapsed_ms = (time.monotonic() - started) * 1000
    if result.ok:
        return StepResult("C-ECHO", StepStatus.OK, f"{result.reason} in {elapsed_ms:.0f} ms"), True
    if result.failure is None:
        return StepResult(
            "C-ECHO",
            StepStatus.FAILED,
            result.reason,
            "The PACS accepted the association but did not confirm the echo; see its log.",
        ), True
    if result.failure.kind == AssociationFailureKind.NO_ACCEPTED_CONTEXT:
        return StepResult(
            "C-ECHO",
            StepStatus.WARNING,
            result.reason,
            "The PACS does not offer Verification (C-ECHO); storage may still work.",
        ), True
    return StepResult(
        "C-ECHO", StepStatus.FAILED, result.reason, explain_failure(dest, result.failure)
    ), False


def _negotiation_step(assoc: Association) -> StepResult:
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    lines = [
        f"{label}: {'accepted' if uid in accepted else 'NOT accepted'}"
        for label, uid in RESULT_SOP_CLASSES.items()
    ]
    missing = [label for label, uid in RESULT_SOP_CLASSES.items() if uid not in accepted]
    sr_uids = {Comprehensive3DSRStorage, ComprehensiveSRStorage}
    if not missing:
        return StepResult("Result SOP classes", StepStatus.OK, "; ".join(lines))
    essential_missing = SegmentationStorage not in accepted or not (sr_uids & accepted)
    return StepResult(
        "Result SOP classes",
        StepStatus.FAILED if essential_missing else StepStatus.WARNING,
        "; ".join(lines),
        "Enable storage of the missing object types on the PACS; results of a type it does "
        "not accept fail permanently (the overlay images remain as fallback).",
    )


def _store_step(assoc: Association, ds: Dataset) -> StepResult:
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    if SecondaryCaptureImageStorage not in accepted:
        return StepResult(
            "C-STORE test object", StepStatus.SKIPPED, "Secondary Capture not accepted"
        )
    started = time.monotonic()
    status = assoc.send_c_store(ds)
    elapsed_ms = (time.monotonic() - started) * 1000
    if "Status" not in status:
        return StepResult(
            "C-STORE test object",
            StepStatus.FAILED,
            "no response (DIMSE timeout or the association was lost)",
            f"The PACS did not answer within {assoc.dimse_timeout:g} s; see its log.",
        )
    outcome, label = classify_store_status(int(status.Status))
    comment = status.get("ErrorComment", "")
    detail = f"status {label}{': ' + comment if comment else ''} in {elapsed_ms:.0f} ms"
    if outcome == Outcome.SUCCESS:
        return StepResult("C-STORE test object", StepStatus.OK, detail)
    if outcome == Outcome.WARNING:
        return StepResult(
            "C-STORE test object",
            StepStatus.WARNING,
            detail,
            "Stored, but the PACS changed or dropped something; see its log.",
        )
    advice = (
        "The PACS is short of resources or failed internally; results will be retried."
        if outcome == Outcome.TRANSIENT
        else "The PACS refused the object; results of this kind will not be delivered. "
        "See the PACS's log for the reason."
    )
    return StepResult("C-STORE test object", StepStatus.FAILED, detail, advice)


def check_destination(dest: DestinationConfig) -> SendTestReport:
    """Run the send-test steps against `dest`; never raises for network or DICOM failures."""
    report = SendTestReport(dest)
    step, go_on = _echo_step(dest)
    report.steps.append(step)
    if not go_on:
        for name in ("Result SOP classes", "C-STORE test object"):
            report.steps.append(StepResult(name, StepStatus.SKIPPED, "not tried: C-ECHO failed"))
        return report
    contexts = [(uid, ExplicitVRLittleEndian) for uid in RESULT_SOP_CLASSES.values()]
    attempt = associate(dest, contexts)
    if attempt.association is None:
        assert attempt.failure is not None
        report.steps.append(
            StepResult(
                "Result SOP classes",
                StepStatus.FAILED,
                attempt.failure.reason,
                explain_failure(dest, attempt.failure),
            )
        )
        report.steps.append(
            StepResult("C-STORE test object", StepStatus.SKIPPED, "not tried: no association")
        )
        return report
    assoc = attempt.association
    try:
        report.steps.append(_negotiation_step(assoc))
        test_object = build_test_object(dest)
        report.test_sop_instance_uid = str(test_object.SOPInstanceUID)
        report.steps.append(_store_step(assoc, test_object))
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def format_report(report: SendTestReport) -> str:
    """The report as text for a terminal."""
    dest = report.destination
    tls = "TLS" if dest.tls is not None else "no TLS"
    lines = [
        f"send-test {dest.name}: {dest.ae_title}@{dest.host}:{dest.port} "
        f"(calling AE {dest.calling_ae_title}, {tls})"
    ]
    marks = {
        StepStatus.OK: " OK ",
        StepStatus.WARNING: "WARN",
        StepStatus.FAILED: "FAIL",
        StepStatus.SKIPPED: "SKIP",
    }
    for step in report.steps:
        lines.append(f"  [{marks[step.status]}] {step.name}: {step.detail}")
        if step.explanation and step.status != StepStatus.OK:
            lines.append(f"         -> {step.explanation}")
    if report.test_sop_instance_uid and report.ok:
        lines.append(
            f"  Test object SOP Instance UID {report.test_sop_instance_uid} "
            f"(patient {TEST_PATIENT_NAME!r}) may be deleted from the PACS."
        )
    lines.append("Destination is ready for results." if report.ok else "Destination NOT ready.")
    return "\n".join(lines)
