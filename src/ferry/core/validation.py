"""One line out of a pydantic validation error, for every config, request and file."""

from __future__ import annotations

from pydantic import ValidationError


def _part(part: int | str) -> str:
    # A key comes from the input: shown quoted if it could break the line or hide itself.
    text = str(part)
    return text if text and text.isprintable() and "." not in text else repr(text)


def first_error(exc: ValidationError, *, whole: str = "document") -> str:
    """``field.path: what is wrong`` for the first problem pydantic found, on one line."""
    first = exc.errors()[0]
    where = ".".join(_part(part) for part in first["loc"]) or whole
    message = " ".join(first["msg"].removeprefix("Value error, ").splitlines())
    return f"{where}: {message}"
