"""XML from outside, parsed with every entity, DTD and external reference refused.

A domain XML or an OVF envelope is written by someone else. ``defusedxml``
refuses a document type declaration outright (so no entity is ever declared,
let alone expanded: no billion laughs, no external entity reading a host
file), and the size is capped before parsing.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ferry.errors import InvalidInputError

# Real domain XMLs are a few KiB, OVF envelopes tens of KiB.
MAX_DOCUMENT = 4 * 1024**2


def parse(data: bytes, *, what: str) -> Element:
    """The root element of ``data``; one clear error for anything unsafe or broken."""
    if len(data) > MAX_DOCUMENT:
        raise InvalidInputError(
            f"{what} is {len(data)} bytes; more than the "
            f"{MAX_DOCUMENT // 1024**2} MiB an XML description may be"
        )
    try:
        root: Element = fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as exc:
        raise InvalidInputError(
            f"{what} declares a DTD or entities ({type(exc).__name__}); ferry refuses them "
            "(they can read host files or expand without end): remove the <!DOCTYPE>"
        ) from None
    except ParseError as exc:
        raise InvalidInputError(f"{what} is not well-formed XML ({exc})") from None
    return root


def local(tag: str) -> str:
    """An element's or attribute's name without its namespace."""
    return tag.rsplit("}", 1)[-1]


def children(element: Element, name: str) -> list[Element]:
    """Direct children called ``name`` in any namespace."""
    return [child for child in element if local(child.tag) == name]


def child(element: Element, name: str) -> Element | None:
    found = children(element, name)
    return found[0] if found else None


def text(element: Element, name: str) -> str | None:
    """The stripped text of the first child called ``name`` (any namespace)."""
    found = child(element, name)
    if found is None or found.text is None:
        return None
    return found.text.strip()


def attr(element: Element, name: str) -> str | None:
    """An attribute by local name, with or without a namespace prefix."""
    if name in element.attrib:
        return element.attrib[name]
    for key, value in element.attrib.items():
        if local(key) == name:
            return value
    return None
