"""``python -m fastpt``: the fastpt command line (see fastpt.cli)."""

import sys

from fastpt.cli import main

sys.exit(main())
