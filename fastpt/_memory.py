"""This machine's memory, for checks that refuse a size before allocating it."""

from __future__ import annotations

import os


def physical_memory() -> int:
    """Bytes of physical memory; 0 where the OS does not say (no such check is then made)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
