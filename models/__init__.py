"""LesionWatch models."""

__all__: list[str] = []
