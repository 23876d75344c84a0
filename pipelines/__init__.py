"""LesionWatch pipelines."""

__all__: list[str] = []
