"""``fastpt generate``: continue prompts with a decoder (or a T5-style Seq2Seq) model folder."""

from __future__ import annotations

import argparse
import os

import torch

from fastpt.commands.common import load_model_and_tokenizer, utf8_lines
from fastpt.commands.options import ConfigError, Option, add_options, resolve

OPTIONS = [
    Option("model", "str", None, "model folder (HF layout + tokenizer.json)", input_path=True,
           optional=True),
    Option("prompt", "str_or_list", None, "prompt text; several: a TOML list", optional=True),
    Option("prompts_file", "str", None, "a text file with one prompt per line", input_path=True,
           optional=True),
    Option("max_new_tokens", "int", 32, "", "sampling"),
    Option("do_sample", "bool", False, "sample instead of greedy decoding", "sampling"),
    Option("temperature", "float", 1.0, "", "sampling"),
    Option("top_k", "int", 0, "0: off", "sampling"),
    Option("top_p", "float", 1.0, "1.0: off", "sampling"),
    Option("num_beams", "int", 1, "> 1: beam search", "sampling"),
    Option("repetition_penalty", "float", 1.0, "", "sampling"),
    Option("stop", "str_or_list", None, "cut the output at the first of these strings", "sampling",
           optional=True),
    Option("seed", "int", 0, "seed of the sampler", "sampling"),
]


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue prompts with a decoder or seq2seq model (greedy, sampling, beams)",
        description="Generates a continuation of each prompt with a KV cache (prompts are batched "
                    "and left-padded internally) and prints prompt and continuation.",
        epilog="Example: fastpt generate --model runs/pretrain/final --prompt 'Ruza lives in'")
    add_options(p, OPTIONS)
    p.set_defaults(func=run)


def _prompts(v: dict) -> list[str]:
    prompts = [v["prompt"]] if isinstance(v["prompt"], str) else list(v["prompt"] or [])
    if v["prompts_file"]:
        if not os.path.isfile(v["prompts_file"]):
            raise ConfigError(f"prompts_file: {v['prompts_file']} is not a file")
        with open(v["prompts_file"], encoding="utf-8") as f:
            lines = list(utf8_lines(f, v["prompts_file"]))
        prompts += [line.rstrip("\n") for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("prompt: give --prompt TEXT or --prompts-file FILE")
    return prompts


def _check_prompt_lengths(model, ids: list[list[int]]) -> None:
    """A model with learned positions (GPT-2) cannot read a prompt longer than its table;
    generate() would only say how many new tokens fit (none), not which prompt is too long."""
    if getattr(model.config, "flavour", None) != "gpt2":
        return
    limit = model.config.max_position_embeddings
    for n, prompt in enumerate(ids, 1):
        if len(prompt) > limit:
            raise ConfigError(f"prompt {n}: {len(prompt)} tokens, more than the model's {limit} "
                              "learned positions; expected a shorter prompt")


def continuations(model, tok, prompts: list[str], v: dict) -> list[str]:
    from fastpt.icl.evaluate import cut_at_stop
    from fastpt.models import Decoder, Seq2Seq
    from fastpt.models.generation import stop_token_ids
    if not isinstance(model, (Decoder, Seq2Seq)):
        raise ConfigError(f"model: a {type(model).__name__} cannot generate text (need a decoder or seq2seq model)")
    ids = [tok.encode(p, add_special_tokens=False).ids or [model.config.bos_token_id or 0] for p in prompts]
    _check_prompt_lengths(model, ids)
    out = model.generate(ids, max_new_tokens=v["max_new_tokens"], do_sample=v["do_sample"],
                         temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"],
                         num_beams=v["num_beams"], repetition_penalty=v["repetition_penalty"],
                         generator=torch.Generator().manual_seed(v["seed"]))
    start = 1 if isinstance(model, Seq2Seq) else max(map(len, ids))
    stops = [v["stop"]] if isinstance(v["stop"], str) else list(v["stop"] or [])
    # generate() fills a row after its stop token with padding: neither is text.
    stop_ids = set(stop_token_ids(model.config)) | ({model.config.pad_token_id} - {None})
    texts = []
    for row in out[:, start:].tolist():
        text = tok.decode([t for t in row if t not in stop_ids])
        texts.append(cut_at_stop(text, stops))  # an empty stop string is skipped, as in lm-eval
    return texts


def run(args: argparse.Namespace) -> int:
    v = resolve(args, OPTIONS)
    if v["model"] is None:
        raise ConfigError("model: required (a model folder, e.g. runs/pretrain/final)")
    prompts = _prompts(v)
    model, tok = load_model_and_tokenizer(v["model"])
    for prompt, text in zip(prompts, continuations(model, tok, prompts, v)):
        print(f"{prompt}{text}\n---")
    return 0
