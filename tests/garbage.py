"""What only Python's cyclic garbage collector would free: objects in reference cycles.

A server collects those rarely (ragsite.asgi.collect_less_often), so a request or a stream
that leaves a cycle keeps its memory until then."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """The list is filled, as the block ends, with the unreachable objects that only the
    cyclic collector would free, made inside the block."""
    gc.collect()
    found: list[object] = []
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def of_type(garbage: list[object], name: str) -> list[object]:
    return [o for o in garbage if type(o).__name__ == name or getattr(o, "__qualname__", None) == name]
