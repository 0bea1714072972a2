"""Giving freed memory back to the operating system (glibc only; elsewhere this does nothing).

A refresh of a large estate builds new tables of tens of MiB per column while the old ones are still
served, then frees the old ones. glibc serves an allocation above its mmap threshold with a mapping
of its own (returned to the system on free), but it *raises* that threshold to the size of every
mapped block freed, up to 32 MiB: after the first refresh, columns of up to 32 MiB come from the heap
instead, where a freed block among live ones cannot be returned, and the resident size ratchets up
cycle after cycle. Fixing the threshold keeps large columns in their own mappings.

The exporter no longer calls ``malloc_trim`` after each evaluation: it locks each malloc arena while it
walks it (tens of ms in all at 500,000 users), and a serving thread that allocates from a locked arena
waits with the GIL held, so whole bursts of scrapes waited with it (issue 13, docs/scale.md, third
round); the peak RSS was the same without it (VmHWM 649 against 645 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # malloc.h
MMAP_THRESHOLD = 1024 * 1024  # bytes: a column of ~130,000 int64 values or more gets its own mapping


@cache
def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 -- glibc (and not musl or another libc)
    except (OSError, AttributeError):
        return None
    return libc


def keep_large_blocks_mapped() -> bool:
    """Fix glibc's mmap threshold (no dynamic raise); True when it took effect."""
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return done
