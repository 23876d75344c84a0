"""Deterministic UIDs for result objects.

Every UID of a result object (series, instance, tracking UID, device UID) is a hash of the
job identity and the object's role, so re-running or re-sending a job produces the very same
UIDs: the PACS replaces what it has instead of storing a duplicate.
"""

from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["derive_uid"]


def derive_uid(job_key: str, role: str, prefix: str | None = None) -> str:
    """A UID that depends only on `job_key`, `role` and `prefix`.

    `job_key` identifies the job (for example its study UID, pipeline set and model
    versions); `role` names the object within the job ("seg/series/<source series>").
    `prefix` is the organisation root (ending in "."); pydicom's root is used by default.
    """
    if not job_key or not role:
        raise ValueError(f"derive_uid needs a job_key and a role, got {job_key!r}, {role!r}")
    root = prefix if prefix is not None else PYDICOM_ROOT_UID
    if not root.endswith("."):
        raise ValueError(f"UID prefix must end with '.', got {root!r}")
    return str(generate_uid(prefix=root, entropy_srcs=[job_key, role]))
