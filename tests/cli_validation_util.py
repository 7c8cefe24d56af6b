"""The in-process CLI runner and the child-process settings the CLI validation tests share."""

import os
import tempfile

from fastpt.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
AWAY = tempfile.gettempdir()   # children run away from the source tree (no compiled _C there)


def _error(capsys, args, status=2) -> str:
    """Runs ``fastpt ARGS`` in-process; asserts the exit status and a single stderr line."""
    assert main(args) == status
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err
