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
the scores equal fastpt's own evaluation; a model without one reads contexts as they are,
with its EOS token for an empty one, as HFLM. Everything else follows lm-eval's HF model
(``HFLM``) on the same model and tokenizer: the token split of a request, the left
truncation to the model's ``max_position_embeddings`` (``max_length``), rolling windows of
``max_length`` tokens, and the generation options (:func:`generation_options`).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from fastpt.icl.evaluate import generate_answer, stop_strings
from fastpt.icl.scoring import loglikelihood, score_tokens
from fastpt.models.generation import stop_token_ids


# lm-eval's aliases for the number of new tokens, highest precedence first
# (lm_eval.models.utils.normalize_gen_kwargs, lm-eval 0.4.13).
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# What transformers' generate() samples with when a task does not say (HFLM calls it).
HF_SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0}
# gen_kwargs handed on to fastpt.models.generate whatever the decoding.
DECODING_KEYS = ("num_beams", "repetition_penalty", "length_penalty")


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
        from fastpt.finetune.save import HEAD_CONFIG
        if os.path.isfile(os.path.join(pretrained, HEAD_CONFIG)):
            # from_pretrained reads the base beside it, whose LM head the fine-tune never trained
            raise ValueError(f"pretrained={pretrained}: a fine-tuned task head ({HEAD_CONFIG}), not a language "
                             "model: lm-eval scores text with a decoder's own LM head")
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
        # HFLM's prefix_token_id: BOS, else the first EOS; it stands in for an empty context.
        eos = stop_token_ids(model.config)
        self.prefix_id = self.bos_id if self.bos_id is not None else (eos[0] if eos else None)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.max_length = model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return "fastpt"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        # Without a BOS, as HFLM: contexts as they are, the prefix token for an empty one.
        scores = loglikelihood(self.model, self.tokenizer, pairs, bos_id=self.bos_id,
                               empty_context_id=self.prefix_id)
        out = []
        for pair, s in zip(pairs, scores):
            self.cache_hook.add_partial("loglikelihood", pair, (s.logprob, s.is_greedy))
            out.append((s.logprob, s.is_greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored in windows of the model's length, every token predicted once
        (lm-eval's ``get_rolling_token_windows`` with ``max_seq_len=max_length``, as HFLM),
        conditioned on the BOS token (else the EOS token, as HFLM)."""
        if self.prefix_id is None:
            raise ValueError("loglikelihood_rolling needs the model's bos_token_id or eos_token_id (config.json)")
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="fastpt rolling"):
            (text,) = req.args
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            # score_tokens reads all but the last token of a window, as HFLM, so a window of
            # max_length + 1 tokens fits the model's max_length positions.
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_id, max_seq_len=self.max_length, context_len=1)]
            total = sum(s.logprob for s in score_tokens(self.model, windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) until a stop string, HFLM's way: the context
        keeps its last ``max_length - max_gen_toks`` tokens; see :func:`generation_options`."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="fastpt generate"):
            context, gen_kwargs = req.args
            until, max_new_tokens, options = generation_options(gen_kwargs, self.max_gen_toks)
            if max_new_tokens >= self.max_length:  # HFLM asserts the same
                raise ValueError(f"fastpt lm-eval model: max_gen_toks={max_new_tokens} leaves no room for "
                                 f"the context in the model's {self.max_length} positions: expected fewer "
                                 f"than {self.max_length} (set max_gen_toks in model_args or the task's "
                                 "gen_kwargs)")
            text = generate_answer(self.model, self.tokenizer, context, stop=until,
                                   max_new_tokens=max_new_tokens, bos_id=self.bos_id, **options)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def generation_options(gen_kwargs: dict | None, default_max_gen_toks: int) -> tuple[list[str], int, dict]:
    """(stop strings, new tokens, options for :func:`fastpt.models.generate`) from lm-eval's
    ``gen_kwargs``, read as lm-eval 0.4.13's HFLM reads them:

    - ``until``: a string or a list; empty strings are ignored when cutting.
    - new tokens: the first of ``max_gen_toks``, ``max_new_tokens``, ``max_tokens``,
      ``max_completion_tokens`` given, else ``default_max_gen_toks``.
    - decoding: ``do_sample`` if given, else sampling when ``temperature`` > 0. Sampling uses
      ``temperature`` (which must then be > 0, as transformers requires), ``top_k`` and
      ``top_p``, by default transformers' 50 and 1.0, which HFLM's ``generate()`` call falls
      back on. ``num_beams``, ``repetition_penalty`` and ``length_penalty`` are passed on.

    Raises:
        ValueError: a bad number of tokens, or a key fastpt's generate cannot honour.
    """
    if gen_kwargs is not None and not isinstance(gen_kwargs, dict):
        raise TypeError(f"fastpt lm-eval model: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
    kwargs = dict(gen_kwargs or {})
    until = list(stop_strings(kwargs.pop("until", None)))
    max_new_tokens = _max_new_tokens(kwargs, default_max_gen_toks)
    options = _decoding_options(kwargs)
    return until, max_new_tokens, options


def _max_new_tokens(kwargs: dict, default: int) -> int:
    given = [key for key in MAX_TOKEN_KEYS if kwargs.get(key) is not None]
    value = kwargs[given[0]] if given else default
    for key in MAX_TOKEN_KEYS:
        kwargs.pop(key, None)
    return _positive_int(given[0] if given else "max_gen_toks", value)


def _decoding_options(kwargs: dict) -> dict:
    """fastpt generate() options for the rest of gen_kwargs (consumed from ``kwargs``)."""
    temperature = kwargs.pop("temperature", 0.0)
    try:
        temperature = float(temperature or 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"fastpt lm-eval model: temperature must be a number, got {temperature!r}") from None
    if not math.isfinite(temperature):  # NaN > 0 is False: it would silently mean greedy
        raise ValueError(f"fastpt lm-eval model: temperature must be finite, got {temperature}")
    do_sample = kwargs.pop("do_sample", None)
    if do_sample is not None and not isinstance(do_sample, bool):  # "false" would read as true
        raise TypeError(f"fastpt lm-eval model: do_sample must be true or false, got {do_sample!r}")
    sampling = {"top_k": kwargs.pop("top_k", None), "top_p": kwargs.pop("top_p", None)}
    options = {key: kwargs.pop(key) for key in DECODING_KEYS if key in kwargs}
    if kwargs:
        # HFLM hands such keys to transformers' generate(); fastpt's cannot honour them, and
        # ignoring them would silently change the output.
        raise ValueError(f"fastpt lm-eval model: gen_kwargs {sorted(kwargs)} are not supported; expected "
                         f"only until, {', '.join(MAX_TOKEN_KEYS)}, do_sample, temperature, top_k, top_p, "
                         f"{', '.join(DECODING_KEYS)}")
    if do_sample is None:  # lm-eval: a positive temperature asks for sampling
        do_sample = temperature > 0.0
    if do_sample:
        options.update(do_sample=True, temperature=temperature)
        options.update({key: default if sampling[key] is None else sampling[key]
                        for key, default in HF_SAMPLING_DEFAULTS.items()})
    return options
