"""Jinja2 templates of the console and the filters they format values with.

Templates render data and hold no logic: pages hand them plain values
(views from the agents, rows prepared in the page module); the filters only
format (sizes, times, durations). Autoescaping is on for every template.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import jinja2

from ferry import __version__
from ferry.core.replication import format_frequency
from ferry.core.units import format_size
from ferry.errors import InvalidInputError


def size(value: int | float | None) -> str:
    return "-" if value is None else format_size(int(value))


def when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def frequency(value: int | None) -> str:
    if value is None:
        return "-"
    try:
        return format_frequency(value)
    except InvalidInputError:  # a frequency this ferry has no name for
        return f"{value} s"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{format_size(int(value))}/s"


class Renderer:
    """The template environment (one per application)."""

    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("ferry.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(size=size, when=when, seconds=seconds, frequency=frequency,
                                rate=rate)  # fmt: skip
        self.env.globals["version"] = __version__

    def render(self, template: str, **data: Any) -> str:
        return self.env.get_template(template).render(**data)
