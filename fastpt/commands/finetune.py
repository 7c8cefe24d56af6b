"""``fastpt finetune``: fine-tune a pre-trained model folder for text classification with any
fastpt.finetune strategy (full, partial, probe, LoRA, int8 LoRA, adapters, prefix, prompt,
IA3, BitFit); resumable; runs under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from fastpt.commands.common import (check_label, check_output_dir, check_resume_step, check_text,
                                    checkpoint_root, is_main_process, read_jsonl, save_options,
                                    say, trainer_config, where)
from fastpt.commands.options import (STEADY_ALLOC_HELP, ConfigError, Option, add_options, check_input_file,
                                     options_from_dataclass, resolve, section_values)
from fastpt.finetune.strategies import STRATEGIES, FinetuneConfig
from fastpt.train.config import TrainerConfig

WORLD_TASK = "world:sentiment"
MERGEABLE = ("full", "partial", "probe", "lora", "ia3", "bitfit")
INFO_FILE = "finetune.json"   # base model, label names, pooling: what eval needs to reload

OPTIONS = [
    Option("output_dir", "str", "runs/finetune", "folder for checkpoints, metrics, the result"),
    Option("resume", "bool", False, "continue the run in output_dir from its latest checkpoint"),
    Option("save", "str", "auto", "merged: full HF-layout model; adapter: trainable tensors only; "
           "auto: merged where the strategy can be merged", choices=("auto", "merged", "adapter")),
    Option("base", "str", None, "pre-trained model folder (HF layout + tokenizer.json), e.g. the "
           "final/ folder of fastpt pretrain", "model", input_path=True, optional=True),
    Option("pooling", "str", None, "cls, mean or last (default: cls for encoders, last for "
           "decoders)", "model", ("cls", "mean", "last"), optional=True),
    Option("train", "str", WORLD_TASK, f"JSONL with text and label per line, or {WORLD_TASK!r}",
           "data"),
    Option("test", "str", None, f"JSONL to report accuracy on (with {WORLD_TASK!r} training: the "
           "world's held-out reviews)", "data", optional=True),
    Option("text_field", "str", "text", "", "data"),
    Option("label_field", "str", "label", "", "data"),
    Option("max_length", "int", 128, "tokens per example (longer ones are truncated)", "data",
           minimum=1),
    Option("n_train", "int", 200, f"examples of {WORLD_TASK!r}", "data", minimum=1),
    *[dataclasses.replace(o, kind="names") if o.name == "target_modules" else o  # --target-modules q_proj,v_proj
      for o in options_from_dataclass(FinetuneConfig, "finetune", helps={"strategy": ", ".join(STRATEGIES)})],
    *options_from_dataclass(TrainerConfig, "train", skip=("output_dir", "label_shift", "device"),
                            rename={"strategy": "distributed"},
                            helps={"strategy": "auto, single, ddp or fsdp", "steady_alloc": STEADY_ALLOC_HELP}),
]


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pre-trained model for text classification (any strategy)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fine-tune model.base for classification on data.train (JSONL: {\"text\": ...,\n"
            "\"label\": ...} per line; labels may be strings or integers), with the strategy of\n"
            "finetune.strategy. Reports test accuracy when data.test is given, and saves the\n"
            "result into output_dir/final: a merged model (loads with fastpt eval/generate\n"
            "and fastpt.finetune.load_merged) or adapter files (with finetune.json naming the\n"
            "base). Ctrl-C saves a checkpoint; --resume continues."),
        epilog="Example: fastpt finetune --config configs/finetune-lora.toml")
    add_options(p, OPTIONS)
    p.set_defaults(func=run, resumable=True)  # --resume continues an interrupted run


def _examples(v: dict) -> tuple[list[dict], list[dict] | None]:
    if v["train"] == WORLD_TASK:
        from fastpt.data.world import World
        world = World(v["seed"])
        # Labels on half of the adjectives, test on the other half (see World.sentiment).
        train = world.sentiment(v["n_train"], seed=1, adjectives="seen")
        test = world.sentiment(1000, seed=2, adjectives="unseen") if v["test"] is None else None
        return train, test
    for key in ("train", "test"):
        if v[key] is not None:
            check_input_file(v[key], f"data.{key}")
    return read_jsonl(v["train"]), None


def _records(rows: list[dict], v: dict, path: str) -> list[tuple[str, object]]:
    out = []
    for i, row in enumerate(rows):
        at = where(path, rows, i)
        missing = [f for f in (v["text_field"], v["label_field"]) if f not in row]
        if missing:
            raise ValueError(f"{at}: the record has no {' or '.join(map(repr, missing))}")
        out.append((check_text(row[v["text_field"]], at, v["text_field"]),
                    check_label(row[v["label_field"]], at, v["label_field"])))
    return out


class _Collate:
    """Tokenized examples -> a right-padded batch for the task head."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        from fastpt.data.datasets import pad_batch
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e["label"] for e in examples])}


def _encode(tok, records, label_ids: dict, max_length: int) -> list[dict]:
    from fastpt.data.datasets import encode_as_text
    encodings = encode_as_text(tok, [text for text, _ in records], max_length=max_length)
    for i, (e, (text, _)) in enumerate(zip(encodings, records)):
        if not e.ids:  # the classifier pools a token: it needs one
            raise ValueError(f"example {i + 1}: text {text[:40]!r} encodes to no tokens")
    return [{"input_ids": e.ids, "label": label_ids[label]} for e, (_, label) in zip(encodings, records)]


@torch.no_grad()
def accuracy(model, examples: list[dict], collate, batch_size: int = 64) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hits += int((logits.argmax(-1) == batch["labels"]).sum())
    return hits / len(examples)


def _classifier(v: dict, config: FinetuneConfig, n_labels: int):
    """(tokenizer, model to train, pad id) for model.base, built before anything is written:
    a base without tokenizer.json, or a strategy the base does not support, is an option error."""
    from fastpt.data.tokenizer import load_tokenizer, special_ids
    from fastpt.finetune import SequenceClassifier, prepare
    from fastpt.models import from_pretrained
    try:
        tok = load_tokenizer(v["base"])
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.base: {e}") from None
    backbone = from_pretrained(v["base"])
    pad = backbone.config.pad_token_id if backbone.config.pad_token_id is not None else special_ids(tok).pad
    model = SequenceClassifier(backbone, n_labels, pooling=v["pooling"])
    try:
        model = prepare(model, config)
    except (TypeError, ValueError) as e:  # e.g. prefix tuning of an encoder, BitFit without biases
        raise ConfigError(f"finetune.strategy: {config.strategy!r} does not apply to model.base "
                          f"{v['base']}: {e}") from None
    return tok, model, pad


def run(args: argparse.Namespace) -> int:
    from fastpt.finetune import trainable_parameters_summary
    from fastpt.train import Trainer
    v = resolve(args, OPTIONS)
    if v["base"] is None:
        raise ConfigError("model.base: required (a model folder, e.g. runs/pretrain/final)")
    check_output_dir(v["output_dir"])
    resume_from = checkpoint_root(v["output_dir"], v["resume"])
    trainer_config_ = trainer_config(v["output_dir"], section_values(v, OPTIONS, "train"))
    try:
        finetune_config = FinetuneConfig(**section_values(v, OPTIONS, "finetune"))
    except TypeError as e:  # e.g. a list item of the wrong type, which the TOML check lets by
        raise ConfigError(f"finetune: {e}") from None
    save_mode = v["save"] if v["save"] != "auto" else (
        "merged" if finetune_config.strategy in MERGEABLE else "adapter")
    if save_mode == "merged" and finetune_config.strategy not in MERGEABLE:
        raise ConfigError(f"save: {finetune_config.strategy!r} cannot be merged; use save = \"adapter\"")
    train_rows, test_rows = _examples(v)
    if v["test"] is not None:
        test_rows = read_jsonl(v["test"])
    train = _records(train_rows, v, v["train"])
    test = _records(test_rows, v, v["test"] or WORLD_TASK) if test_rows else []
    labels = sorted({label for _, label in train}, key=lambda x: (str(type(x)), x))
    if len(labels) < 2:
        raise ValueError(f"{v['train']}: classification needs at least 2 distinct labels in "
                         f"{v['label_field']!r}, got {labels}")
    unknown = sorted({str(label) for _, label in test if label not in labels})
    if unknown:
        raise ValueError(f"data.test has labels never seen in training: {unknown}")
    label_ids = {label: i for i, label in enumerate(labels)}
    check_resume_step(resume_from, trainer_config_.max_steps)
    tok, model, pad = _classifier(v, finetune_config, len(labels))
    train_examples = _encode(tok, train, label_ids, v["max_length"])
    test_examples = _encode(tok, test, label_ids, v["max_length"]) if test else []
    # Every option has been checked: only now is anything written into output_dir.
    save_options(v["output_dir"], "finetune", v)

    say(trainable_parameters_summary(model))
    collate = _Collate(pad)
    trainer = Trainer(model, trainer_config_, train_examples, collate_fn=collate)
    say(f"fine-tuning {v['base']} with {finetune_config.strategy} on {len(train)} examples, "
        f"{len(labels)} labels -> {v['output_dir']}")
    trainer.train(resume_from)
    result = {"strategy": finetune_config.strategy, "labels": labels,
              "final_loss": trainer.metrics.rows[-1]["loss"] if trainer.metrics.rows else None}
    if test:
        result["test_accuracy"] = accuracy(model, test_examples, collate)
        result["n_test"] = len(test)
        say(f"test accuracy: {100 * result['test_accuracy']:.1f}% on {len(test)} examples")
    if is_main_process():
        _save(model, tok, finetune_config, save_mode, v, labels, result)
    return 0


def _save(model, tok, config, mode, v, labels, result) -> None:
    from fastpt._atomic import atomic_write_json
    from fastpt.data.tokenizer import save_tokenizer
    from fastpt.finetune.save import save_adapter, save_merged
    final = os.path.join(v["output_dir"], "final")
    if mode == "merged":
        save_merged(model, final)
    else:
        save_adapter(model, final, config)
    save_tokenizer(tok, final)
    head = getattr(model, "model", model)
    atomic_write_json(os.path.join(final, INFO_FILE), {
        "base": os.path.abspath(v["base"]), "saved_as": mode, "labels": labels,
        "pooling": head.pooling, "max_length": v["max_length"],
        "text_field": v["text_field"], "label_field": v["label_field"]})
    atomic_write_json(os.path.join(v["output_dir"], "result.json"), result)
    say(f"saved ({mode}) in {final}")


def load_finetuned(path: str):
    """(model, tokenizer, info) of a ``fastpt finetune`` result folder, merged or adapter."""
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.finetune import SequenceClassifier, load_adapter, load_merged
    from fastpt.models import from_pretrained
    info_file = os.path.join(path, INFO_FILE)
    try:
        with open(info_file, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: not a fastpt finetune result (no {INFO_FILE})") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{info_file}: not readable JSON ({e})") from None
    _check_info(info, info_file)
    if info["saved_as"] == "merged":
        model = load_merged(path)
        if getattr(model, "num_labels", None) != len(info["labels"]):
            raise ValueError(f"{info_file}: 'labels' has {len(info['labels'])} labels, but the model in "
                             f"{path} is a {type(model).__name__} with num_labels "
                             f"{getattr(model, 'num_labels', None)}")
    else:
        head = SequenceClassifier(from_pretrained(info["base"]), len(info["labels"]),
                                  pooling=info["pooling"])
        model = load_adapter(head, path)
    return model.eval(), load_tokenizer(path), info


def _check_info(info, file: str) -> None:
    """What load_finetuned and fastpt eval read from finetune.json, as _save writes it."""
    from fastpt.finetune.heads import POOLINGS
    if not isinstance(info, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(info).__name__}")
    labels = info.get("labels")
    checks = {
        "saved_as": (info.get("saved_as") in ("merged", "adapter"), "'merged' or 'adapter'"),
        "labels": (isinstance(labels, list) and labels
                   and all(isinstance(x, (str, int, float)) for x in labels)
                   and len(set(labels)) == len(labels), "a non-empty list of distinct labels"),
        "max_length": (isinstance(info.get("max_length"), int) and not isinstance(info.get("max_length"), bool)
                       and info["max_length"] >= 1, "an integer >= 1"),
        "pooling": (info.get("pooling") in POOLINGS, f"one of {POOLINGS}"),
    }
    if info.get("saved_as") == "adapter":
        checks["base"] = (isinstance(info.get("base"), str), "the base model's folder")
    for field, (ok, expected) in checks.items():
        if not ok:
            shown = repr(info[field]) if field in info else "missing"
            raise ValueError(f"{file}: '{field}' must be {expected}, got {shown}")
