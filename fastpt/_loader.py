"""Loads fastpt._C and turns every way it can fail into an ImportError that says how to fix it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

_REBUILD = "pip install --no-build-isolation --force-reinstall ."  # from the fastpt source tree


def _built_against() -> str | None:
    info = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(info.read_text())["torch_version"]
    except (OSError, ValueError, KeyError):
        return None


def _unbuilt_source_tree() -> Path | None:
    """The repository folder when this package is the source checkout's fastpt/ (beside a
    pyproject.toml) with no compiled _C in it; else None."""
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file() and not any(package.glob("_C*.so")):
        return package.parent
    return None


def load_extension():
    """Import fastpt._C, checking first that it was built against the torch now installed.

    Raises:
        ImportError: the extension is missing, was built against another torch, or fails
            to load; the message names the cause and the rebuild command.
    """
    built = _built_against()
    if built is not None and built != torch.__version__:
        raise ImportError(
            f"fastpt._C was built against torch {built}, but torch {torch.__version__} is installed; "
            f"C++ extensions must match the torch they run with. Rebuild fastpt: {_REBUILD}"
        )
    try:
        return importlib.import_module("fastpt._C")
    except ImportError as err:  # missing file, undefined symbol, wrong Python ABI, ...
        source = _unbuilt_source_tree()
        if source is not None:
            raise ImportError(
                f"fastpt was imported from its source folder {source}, which holds no compiled "
                f"fastpt._C: Python puts the current folder first on sys.path (python -m, torchrun -m, "
                f"python -c). Run from another folder, or use the installed command: fastpt ..., "
                f"torchrun --no-python fastpt ..."
            ) from err
        raise ImportError(
            f"fastpt._C failed to load ({err}). It is the compiled part of fastpt and must be "
            f"built for this Python and torch {torch.__version__}. Rebuild fastpt: {_REBUILD}"
        ) from err
