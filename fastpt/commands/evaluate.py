"""``fastpt eval``: few-shot in-context learning (log-likelihood multiple choice), test
accuracy of a ``fastpt finetune`` result, or perplexity of a decoder on a corpus."""

from __future__ import annotations

import argparse
import math
import os

import torch

from fastpt.commands.common import (check_label, check_output_file, check_text,
                                    load_model_and_tokenizer, read_jsonl, where)
from fastpt.commands.options import ConfigError, Option, add_options, check_input_file, resolve

TASKS = ("icl", "classify", "perplexity")

OPTIONS = [
    Option("model", "str", None, "model folder (fastpt pretrain's final/, a merged checkpoint, or "
           "fastpt finetune's final/)", input_path=True, optional=True),
    Option("task", "str", "icl", "icl: multiple choice by log-likelihood; classify: accuracy of a "
           "fine-tuned classifier; perplexity: of a decoder on a corpus", choices=TASKS),
    Option("data", "str", "world:city_of", "icl: JSONL of {input, target, choices} or "
           "world:city_of|job_of|sentiment; classify: JSONL of {text, label}; perplexity: "
           ".txt/.jsonl/.csv corpus or 'world'"),
    Option("limit", "int", 0, "evaluate the first N items only (0: all)", minimum=0),
    Option("output", "str", None, "also write the results as JSON to this file", optional=True),
    Option("shots", "list", [0, 1, 4], "numbers of in-context examples", "icl"),
    Option("pool", "str", None, "JSONL to draw examples from (default: the data itself, never "
           "the query)", "icl", input_path=True, optional=True),
    Option("description", "str", "", "a first line that states the task", "icl"),
    Option("answer_separator", "str", " ->", "between input and answer", "icl"),
    Option("seed", "int", 0, "example sampling", "icl"),
]


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="few-shot in-context learning, classifier accuracy, or perplexity",
        description="Evaluates a model folder without changing it: zero/one/few-shot accuracy "
                    "(acc and length-normalised acc_norm), a fine-tuned classifier's accuracy, or "
                    "a decoder's perplexity.",
        epilog="Example: fastpt eval --model runs/pretrain/final --task icl --data world:city_of "
               "--shots 0,1,4")
    add_options(p, OPTIONS)
    p.set_defaults(func=run)


def _limited(rows: list, limit: int) -> list:
    return rows[:limit] if limit > 0 else rows


def _icl_items(spec: str, n: int, seed: int, key: str = "data") -> list[dict]:
    if spec.startswith("world:"):
        from fastpt.data.world import ICL_TASKS, World
        task = spec[len("world:"):]
        if task not in ICL_TASKS:
            raise ConfigError(f"{key}: unknown world task {task!r}; known: {', '.join(ICL_TASKS)}")
        return World(0).icl(task, n, seed=seed)
    if not os.path.isfile(spec):
        raise ConfigError(f"{key}: {spec} is not a file" if os.path.exists(spec) else f"{key}: no such file: {spec}")
    rows = read_jsonl(spec)
    for i, row in enumerate(rows):
        at = where(spec, rows, i)
        missing = [k for k in ("input", "target", "choices") if k not in row]
        if missing:
            raise ValueError(f"{at}: the record has no {', '.join(missing)}")
        choices = row["choices"]
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{at}: 'choices' must be a non-empty list of non-empty strings, got {choices!r}")
        for k in ("input", "target"):
            if not isinstance(row[k], str):
                raise ValueError(f"{at}: {k!r} must be a string, got {row[k]!r}")
        if row["target"] not in choices:
            raise ValueError(f"{at}: 'target' {row['target']!r} is not among the choices {choices}")
    return rows


def check_shots(shots: list) -> None:
    """Every shot count before the first evaluation: a bad one late in the list would
    otherwise end the run after the earlier ones, and an empty list would evaluate nothing."""
    if not shots:
        raise ConfigError("icl.shots: no numbers of examples given; expected e.g. 0,1,4")
    for k in shots:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"icl.shots: {k!r} is not a number of examples >= 0")


def icl(model, tok, v: dict) -> list[dict]:
    from fastpt.icl import PromptFormat, evaluate_multiple_choice
    from fastpt.models import Decoder
    if not isinstance(model, Decoder):
        raise ConfigError(f"task icl needs a decoder model, got {type(model).__name__}")
    items = _limited(_icl_items(v["data"], v["limit"] or 100, seed=5), v["limit"])
    pool = _icl_items(v["pool"], 200, seed=6, key="icl.pool") if v["pool"] else (
        _icl_items(v["data"], 200, seed=6) if v["data"].startswith("world:") else items)
    fmt = PromptFormat(description=v["description"], answer_separator=v["answer_separator"])
    rows = []
    for k in v["shots"]:
        r = evaluate_multiple_choice(model, tok, items, k=k, pool=pool, fmt=fmt, seed=v["seed"],
                                     bos_id=model.config.bos_token_id)
        rows.append({"k": k, "acc": r.acc, "acc_norm": r.acc_norm, "n": r.n})
        print(f"{k}-shot: acc {100 * r.acc:.1f}%  acc_norm {100 * r.acc_norm:.1f}%  (n={r.n})")
    return rows


def classify(path: str, v: dict) -> list[dict]:
    from fastpt.commands.finetune import INFO_FILE, _Collate, _encode, accuracy, load_finetuned
    if not os.path.isfile(os.path.join(path, INFO_FILE)):
        raise ConfigError(f"model: {path} is not a fastpt finetune result (no {INFO_FILE})")
    model, tok, info = load_finetuned(path)
    check_input_file(v["data"], "data")
    all_rows = read_jsonl(v["data"])
    rows = _limited(all_rows, v["limit"])
    text_field, label_field = info.get("text_field", "text"), info.get("label_field", "label")
    records = []
    for i, r in enumerate(rows):
        at = where(v["data"], all_rows, i)
        missing = [f for f in (text_field, label_field) if f not in r]
        if missing:
            raise ValueError(f"{at}: the record has no {' or '.join(map(repr, missing))} (the "
                             f"fields {path} was fine-tuned on)")
        records.append((check_text(r[text_field], at, text_field),
                        check_label(r[label_field], at, label_field)))
    # Keyed by (type, label): JSON's 1 and 1.0 and true must not match the same class.
    label_ids = {label: i for i, label in enumerate(info["labels"])}
    known = {(type(label), label) for label in info["labels"]}
    bad = sorted({repr(label) for _, label in records if (type(label), label) not in known})
    if bad:
        raise ValueError(f"{v['data']}: labels {', '.join(bad)} are not among the model's {info['labels']}")
    examples = _encode(tok, records, label_ids, info["max_length"])
    pad = model.backbone.config.pad_token_id or 0
    acc = accuracy(model, examples, _Collate(pad))
    print(f"accuracy {100 * acc:.1f}% on {len(rows)} examples")
    return [{"accuracy": acc, "n": len(rows)}]


@torch.no_grad()
def perplexity(model, tok, v: dict) -> list[dict]:
    from fastpt.data.datasets import read_documents
    from fastpt.models import Decoder
    if not isinstance(model, Decoder):
        raise ConfigError(f"task perplexity needs a decoder model, got {type(model).__name__}")
    if v["data"] == "world":
        from fastpt.data.world import World
        docs = list(World(0).documents(v["limit"] or 200, seed=12345))
    else:
        docs = _limited(list(read_documents(v["data"])), v["limit"])
    window = model.config.max_position_embeddings
    nll, count = 0.0, 0
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False).ids
        for start in range(0, max(len(ids) - 1, 0), window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                continue
            out = model(input_ids=chunk[:, :-1])
            nll += float(torch.nn.functional.cross_entropy(out.logits[0].float(), chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    if count == 0:
        raise ValueError("the corpus holds no token to predict")
    ppl = math.exp(nll / count)
    print(f"perplexity {ppl:.3f} over {count} tokens ({len(docs)} documents)")
    return [{"perplexity": ppl, "tokens": count, "documents": len(docs)}]


def run(args: argparse.Namespace) -> int:
    from fastpt._atomic import atomic_write_json
    v = resolve(args, OPTIONS)
    if v["model"] is None:
        raise ConfigError("model: required (a model folder)")
    if v["output"]:
        check_output_file(v["output"], "output")
    if v["task"] == "icl":
        check_shots(v["shots"])
    if v["task"] == "classify":
        rows = classify(v["model"], v)
    else:
        model, tok = load_model_and_tokenizer(v["model"])
        rows = icl(model, tok, v) if v["task"] == "icl" else perplexity(model, tok, v)
    if v["output"]:
        atomic_write_json(v["output"], {"task": v["task"], "model": v["model"], "data": v["data"],
                                        "results": rows})
    return 0
