"""Repeatable options read back in the order they were typed, across options.

Click (under typer) gives each repeatable option its own list, so
``--image root.qcow2 --disk 10G`` and ``--disk 10G --image root.qcow2`` look
the same to a command. Its parser does know the order: it returns every
option occurrence in command-line order. :class:`TypedOrderCommand` parses
the arguments once more with the command's own parser (pure: the parser only
builds its state) and keeps that order in ``ctx.meta``;
:func:`in_typed_order` interleaves the lists by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import typer
from typer import _click
from typer.core import TyperCommand

T = TypeVar("T")
ORDER_KEY = "ferry.option_order"


class TypedOrderCommand(TyperCommand):
    """A typer command that records the order of its options as typed."""

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        if args:  # no arguments: the command's help, as before
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            ctx.meta[ORDER_KEY] = [param.name for param in order if param.name]
        return super().parse_args(ctx, args)


def typed_order(ctx: typer.Context) -> list[str]:
    """Parameter names, one per occurrence on the command line (empty: not recorded)."""
    order = ctx.meta.get(ORDER_KEY, [])
    return [name for name in order if isinstance(name, str)]


def in_typed_order(order: Sequence[str], values: Mapping[str, Sequence[T]]) -> list[tuple[str, T]]:
    """The values of the options ``values`` names, interleaved as ``order`` typed them.

    Values the order does not account for (no order recorded) follow, option
    by option, in the mapping's order.
    """
    taken = dict.fromkeys(values, 0)
    result: list[tuple[str, T]] = []
    for name in order:
        if name in values and taken[name] < len(values[name]):
            result.append((name, values[name][taken[name]]))
            taken[name] += 1
    for name, items in values.items():
        result.extend((name, item) for item in items[taken[name] :])
    return result
