"""``DemoConfig``: what ``fastpt demo`` runs and how big, validated when built.

Fields whose default is None take their value from the size of the run (``quick`` or
full, see :data:`SIZES`), so ``--quick --decoder-steps 500`` still works: an explicit value
always wins. Each field is a TOML key and a flag of ``fastpt demo`` (fastpt/commands/demo.py
puts them in the tables named by :data:`TABLE_OF`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SECTIONS = ("kernels", "pretrain", "finetune", "icl", "mdp")
"""The demo's sections, in the order they run."""

TITLES = {
    "kernels": "Kernel benchmarks",
    "pretrain": "Pre-training a tiny encoder and a tiny decoder",
    "finetune": "Fine-tuning strategies compared",
    "icl": "In-context learning",
    "mdp": "Value iteration",
}

# Size-dependent defaults. quick: <= 2 minutes on 2 cores; full: <= 10 minutes.
SIZES = {
    "quick": dict(kernel_ops=("rms_norm", "swiglu", "rope"), kernel_modes=("fwd",),
                  kernel_budget_s=0.2, n_docs=3000, encoder_steps=60, decoder_steps=150, pretrain_lr=3e-3,
                  seq_len=128, n_train=64, n_test=200, finetune_epochs=2, icl_items=12,
                  mdp_states=20_000),
    "full": dict(kernel_ops=("rms_norm", "swiglu", "rope", "attention_causal"),
                 kernel_modes=("fwd", "fwdbwd"), kernel_budget_s=1.0, n_docs=30_000,
                 encoder_steps=400, decoder_steps=1500, pretrain_lr=1e-3, seq_len=256, n_train=200, n_test=1000,
                 finetune_epochs=8, icl_items=100, mdp_states=200_000),
}

TABLE_OF = {
    **{name: "" for name in ("quick", "out", "seed", "threads", "train_threads", "sections",
                             "progress")},
    **{name: "kernels" for name in ("kernel_ops", "kernel_modes", "kernel_budget_s", "kernel_compile")},
    **{name: "pretrain" for name in ("n_docs", "vocab_size", "seq_len", "encoder_preset",
                                     "decoder_preset", "encoder_steps", "decoder_steps",
                                     "pretrain_lr")},
    **{name: "finetune" for name in ("strategies", "n_train", "n_test", "finetune_epochs")},
    **{name: "icl" for name in ("icl_tasks", "icl_shots", "icl_items")},
    **{name: "mdp" for name in ("mdp_states", "mdp_actions", "mdp_successors", "mdp_gamma",
                                "mdp_epsilon")},
}
"""The TOML table of each field ("" = top level)."""

HELPS = {
    "quick": "the <= 2-minute version (smaller models, fewer steps and cases)",
    "out": "output folder for report.md and the plots (default: a new runs/demo-<time>)",
    "seed": "seed of the corpus, the weights and the data order",
    "threads": "torch threads of the kernel benchmarks and value iteration",
    "train_threads": "torch threads while training and scoring the tiny models",
    "sections": f"sections to run, comma-separated from {','.join(SECTIONS)}",
    "progress": "tqdm progress bars while training",
    "kernel_ops": "ops to benchmark (see fastpt bench --help)",
    "kernel_modes": "fwd and/or fwdbwd",
    "kernel_budget_s": "measuring time per case in seconds",
    "kernel_compile": "also time torch.compile of the eager code",
    "n_docs": "documents of the embedded world corpus to pre-train on",
    "vocab_size": "tokenizer vocabulary",
    "seq_len": "tokens per pre-training example",
    "encoder_preset": "encoder preset (MLM)",
    "decoder_preset": "decoder preset (causal LM; fine-tuned and prompted later)",
    "encoder_steps": "encoder pre-training steps",
    "decoder_steps": "decoder pre-training steps",
    "pretrain_lr": "peak learning rate of both pre-training runs",
    "strategies": "fine-tuning strategies (fastpt.finetune.STRATEGIES); training from scratch is added",
    "n_train": "labelled sentiment reviews (half of the adjectives)",
    "n_test": "test reviews (the other half of the adjectives)",
    "finetune_epochs": "epochs over the labelled reviews",
    "icl_tasks": "in-context tasks (fastpt.data.world.ICL_TASKS)",
    "icl_shots": "numbers of examples in the prompt",
    "icl_items": "test items per task",
    "mdp_states": "states of the random sparse MDP",
    "mdp_actions": "actions of the random sparse MDP",
    "mdp_successors": "successors per (state, action)",
    "mdp_gamma": "discount of the random sparse MDP",
    "mdp_epsilon": "value iteration tolerance (sup-norm rule)",
}


MAX_THREADS = 1024
"""Most torch threads ``threads`` and ``train_threads`` may ask for: with threads = 1000000
the demo died of a segmentation fault when torch's thread pool started."""

ICL_POOL = 200
"""The in-context section draws its examples from a pool of this many per task."""


@dataclass
class DemoConfig:
    quick: bool = False
    out: str | None = None
    seed: int = 0
    threads: int = 2
    # NOTE: the tiny models (d 64) gain nothing from a second thread and lose 3-4x when the
    # machine has other work: bert-tiny, batch 32, load ~5 on 2 cores: 470-600 ms per step
    # with 1 thread, 1400-2100 ms with 2 (OpenMP workers waiting for a descheduled peer).
    train_threads: int = 1
    sections: tuple = SECTIONS
    progress: bool = True
    kernel_ops: tuple | None = None
    kernel_modes: tuple | None = None
    kernel_budget_s: float | None = None
    kernel_compile: bool = True
    n_docs: int | None = None
    vocab_size: int = 2000
    seq_len: int | None = None
    encoder_preset: str = "bert-tiny"
    decoder_preset: str = "gpt2-tiny"
    encoder_steps: int | None = None
    decoder_steps: int | None = None
    pretrain_lr: float | None = None
    strategies: tuple = ("full", "partial", "probe", "lora", "adapters", "prompt")
    n_train: int | None = None
    n_test: int | None = None
    finetune_epochs: int | None = None
    icl_tasks: tuple = ("city_of", "job_of", "sentiment")
    icl_shots: tuple = (0, 1, 4)
    icl_items: int | None = None
    mdp_states: int | None = None
    mdp_actions: int = 4
    mdp_successors: int = 16
    mdp_gamma: float = 0.9
    mdp_epsilon: float = 1e-6

    def __post_init__(self):
        size = SIZES["quick" if self.quick else "full"]
        for name, value in size.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("sections", "kernel_ops", "kernel_modes", "strategies", "icl_tasks", "icl_shots"):
            value = getattr(self, name)
            items = [value] if isinstance(value, (str, int)) else value
            # Checked before dict.fromkeys: a TOML list of lists or tables ([["rope"]]) failed
            # there with "unhashable type: 'list'" and a traceback.
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
                raise ValueError(f"{name}: expected a list of names or numbers, got {value!r}")
            setattr(self, name, tuple(dict.fromkeys(items)))
        self._check()

    def _check(self) -> None:
        from fastpt.benchmarks.run import OPS
        from fastpt.data.world import ICL_TASKS
        from fastpt.finetune import STRATEGIES
        from fastpt.models.config import DecoderConfig, EncoderConfig
        from fastpt.train.config import SEED_LIMIT
        for name, allowed in (("sections", SECTIONS), ("kernel_ops", OPS),
                              ("kernel_modes", ("fwd", "fwdbwd")), ("strategies", STRATEGIES),
                              ("icl_tasks", ICL_TASKS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name}: expected a non-empty list from {', '.join(allowed)}, "
                                 f"got {list(values)}")
        for name, cls in (("encoder_preset", EncoderConfig), ("decoder_preset", DecoderConfig)):
            if getattr(self, name) not in cls.PRESETS:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of "
                                 f"{', '.join(sorted(cls.PRESETS))}")
        for name in ("threads", "train_threads", "vocab_size", "seq_len", "n_docs", "encoder_steps", "decoder_steps",
                     "n_train", "n_test", "finetune_epochs", "icl_items", "mdp_states",
                     "mdp_actions", "mdp_successors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        from fastpt.train.recipes import MIN_SEQ_LEN, MIN_VOCAB  # (torch: imported when checked)
        # the demo pre-trains an encoder and a decoder on one vocab_size and seq_len: these
        # failed inside the pretrain section, with a traceback in report.md
        for name, least in (("seq_len", MIN_SEQ_LEN), ("vocab_size", MIN_VOCAB)):
            kind, (low, why) = max(least.items(), key=lambda item: item[1][0])
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{name}: expected an integer >= {low} (the {kind}: {why}), "
                                 f"got {getattr(self, name)}")
        if self.threads > MAX_THREADS or self.train_threads > MAX_THREADS:
            name = "threads" if self.threads > MAX_THREADS else "train_threads"
            raise ValueError(f"{name}: expected at most {MAX_THREADS} threads, got {getattr(self, name)}")
        if not self.icl_shots or not all(isinstance(k, int) and k >= 0 for k in self.icl_shots):
            raise ValueError(f"icl_shots: expected a non-empty list of integers >= 0, got {list(self.icl_shots)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -SEED_LIMIT <= self.seed < SEED_LIMIT:
            # the pre-training runs' TrainerConfig takes these; a seed of 2**64 failed the
            # sections with "Overflow when unpacking long long", naming no option
            raise ValueError(f"seed: expected an integer in [-2**53, 2**53), got {self.seed!r}")
        for name in ("quick", "progress", "kernel_compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise ValueError(f"out: expected a folder name, got {self.out!r}")
        for name in ("kernel_budget_s", "pretrain_lr", "mdp_gamma", "mdp_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if not self.pretrain_lr > 0:
            raise ValueError(f"pretrain_lr: expected a learning rate > 0, got {self.pretrain_lr}")
        if not self.kernel_budget_s >= 0:
            raise ValueError(f"kernel_budget_s: expected seconds >= 0, got {self.kernel_budget_s}")
        if not 0 < self.mdp_gamma < 1:
            raise ValueError(f"mdp_gamma: expected a discount in (0, 1), got {self.mdp_gamma}")
        if not self.mdp_epsilon > 0:
            raise ValueError(f"mdp_epsilon: expected a tolerance > 0, got {self.mdp_epsilon}")
        # These failed their section only after the others had run (the decoder pre-trained
        # before the ICL pool ran short), or dropped an op from the table without a word.
        from fastpt.mdp import check_random_mdp_fits
        try:
            check_random_mdp_fits(self.mdp_states, self.mdp_actions, self.mdp_successors)
        except ValueError as e:
            raise ValueError(f"mdp_states x mdp_actions x mdp_successors: {e}") from None
        if max(self.icl_shots) > ICL_POOL:
            raise ValueError(f"icl_shots: expected at most {ICL_POOL} examples (the pool they are drawn "
                             f"from), got {max(self.icl_shots)}")
        from fastpt.benchmarks.run import load_spec
        modes = {op: load_spec(op).modes for op in self.kernel_ops}
        modeless = [op for op in self.kernel_ops if not set(modes[op]) & set(self.kernel_modes)]
        if modeless:
            raise ValueError(f"kernel_ops: {', '.join(modeless)} run in none of kernel_modes "
                             f"{list(self.kernel_modes)} (" + "; ".join(
                                 f"{op}: {', '.join(modes[op])}" for op in modeless) + ")")

    @property
    def size(self) -> str:
        return "quick" if self.quick else "full"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
