"""Trainer checks under torchrun (2 gloo processes), run by tests/test_trainer_ddp.py: each
writes its numbers, with a one-process float64 reference where there is one, to <out>/results.json.

  loss_fn      gradient of one step with a loss_fn (and without) vs the one-batch reference
  eval         evaluate() over 5 examples (not a multiple of 2) under DDP and FSDP, and over
               1 example (process 1 has none), vs the reference
  masks        whether the two ranks drew the same MLM masks at each step
  packed       a PackedDataset whose ranks get unequal shares: interrupted and resumed vs not
  encoders     MLM (Encoder) and ELECTRA under DDP and FSDP with grad_accum=2: their final
               weights, which the test compares with one process; and a model with an unused
               parameter under DDP, whose step must be refused with the parameter's name
"""

import copy
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from train_tiny import TinyLM, make_data  # noqa: E402

from fastpt.data.datasets import PackedDataset, pad_batch  # noqa: E402
from fastpt.models import Encoder, EncoderConfig  # noqa: E402
from fastpt.pretrain.clm import collate_packed  # noqa: E402
from fastpt.pretrain.electra import Electra  # noqa: E402
from fastpt.pretrain.mlm import MLMCollator  # noqa: E402
from fastpt.train import Trainer, TrainerConfig  # noqa: E402
from fastpt.train.interrupt import TrainingInterrupted  # noqa: E402

# The output folder when run by torchrun; tests/test_trainer_loop_resume.py and
# tests/test_trainer_loop_steps.py import this file for its models only.
OUT = sys.argv[1] if __name__ == "__main__" else None


def config(out, **overrides):
    cfg = dict(output_dir=out, max_steps=1, batch_size=4, lr=1e-2, label_shift=1, progress=False,
               schedule="constant", max_grad_norm=None, keep_last=5, log_every=1)
    cfg.update(overrides)
    return TrainerConfig(**cfg)


def reference_grads(model, data):
    m = copy.deepcopy(model).double()
    m(**torch.utils.data.default_collate(data))["loss"].backward()
    return {n: p.grad.float() for n, p in m.named_parameters()}


def reference_eval(model, data):
    m = copy.deepcopy(model).double().eval()
    num = den = 0.0
    with torch.no_grad():
        for d in data:
            n = int((d["labels"][1:] != -100).sum())
            num += float(m(**torch.utils.data.default_collate([d]))["loss"]) * n
            den += n
    return num / den


def max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def check_loss_fn(results):
    data = make_data()[:8]

    def loss_fn(model, batch):
        return model(**batch)["loss"], (batch["labels"][:, 1:] != -100).sum()
    for name, fn in (("default", None), ("loss_fn", loss_fn)):
        torch.manual_seed(0)
        t = Trainer(TinyLM(dropout=0.0), config(f"{OUT}/lf-{name}"), data, loss_fn=fn)
        ref = reference_grads(t.model, data)
        grads = {}
        t.optimizer.register_step_pre_hook(lambda *_: grads.update(
            {n: p.grad.clone() for n, p in t.model.named_parameters()}))
        t.train_step([torch.utils.data.default_collate(data[t.rank::t.world])])
        results[f"loss_fn.{name}"] = max_rel(grads, ref)


def check_eval(results):
    for name, n, strategy in (("ddp5", 5, "auto"), ("fsdp5", 5, "fsdp"), ("ddp1", 1, "auto")):
        data = make_data()[:n]
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        ref = reference_eval(model, data)  # before FSDP shards it
        t = Trainer(model, config(f"{OUT}/ev-{name}", batch_size=2, strategy=strategy),
                    make_data(), eval_data=data)
        results[f"eval.{name}"] = [t.evaluate(), ref]


class TinyMLM(torch.nn.Module):
    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}


def check_masks(results):
    g = torch.Generator().manual_seed(5)
    # The same examples on both ranks: only the masks can tell the ranks apart.
    data = [{"input_ids": torch.randint(4, 40, (10,), generator=g).tolist()}] * 40
    torch.manual_seed(0)
    t = Trainer(TinyMLM(), config(f"{OUT}/masks", max_steps=4, label_shift=0), data,
                collate_fn=MLMCollator(40, 3, 0, [0, 1, 2, 3], seed=0))
    masks = []
    step = t.train_step
    t.train_step = lambda micro: (masks.append(micro[0]["labels"] != -100), step(micro))[1]
    t.train()
    mine = torch.stack(masks).int()
    theirs = [torch.zeros_like(mine) for _ in range(t.world)]
    dist.all_gather(theirs, mine)
    results["masks.same_per_step"] = [bool(torch.equal(theirs[0][s], theirs[1][s])) for s in range(len(masks))]


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


class WordTokenizer:  # each whitespace-separated number is its token id
    def encode_batch(self, docs, add_special_tokens=False):
        return [_Encoding([int(w) for w in d.split()]) for d in docs]


class PackedLM(TinyLM):
    def forward(self, input_ids, labels=None, position_ids=None, document_ids=None):
        return super().forward(input_ids, labels)


def check_packed(results):
    g = torch.Generator().manual_seed(0)
    # 11 blocks of 8 tokens: rank 0 gets 6 (3 batches of 2), rank 1 gets 5 (2 batches), so the
    # ranks reach the end of an epoch at different steps.
    docs = [" ".join(str(int(x)) for x in torch.randint(2, 50, (7,), generator=g)) for _ in range(11)]
    data = PackedDataset(lambda: docs, WordTokenizer(), seq_len=8, eos_id=1)

    def make(out):
        torch.manual_seed(0)
        return Trainer(PackedLM(dropout=0.0), config(out, max_steps=8, batch_size=2), data,
                       collate_fn=collate_packed)
    full = make(f"{OUT}/packed-full")
    full.train()
    cut = make(f"{OUT}/packed-cut")
    train_until_interrupted(cut, at_step=4)
    resumed = make(f"{OUT}/packed-cut")
    resumed.train(resume_from=f"{OUT}/packed-cut/checkpoints")
    results["packed.positions_at_stop"] = [cut.epoch, cut.batches_in_epoch]
    results["packed.max_weight_diff"] = max(float((a - b).abs().max()) for a, b in
                                            zip(full.model.parameters(), resumed.model.parameters()))


def masked_examples(n: int = 32, vocab: int = 40, mask_id: int = 3, nsp: bool = False) -> list[dict]:
    """MLM examples of 5 to 12 tokens with their masks already drawn (about 15%, at least one), so
    that one process and two draw the same ones; with ``nsp``, also segment ids (two halves)
    and a next-sentence label each."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids = torch.randint(4, vocab, (int(torch.randint(5, 13, (), generator=g)),), generator=g)
        picked = torch.rand(ids.shape, generator=g) < 0.15
        picked[int(torch.randint(len(ids), (), generator=g))] = True
        out.append({"input_ids": torch.where(picked, mask_id, ids).tolist(),
                    "labels": torch.where(picked, ids, -100).tolist()})
        if nsp:
            out[-1]["token_type_ids"] = [int(j >= len(ids) // 2) for j in range(len(ids))]
            out[-1]["next_sentence_label"] = i % 2
    return out


def pad_collate(examples: list[dict]) -> dict:
    ids, mask = pad_batch([e["input_ids"] for e in examples], 0, None)
    labels, _ = pad_batch([e["labels"] for e in examples], -100, None)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def nsp_collate(examples: list[dict]) -> dict:
    """pad_collate plus the segment ids and next-sentence labels of masked_examples(nsp=True)."""
    segments, _ = pad_batch([e["token_type_ids"] for e in examples], 0, None)
    return {**pad_collate(examples), "token_type_ids": segments,
            "next_sentence_label": torch.tensor([e["next_sentence_label"] for e in examples])}


def encoder_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = EncoderConfig.from_name("bert-tiny", vocab_size=40, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    return Electra(cfg) if kind == "electra" else Encoder(cfg)


def argmax_sampling(probs, n):
    """ELECTRA's replacements without randomness: each rank's RNG draws its own, one process others."""
    return probs.argmax(-1, keepdim=True)


def train_encoder(kind: str, out: str, batch_size: int, strategy: str = "auto") -> Trainer:
    multinomial, torch.multinomial = torch.multinomial, argmax_sampling
    try:
        t = Trainer(encoder_model(kind), config(out, max_steps=3, batch_size=batch_size, grad_accum=2,
                                                label_shift=0, strategy=strategy),
                    masked_examples(nsp=kind == "mlm_nsp"),
                    collate_fn=nsp_collate if kind == "mlm_nsp" else pad_collate)
        t.train()
    finally:
        torch.multinomial = multinomial
    return t


def train_decoder_classifier(out: str) -> str:
    """A classifier head on a Decoder leaves the decoder's LM head without gradient: "ok", or
    the error of the step that refused it."""
    from fastpt.finetune.heads import SequenceClassifier
    from fastpt.models import Decoder, DecoderConfig
    torch.manual_seed(0)
    model = SequenceClassifier(Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=64)), num_labels=2)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (6,), generator=gen), "attention_mask": torch.ones(6, dtype=torch.bool),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    try:
        Trainer(model, config(out, max_steps=2, label_shift=0), data).train()
    except RuntimeError as e:
        return str(e)[:300]
    return "ok"


def interrupt_during(trainer: Trainer, step: int) -> None:
    """SIGINT arrives while ``step`` runs (the way Ctrl-C would)."""
    train_step = trainer.train_step

    def signalled(micro):
        stats = train_step(micro)
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return stats
    trainer.train_step = signalled


def train_until_interrupted(trainer: Trainer, at_step: int) -> None:
    """Train as a run that gets SIGINT during step ``at_step``: it saves and stops there.
    A run that is not stopped there fails: a resume from its end would compare a finished
    run with itself and prove nothing."""
    interrupt_during(trainer, at_step)
    try:
        trainer.train()
    except TrainingInterrupted as stopped:
        if stopped.step != at_step or trainer.step != at_step:
            raise AssertionError(f"interrupted at step {stopped.step} (trainer at {trainer.step}), "
                                 f"not at step {at_step}") from stopped
        return
    raise AssertionError(f"SIGINT during step {at_step} did not stop the run: it trained to step {trainer.step}")


def check_encoders(results):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    results["encoders.dir"] = OUT
    for kind in ("mlm", "mlm_nsp", "electra"):
        for strategy in ("ddp", "fsdp"):
            key = f"encoders.{kind}.{strategy}"
            try:
                t = train_encoder(kind, f"{OUT}/{key}", 4, strategy)
            except RuntimeError as e:  # DDP's "parameters that were not used in producing loss"
                results[key] = str(e)[:300]
                continue
            weights = get_model_state_dict(t.wrapped, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
            if t.rank == 0:
                save_file({k: v.contiguous() for k, v in weights.items()}, f"{OUT}/{key}.safetensors")
            results[key] = "ok"
    results["encoders.decoder_classifier"] = train_decoder_classifier(f"{OUT}/decoder_classifier")
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    model.unused = torch.nn.Linear(2, 2)
    t = Trainer(model, config(f"{OUT}/unused", max_steps=2), make_data())
    try:
        t.train()
        results["encoders.unused"] = None
    except RuntimeError as e:
        results["encoders.unused"] = [t.step, str(e)]


def main() -> int:
    results: dict = {}
    for check in (check_loss_fn, check_eval, check_masks, check_packed, check_encoders):
        check(results)
    rank = dist.get_rank()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if rank == 0:
        with open(os.path.join(OUT, "results.json"), "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
