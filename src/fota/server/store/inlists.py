"""Queries over any number of ids: no statement gets one bound parameter per id of a long list.

A statement's bound parameters are capped: SQLite at 32,766 in its default build (Debian's
allows 250,000), PostgreSQL's protocol at 65,535; and a long IN-list is slow to build and plan
(PostgreSQL, 40,000 job ids: 1.0 s as one IN-list, 0.6 s in slices of 1,000). So

* ``chunks`` slices a list for ``IN (...)``: one statement per slice of at most IN_LIST_MAX;
* ``id_ranges`` turns integer ids that are mostly consecutive (a deployment's jobs) into a few
  ``BETWEEN`` ranges (the same 40,000 job ids: one range, 0.07 s).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from sqlalchemy import ColumnElement, or_

__all__ = ["IN_LIST_MAX", "RANGE_GAP", "chunks", "id_ranges", "in_ranges"]

T = TypeVar("T")

IN_LIST_MAX = 1000   # ids per IN (...) list
RANGE_GAP = 64       # ids closer than this share a range (the rows between are read and dropped)


def chunks(items: Iterable[T], size: int = IN_LIST_MAX) -> Iterator[list[T]]:
    """Consecutive slices of at most ``size`` items, in the items' order."""
    items = items if isinstance(items, list) else list(items)
    for start in range(0, len(items), size):
        yield items[start:start + size]


def id_ranges(ids: Iterable[int], gap: int = RANGE_GAP) -> list[tuple[int, int]]:
    """The ids, sorted, as (first, last) ranges covering all of them.

    Ids less than ``gap`` apart share a range, so a range may also cover ids not asked for:
    the caller keeps only the rows it wants."""
    ranges: list[tuple[int, int]] = []
    for value in sorted(set(ids)):
        if ranges and value - ranges[-1][1] < gap:
            ranges[-1] = (ranges[-1][0], value)
        else:
            ranges.append((value, value))
    return ranges


def in_ranges(column: ColumnElement, ranges: list[tuple[int, int]]) -> ColumnElement[bool]:
    """``column BETWEEN a AND b OR ...`` for (a, b) ranges (slice long range lists with ``chunks``)."""
    return or_(*(column == first if first == last else column.between(first, last) for first, last in ranges))
