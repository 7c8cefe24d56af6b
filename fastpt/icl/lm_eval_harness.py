"""lm-evaluation-harness model type "fastpt": lm-eval's requests answered by fastpt's own
in-context-learning scoring path (:mod:`fastpt.icl.scoring`), on a fastpt model folder.

lm-eval finds third-party models only once their module is imported (it has no plugin
discovery), so run it through fastpt, which imports this module first::

    fastpt lm-eval --model_args pretrained=PATH --tasks TASK [--include_path DIR] [...]
    python -m fastpt lm-eval ...                      # the same

or, from Python, ``import fastpt.icl.lm_eval_harness`` and then
``lm_eval.simple_evaluate(model="fastpt", model_args="pretrained=PATH", tasks=[...])``.

``PATH`` is a model folder in HF layout (config.json, model.safetensors, tokenizer.json) as
written by ``fastpt pretrain`` / ``fastpt.models.save_pretrained``; decoders only. The
context is prefixed with the model's ``bos_token_id`` as ``fastpt eval --task icl`` does, so
the scores equal fastpt's own evaluation. Generation is greedy.
"""

from __future__ import annotations

import os
import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from fastpt.icl.evaluate import generate_answer
from fastpt.icl.scoring import loglikelihood, score_tokens


def _positive_int(name: str, value) -> int:
    # model_args / gen_kwargs arrive as strings or numbers: say which one is wrong.
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"fastpt lm-eval model: {name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"fastpt lm-eval model: {name} must be a positive integer, got {value!r}")
    return number


@register_model("fastpt")
class FastptLM(LM):
    """lm-eval's ``LM`` over a fastpt decoder. ``model_args``: ``pretrained=PATH`` (required),
    ``max_gen_toks`` (default 256); lm-eval's ``batch_size`` / ``device`` are accepted
    (requests sharing a context are batched by fastpt's scorer; CPU or the model's device).

    Raises:
        ValueError: no ``pretrained``, or the folder is not a fastpt decoder with a tokenizer.
    """

    def __init__(self, pretrained: str | None = None, max_gen_toks: int = 256, device: str | None = None,
                 **_lm_eval_options):
        super().__init__()
        from fastpt.data.tokenizer import load_tokenizer
        from fastpt.models import Decoder, from_pretrained
        if not pretrained:
            raise ValueError("fastpt lm-eval model: model_args needs pretrained=PATH (a fastpt model folder)")
        if not os.path.isfile(os.path.join(pretrained, "config.json")):
            raise ValueError(f"pretrained={pretrained}: not a model folder (no config.json)")
        model = from_pretrained(pretrained)
        if not isinstance(model, Decoder):
            raise ValueError(f"pretrained={pretrained}: lm-eval needs a decoder, got {type(model).__name__}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to --device cuda; as its HF model, run on the CPU then.
            warnings.warn(f"device {device!r} is not available; running on the CPU", stacklevel=2)
            device = "cpu"
        self.model = model.to(device).eval() if device else model.eval()
        self.tokenizer = load_tokenizer(pretrained)
        self.bos_id = model.config.bos_token_id
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.max_length = model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return "fastpt"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        scores = loglikelihood(self.model, self.tokenizer, pairs, bos_id=self.bos_id)
        out = []
        for pair, s in zip(pairs, scores):
            self.cache_hook.add_partial("loglikelihood", pair, (s.logprob, s.is_greedy))
            out.append((s.logprob, s.is_greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored in windows of the model's length, every token predicted once
        (lm-eval's ``get_rolling_token_windows``), conditioned on the BOS token."""
        if self.bos_id is None:
            raise ValueError("loglikelihood_rolling needs the model's bos_token_id (config.json)")
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="fastpt rolling"):
            (text,) = req.args
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            # fastpt's scorer also feeds the last predicted token (its KV cache holds context +
            # continuation), so a window predicts max_length - 1 tokens, one less than HF's.
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.bos_id, max_seq_len=self.max_length - 1, context_len=1)]
            total = sum(s.logprob for s in score_tokens(self.model, windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="fastpt generate"):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample"):
                raise ValueError("fastpt lm-eval model generates greedily; do_sample=True is not supported")
            text = generate_answer(self.model, self.tokenizer, context, stop=tuple(until),
                                   max_new_tokens=_positive_int("max_gen_toks",
                                                                kwargs.get("max_gen_toks", self.max_gen_toks)),
                                   bos_id=self.bos_id)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
