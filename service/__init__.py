"""LesionWatch service."""

__all__: list[str] = []
