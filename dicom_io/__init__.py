"""LesionWatch dicom_io."""

__all__: list[str] = []
