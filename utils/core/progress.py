"""Progress display: a tqdm bar in a terminal, plain periodic lines anywhere else.

A cluster job writes stdout to a file, where every bar redraw would land as a carriage-return fragment; there the
same progress is printed as one line every ``every_seconds`` and one at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

from utils.core.logs import format_duration

T = TypeVar("T")
PLAIN_EVERY_SECONDS = 30.0


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(items: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True,
             stream: TextIO | None = None, every_seconds: float = PLAIN_EVERY_SECONDS) -> Iterator[T]:
    """``items``, showing how far the loop got: a bar on a terminal, plain lines otherwise, nothing unless
    ``enabled`` (ranks other than 0)."""
    stream = stream or sys.stdout
    if not enabled:
        yield from items
    elif is_terminal(stream):
        yield from tqdm(items, desc=desc, total=total, file=stream)
    else:
        yield from _plain(items, desc, total if total is not None else _length(items), stream, every_seconds)


def _length(items: Iterable[T]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _plain(items: Iterable[T], desc: str, total: int | None, stream: TextIO, every_seconds: float) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0

    def line() -> None:
        elapsed = time.perf_counter() - start
        of = f"/{total} ({100 * done / max(total, 1):.0f}%)" if total else ""
        print(f"{desc}: {done}{of} in {format_duration(elapsed)}", file=stream, flush=True)

    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_seconds:
            line()
            last = now
    line()
