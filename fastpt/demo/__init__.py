"""``fastpt demo``: a tour of what fastpt does, on the embedded data, offline.

Sections (each a module with ``run(ctx, section)``): kernel benchmarks (kernels.py),
pre-training (pretraining.py), fine-tuning strategies (finetuning.py), in-context learning
(icl.py) and value iteration (mdp.py). ``run_demo`` (run.py) runs them and writes
``report.md`` with PNG plots (report.py, plots.py) into the output folder.
"""

from fastpt.demo.config import SECTIONS, DemoConfig
from fastpt.demo.run import run_demo

__all__ = ["SECTIONS", "DemoConfig", "run_demo"]
