"""The console's colours meet WCAG AA: read from ferry.css's custom properties, each text
colour against the backgrounds it is drawn on (>= 4.5:1) and the focus ring against
the backgrounds it is drawn over (>= 3:1, WCAG 2.2 focus appearance / non-text contrast)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ferry.web

CSS = Path(ferry.web.__file__).parent / "static" / "ferry.css"

# (foreground, background) by custom property, as the rules of ferry.css pair them.
TEXT = [
    ("fg", "bg"), ("fg", "panel"), ("fg", "notice-bg"),  # body text, table heads, the warnings
    ("muted", "bg"), ("muted", "panel"),
    ("accent", "bg"),  # links
    ("ok", "bg"), ("warn", "bg"), ("warn", "notice-bg"), ("error", "bg"), ("error", "notice-bg"),
    ("on-accent", "accent"), ("on-accent", "accent-hover"),  # buttons
    ("error", "danger-hover"),  # a danger button under the pointer
    ("header-fg", "header-bg"), ("header-muted", "header-bg"), ("header-fg", "fg"),  # skip link
]  # fmt: skip
FOCUS = [
    ("focus", "bg"),
    ("focus", "panel"),
    ("focus", "notice-bg"),  # the ring over the page
    ("focus", "focus-gap"),  # the ring against its own light gap (over a button or the console)
    ("focus-on-dark", "header-bg"),  # in the header, and the skip link over it
    ("current", "header-bg"),  # the current page's underline in the header
]


def _properties() -> dict[str, str]:
    css = CSS.read_text()
    root = re.search(r":root\s*\{(.*?)\}", css, re.S)
    assert root, "ferry.css has no :root block"
    found = dict(re.findall(r"--([\w-]+)\s*:\s*(#[0-9a-fA-F]{6})\s*;", root[1]))
    assert found, "no colour custom properties in :root"
    return found


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_the_contrast_formula_matches_wcags_reference_values() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert contrast("#ffbf47", "#ffffff") == pytest.approx(1.64, abs=0.01)  # the old focus


@pytest.mark.parametrize(("fg", "bg"), TEXT)
def test_text_colours_reach_4_5_to_1(fg: str, bg: str) -> None:
    colours = _properties()
    ratio = contrast(colours[fg], colours[bg])
    assert ratio >= 4.5, f"--{fg} {colours[fg]} on --{bg} {colours[bg]}: {ratio:.2f}:1"


@pytest.mark.parametrize(("fg", "bg"), FOCUS)
def test_focus_colours_reach_3_to_1(fg: str, bg: str) -> None:
    colours = _properties()
    ratio = contrast(colours[fg], colours[bg])
    assert ratio >= 3, f"--{fg} {colours[fg]} against --{bg} {colours[bg]}: {ratio:.2f}:1"


def test_the_rules_use_only_those_properties_and_the_focus_ring_has_its_gap() -> None:
    """No colour outside :root (so the pairs above are the colours drawn), and the focus
    rules draw the ring the pairs check: dark with a light gap, light in the header."""
    css = CSS.read_text()
    rules = css[css.index("}", css.index(":root")) + 1 :]
    rules = re.sub(r"/\*.*?\*/", "", rules, flags=re.S)
    assert re.findall(r"#[0-9a-fA-F]{3,8}\b|rgba?\(|hsla?\(|:\s*(?:white|black)\b", rules) == []
    used = set(re.findall(r"var\(--([\w-]+)\)", rules))
    assert used <= set(_properties()), used - set(_properties())
    focus = re.search(r"(?m)^:focus-visible\s*\{([^}]*)\}", rules)
    assert focus, "no :focus-visible rule"
    assert "outline: 3px solid var(--focus)" in focus[1]
    assert "box-shadow: 0 0 0 2px var(--focus-gap)" in focus[1]
    assert re.search(r"header\.top :focus-visible[^{]*\{[^}]*var\(--focus-on-dark\)", rules)
