"""``fastpt pretrain``: pre-train an encoder (MLM or ELECTRA) or a decoder (causal LM) on a
text / JSONL / CSV corpus or the embedded world corpus; resumable; runs under torchrun."""

from __future__ import annotations

import argparse
import os

from fastpt.commands.common import (check_output_dir, check_resume_step, checkpoint_root,
                                    is_main_process, save_options, say, trainer_config)
from fastpt.commands.options import (STEADY_ALLOC_HELP, ConfigError, Option, add_options, check_input_file,
                                     options_from_dataclass, resolve, section_values)
from fastpt.train.config import TrainerConfig
from fastpt.train.recipes import MIN_SEQ_LEN, MIN_VOCAB

ENCODER_PRESETS = ("bert-tiny", "bert-small", "bert-base")
DECODER_PRESETS = ("gpt2-tiny", "gpt2-small", "gpt2-base", "llama-tiny", "llama-small", "llama-base")

OPTIONS = [
    Option("output_dir", "str", "runs/pretrain", "folder for checkpoints, metrics, the final model"),
    Option("resume", "bool", False, "continue the run in output_dir from its latest checkpoint"),
    Option("preset", "str", "llama-tiny", "model preset", "model", ENCODER_PRESETS + DECODER_PRESETS),
    Option("init_from", "str", None, "continue pre-training a model folder (HF layout + "
           "tokenizer.json) instead of starting a preset from random weights", "model",
           input_path=True, optional=True),
    Option("objective", "str", "auto", "auto: mlm for encoders, clm for decoders", "model",
           ("auto", "mlm", "electra", "clm")),
    Option("corpus", "str", "world", "'world' (the embedded corpus) or a .txt/.jsonl/.csv file",
           "data"),
    Option("format", "str", "auto", "corpus format (auto: from the extension)", "data",
           ("auto", "text", "jsonl", "csv")),
    Option("field", "str", "text", "JSONL key / CSV column holding the text", "data"),
    Option("n_docs", "int", 20000, "documents drawn from the world corpus", "data", minimum=1),
    Option("vocab_size", "int", 2000, "size of the tokenizer trained on the corpus (at most; BPE needs >= 257)", "data"),
    Option("seq_len", "int", 128, "tokens per training example", "data"),
    Option("tokenizer", "str", None, "a folder with tokenizer.json to use instead of training one",
           "data", input_path=True, optional=True),
    *options_from_dataclass(TrainerConfig, "train", skip=("output_dir", "label_shift", "device"), helps={
        "max_steps": "optimizer steps", "batch_size": "examples per micro-batch per process",
        "lr": "peak learning rate", "bf16": "bf16 autocast", "save_every": "checkpoint every N "
        "steps (0: at the end)", "strategy": "auto, single, ddp or fsdp", "steady_alloc": STEADY_ALLOC_HELP}),
]


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train an encoder (MLM/ELECTRA) or decoder (causal LM) on a corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Pre-train a model from a preset on a corpus (a tokenizer is trained on it unless\n"
            "given). Writes checkpoints, metrics.jsonl/.csv and loss_curve.png into output_dir, and\n"
            "the final model in HF layout (config.json, model.safetensors, tokenizer.json)\n"
            "into output_dir/final. Ctrl-C finishes the current step and saves a checkpoint;\n"
            "--resume continues from it. Several processes: torchrun --nproc-per-node N --no-python\n"
            "fastpt pretrain ... (gloo on CPU, NCCL on GPU)."),
        epilog="Example: fastpt pretrain --config configs/pretrain-decoder.toml --max-steps 100")
    add_options(p, OPTIONS)
    p.set_defaults(func=run, resumable=True)  # --resume continues an interrupted run


def _objective(encoder: bool, objective: str, what: str) -> str:
    if objective == "auto":
        return "mlm" if encoder else "clm"
    if encoder != (objective in ("mlm", "electra")):
        kind = "an encoder" if encoder else "a decoder"
        raise ConfigError(f"model.objective: {objective!r} does not train {kind} ({what})")
    return objective


def _initial_model(path: str | None):
    """(model, tokenizer) to continue from, or (None, None)."""
    if path is None:
        return None, None
    from fastpt.data.tokenizer import load_tokenizer
    from fastpt.models import Decoder, Encoder, from_pretrained
    model = from_pretrained(path)
    if not isinstance(model, (Encoder, Decoder)):
        raise ConfigError(f"model.init_from: {path} holds a {type(model).__name__}; pretrain "
                          "continues encoders and decoders")
    return model, load_tokenizer(path)


def _corpus(v: dict) -> list[str] | None:
    """The documents of data.corpus (None: the world corpus), read before anything is
    written so that an empty or malformed corpus leaves output_dir as it was."""
    from fastpt.data.datasets import read_documents
    if v["corpus"] == "world":
        return None
    check_input_file(v["corpus"], "data.corpus")
    docs = list(read_documents(v["corpus"], None if v["format"] == "auto" else v["format"], v["field"]))
    if not docs:
        raise ConfigError(f"data.corpus: {v['corpus']} holds no documents")
    return docs


def _given_tokenizer(v: dict, resume_from: str | None, init_tokenizer):
    """The tokenizer to train with: a resumed run's own, else data.tokenizer, else model.init_from's;
    None when one is to be trained on the corpus."""
    from fastpt.data.tokenizer import load_tokenizer
    folder, key = (v["output_dir"], "output_dir") if resume_from else (v["tokenizer"], "data.tokenizer")
    if folder is None:
        return init_tokenizer
    try:
        return load_tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _a(kind: str) -> str:
    return f"an {kind}" if kind == "encoder" else f"a {kind}"


def _check_sizes(v: dict, kind: str, tokenizer) -> None:
    """data.seq_len and data.vocab_size against what the objective and tokenizer need."""
    least, why = MIN_SEQ_LEN[kind]
    if v["seq_len"] < least:
        raise ConfigError(f"data.seq_len: expected an integer >= {least} for {_a(kind)} ({why}), "
                          f"got {v['seq_len']}")
    least, what = MIN_VOCAB[kind]
    if tokenizer is None and v["vocab_size"] < least:
        raise ConfigError(f"data.vocab_size: expected an integer >= {least} for the {kind}'s "
                          f"tokenizer ({what}), got {v['vocab_size']}")


def _check_tokenizer(tokenizer, objective: str, key: str) -> None:
    """A given tokenizer must have the special token the objective needs."""
    from fastpt.data.tokenizer import special_ids
    if tokenizer is None:
        return
    field, token = (("eos", "EOS token (</s> or <|endoftext|>)") if objective == "clm" else
                    ("mask", "mask token ([MASK])"))
    if getattr(special_ids(tokenizer), field) is None:
        raise ConfigError(f"{key}: the tokenizer has no {token}, which objective {objective!r} needs")


def _check_continued(v: dict, model, tokenizer, objective: str, key: str) -> None:
    """A model to continue from must take the tokenizer's ids and data.seq_len positions."""
    if model is None:
        return
    if objective == "electra":
        raise ConfigError("model.objective: 'electra' cannot continue model.init_from (it trains a new "
                          "generator); use mlm")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(f"{key}: the tokenizer's {tokenizer.get_vocab_size()} tokens do not fit "
                          f"model.init_from's vocab_size {model.config.vocab_size}")
    if v["seq_len"] > model.config.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {v['seq_len']} > model.init_from's max_position_embeddings "
                          f"{model.config.max_position_embeddings}")


def run(args: argparse.Namespace) -> int:
    from fastpt.train import recipes
    from fastpt.models import Encoder
    v = resolve(args, OPTIONS)
    check_output_dir(v["output_dir"])
    # Check the [train] options now: the recipes build their TrainerConfig only after the
    # options are saved and the tokenizer trained.
    trainer_config(v["output_dir"], section_values(v, OPTIONS, "train"))
    model, tokenizer = _initial_model(v["init_from"])
    encoder = isinstance(model, Encoder) if model is not None else v["preset"] in ENCODER_PRESETS
    objective = _objective(encoder, v["objective"], v["init_from"] or v["preset"])
    resume_from = checkpoint_root(v["output_dir"], v["resume"])
    check_resume_step(resume_from, v["max_steps"])
    docs = _corpus(v)
    if encoder and docs is not None and len(docs) < v["batch_size"]:
        # the Trainer said only "the training data yields no batch", naming no document count
        raise ConfigError(f"data.corpus: {v['corpus']} holds {len(docs)} document(s); an encoder trains on "
                          f"one example per document and needs at least train.batch_size = "
                          f"{v['batch_size']} (in a .txt corpus, blank lines separate documents)")
    tokenizer = _given_tokenizer(v, resume_from, tokenizer)
    tokenizer_from = ("output_dir" if resume_from else "data.tokenizer" if v["tokenizer"] else
                      "model.init_from")
    _check_sizes(v, "encoder" if encoder else "decoder", tokenizer)
    _check_tokenizer(tokenizer, objective, tokenizer_from)
    _check_continued(v, model, tokenizer, objective, tokenizer_from)
    # Every option has been checked: only now is anything written into output_dir.
    save_options(v["output_dir"], "pretrain", v)
    trainer = section_values(v, OPTIONS, "train")
    common = dict(preset=v["preset"], n_docs=v["n_docs"], vocab_size=v["vocab_size"],
                  seq_len=v["seq_len"], docs=docs, tokenizer=tokenizer, model=model,
                  resume_from=resume_from, **trainer)
    say(f"pre-training {v['init_from'] or v['preset']} ({objective}) -> {v['output_dir']}"
        + (f", resuming from {resume_from}" if resume_from else ""))
    if objective == "clm":
        result = recipes.pretrain_decoder(v["output_dir"], **common)
    else:
        result = recipes.pretrain_encoder(v["output_dir"], objective=objective, **common)
    final = os.path.join(v["output_dir"], "final")
    if is_main_process():
        recipes.save_pretrained_with_tokenizer(result, final)
    last = result.metrics[-1] if result.metrics else {}
    say(f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}; model in {final}")
    return 0
