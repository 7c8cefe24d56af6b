"""Trainer under torchrun with 2 gloo processes: a loss_fn's gradient, evaluation counting
every example once, per-rank MLM masks, exact resume of an iterable dataset whose ranks
get unequal shares, MLM and ELECTRA encoders under DDP and FSDP matching one process, and a
parameter without gradient refused by name (one torchrun launch of tests/scripts/trainer_ddp_checks.py); per-rank
global RNGs (dropout masks, ELECTRA's sampling) with the same weights on every rank, and exact
resume with dropout (one torchrun launch of this file, see _rng_main)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fastpt.data.datasets import PackedDataset, seed_collator
from fastpt.models import EncoderConfig
from fastpt.pretrain.clm import collate_packed
from fastpt.pretrain.electra import Electra
from fastpt.pretrain.mlm import MLMCollator
from fastpt.train import Trainer

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "trainer_ddp_checks.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
from train_tiny import TinyLM, make_data  # noqa: E402
from trainer_ddp_checks import (PackedLM, WordTokenizer, argmax_sampling, config, train_encoder,  # noqa: E402
                                train_until_interrupted)


def _torchrun(script, out, results_file):
    """Run ``script out`` in 2 gloo processes; returns every rank's results that it wrote."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", script, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((out / results_file).read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _torchrun(SCRIPT, tmp_path_factory.mktemp("ddp"), "results.json")


def test_loss_fn_gradient_under_ddp_is_the_one_large_batch_gradient(results):
    # Was 2x the reference (each rank's mean times the world size, then DDP's average).
    for rank in results:
        assert rank["loss_fn.loss_fn"] < 1e-5 and rank["loss_fn.default"] < 1e-5, rank


@pytest.mark.parametrize("case", ["ddp5", "fsdp5", "ddp1"])
def test_evaluation_counts_every_example_once(results, case):
    # 5 examples on 2 ranks: DistributedSampler's padding counted example 0 twice (-2.3e-3).
    # ddp1: process 1 holds no example and still joins (FSDP needs the same forwards on each).
    for rank in results:
        got, reference = rank[f"eval.{case}"]
        assert abs(got - reference) < 1e-6 * reference, (case, got, reference)


def test_ranks_draw_different_mlm_masks(results):
    assert not any(results[0]["masks.same_per_step"]), results[0]["masks.same_per_step"]  # were all True


def test_iterable_dataset_with_unequal_shares_resumes_exactly(results):
    # The ranks were at different places in their data when interrupted (rank 1 one batch
    # further); only rank 0's position was saved, and the resumed weights differed by 1.8e-2.
    assert results[0]["packed.positions_at_stop"] != results[1]["packed.positions_at_stop"]
    assert results[0]["packed.max_weight_diff"] == 0.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["mlm", "mlm_nsp", "electra"])
def test_encoder_pretraining_under_torchrun_matches_one_process(results, tmp_path, monkeypatch, kind, strategy):
    # DDP failed at step 2 ("parameters that were not used in producing loss"): the Encoder ran its
    # pooler and NSP head for MLM, and ELECTRA leaves 18 parameter tensors without gradient.
    key = f"encoders.{kind}.{strategy}"
    assert results[0][key] == "ok", results[0][key]
    monkeypatch.setattr(torch, "multinomial", argmax_sampling)
    one = train_encoder(kind, str(tmp_path), batch_size=8)  # the same global micro-batches
    two = load_file(os.path.join(results[0]["encoders.dir"], f"{key}.safetensors"))
    mine = one.model.state_dict()
    assert mine.keys() == two.keys()
    # AdamW's first steps move each weight by about +-lr (1e-2) whatever the gradient's size, so
    # float noise in a small gradient moves it by up to ~1e-5; a wrong gradient would move it by lr.
    # Not the key biases: their gradient is 0 in exact arithmetic (softmax ignores a shift shared
    # by all keys), and AdamW turns the noise that stands for it into steps of +-lr.
    off = {k: float((two[k] - mine[k]).abs().max()) for k in two if not k.endswith("k_proj.bias")}
    assert max(off.values()) < 1e-4, sorted(off.items(), key=lambda kv: -kv[1])[:5]


def test_a_classifier_head_on_a_decoder_trains_under_ddp(results):
    # The head leaves the decoder's LM head without gradient; the heads declare it for DDP.
    assert [rank["encoders.decoder_classifier"] for rank in results] == ["ok", "ok"]


def test_parameter_without_gradient_under_ddp_is_refused_by_name(results):
    # Was refused by DDP only at step 2, after a step whose gradients were partly not all-reduced.
    for rank in results:
        step, message = rank["encoders.unused"]
        assert step == 0 and "step 1" in message and "unused.weight" in message, message
        assert "ddp_find_unused_parameters" in message


# -- the global RNGs per rank ---------------------------------------------------------------------
# This file is also the worker script: under torchrun (`python -m torch.distributed.run
# --nproc_per_node 2 --standalone tests/test_trainer_ddp.py OUT`) it runs the _rng_check_*
# functions below, and rank 0 writes every rank's numbers to OUT/rng_results.json.

@pytest.fixture(scope="module")
def rng_results(tmp_path_factory):
    return _torchrun(os.path.abspath(__file__), tmp_path_factory.mktemp("ddp-rng"), "rng_results.json")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_draw_different_dropout_masks_from_the_same_weights(rng_results, strategy):
    # The same batch on both ranks, dropout 0.5: the ranks' own (not all-reduced) losses of the
    # first step differ only if their masks do. They were equal: every rank seeded torch alike.
    first, second = (rank[f"dropout.{strategy}.local_losses"] for rank in rng_results)
    assert first[0] != second[0], (first, second)
    assert first[1] != second[1]  # and still at the second step
    if strategy == "ddp":  # replicated weights: the same on each rank after construction and steps
        for rank in rng_results:
            assert rank["dropout.ddp.same_weights"] == [True, True, True], rank["dropout.ddp.same_weights"]


def test_ranks_draw_different_global_rng_streams(rng_results):
    # torch, NumPy and Python all differ per rank; ELECTRA's replacements, sampled from torch's
    # generator for the same masked batch, too (they were the same on both ranks).
    for key in ("streams.torch", "streams.numpy", "streams.python", "electra.sampled"):
        assert rng_results[0][key] != rng_results[1][key], key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_run_with_dropout_resumes_exactly_from_every_ranks_rng(rng_results, strategy):
    # The unequal-shares run of test_iterable_dataset_with_unequal_shares_resumes_exactly, with
    # dropout 0.1: the checkpoint holds both ranks' RNG states (it held rank 0's alone, which
    # would have been rank 1's too once ranks drew their own masks: 2.1e-2 off).
    for rank in rng_results:
        assert rank[f"resume.{strategy}.saved_rng_processes"] == 2
        assert rank[f"resume.{strategy}.saved_rng_differ"]
        assert rank[f"resume.{strategy}.max_weight_diff"] == 0.0
        assert len(rank[f"resume.{strategy}.losses_full"]) == 4  # steps 5 to 8: not two empty lists
        assert rank[f"resume.{strategy}.losses_after_resume"] == rank[f"resume.{strategy}.losses_full"]


def _rng_check_dropout(out, results):
    def gathered(x):
        everyone = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, x)
        return everyone

    def same_weights(t):
        flat = torch.cat([p.detach().flatten() for p in t.model.parameters()])
        return all(torch.equal(flat, other) for other in gathered(flat))

    batch = torch.utils.data.default_collate(make_data()[:4])  # the same on both ranks
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        local = []

        def loss_fn(model, b):
            loss = model(**b)["loss"]
            local.append(float(loss))
            return loss, (b["labels"][:, 1:] != -100).sum()
        t = Trainer(TinyLM(dropout=0.5), config(f"{out}/dropout-{strategy}", strategy=strategy), make_data(),
                    loss_fn=loss_fn)
        # DDP's weights are replicas (FSDP's are shards, of one copy): after construction and
        # after each step, every rank's equal the others'.
        weights = [same_weights(t)] if strategy == "ddp" else []
        for _ in range(2):
            t.train_step([batch])
            if strategy == "ddp":
                weights.append(same_weights(t))
        results[f"dropout.{strategy}.local_losses"] = local
        if weights:
            results[f"dropout.{strategy}.same_weights"] = weights


def _rng_check_streams(out, results):
    torch.manual_seed(0)
    Trainer(TinyLM(), config(f"{out}/streams"), make_data())
    results["streams.torch"] = torch.rand(4).tolist()
    results["streams.numpy"] = np.random.rand(4).tolist()
    results["streams.python"] = [random.random() for _ in range(4)]

    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(4, 40, (10,), generator=g).tolist()} for _ in range(4)]
    collator = MLMCollator(40, 3, 0, [0, 1, 2, 3], seed=0)
    seed_collator(collator, 0)
    batch = collator(examples)  # the same masks on both ranks: only ELECTRA's sampling can differ
    torch.manual_seed(0)
    model = Electra(EncoderConfig.from_name("bert-tiny", vocab_size=40, pad_token_id=0,
                                            dropout=0.0, attention_dropout=0.0))
    t = Trainer(model, config(f"{out}/electra", label_shift=0), examples, collate_fn=collator)
    sampled, multinomial = [], torch.multinomial

    def recording(*args, **kwargs):
        sampled.append(multinomial(*args, **kwargs))
        return sampled[-1]
    torch.multinomial = recording
    try:
        with torch.no_grad():  # the forward of a training step, without DDP's gradient sync
            t.model.train()(**batch)
    finally:
        torch.multinomial = multinomial
    results["electra.sampled"] = torch.cat(sampled).tolist()


def _rng_check_resume(out, results):
    g = torch.Generator().manual_seed(0)
    # 11 blocks of 8 tokens: rank 0 gets 6 (3 batches of 2), rank 1 gets 5 (2 batches).
    docs = [" ".join(str(int(x)) for x in torch.randint(2, 50, (7,), generator=g)) for _ in range(11)]
    data = PackedDataset(lambda: docs, WordTokenizer(), seq_len=8, eos_id=1)

    def local(p):
        return p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP: this rank's shard

    for strategy in ("ddp", "fsdp"):
        def make(run):
            torch.manual_seed(0)
            return Trainer(PackedLM(dropout=0.1), config(f"{out}/resume-{strategy}-{run}", max_steps=8, batch_size=2,
                                                         strategy=strategy), data, collate_fn=collate_packed)
        full = make("full")
        full.train()
        cut = make("cut")
        train_until_interrupted(cut, at_step=4)
        saved = f"{out}/resume-{strategy}-cut/checkpoints/step-4"
        with open(f"{saved}/trainer_state.json") as f:
            saved_rng = json.load(f)["rng"]
        saved_tensors = load_file(f"{saved}/optimizer.safetensors")
        resumed = make("cut")
        resumed.train(resume_from=f"{out}/resume-{strategy}-cut/checkpoints")
        key = f"resume.{strategy}"
        # Process 0's states in rng / rng.torch, process 1's in rng.other_ranks[0] / rng.1.torch.
        results[f"{key}.saved_rng_processes"] = 1 + len(saved_rng.get("other_ranks", []))
        results[f"{key}.saved_rng_differ"] = (
            "rng.1.torch" in saved_tensors
            and not torch.equal(saved_tensors["rng.torch"], saved_tensors["rng.1.torch"]))
        results[f"{key}.max_weight_diff"] = max(float((local(a) - local(b)).abs().max()) for a, b in
                                                zip(full.model.parameters(), resumed.model.parameters()))
        results[f"{key}.losses_full"] = [r["loss"] for r in full.metrics.rows if r["step"] > 4]
        results[f"{key}.losses_after_resume"] = [r["loss"] for r in resumed.metrics.rows if r["step"] > 4]


def _rng_main(out: str) -> int:
    results: dict = {}
    for check in (_rng_check_dropout, _rng_check_streams, _rng_check_resume):
        check(out, results)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "rng_results.json"), "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_rng_main(sys.argv[1]))
