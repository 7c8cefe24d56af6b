"""This machine's memory, for checks that refuse a size before allocating it."""

from __future__ import annotations

import math
import os


def physical_memory() -> float:
    """Bytes of physical memory; inf where the OS does not say (every size then fits)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf
