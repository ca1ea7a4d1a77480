"""One line out of a pydantic validation error, for every config, request and file."""

from __future__ import annotations

from pydantic import ValidationError


def first_error(exc: ValidationError, *, whole: str = "document") -> str:
    """``field.path: what is wrong`` for the first problem pydantic found."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or whole
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"
