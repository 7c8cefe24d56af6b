"""Trainer runs stopped and resumed: exact resume with DataLoader workers, stop requests on save
steps, evaluation that changes nothing, and the metrics files of a resumed run."""

import json
import os
import sys

import pytest
import torch

from fastpt._atomic import sha256_json
from fastpt.data.datasets import PackedDataset
from fastpt.pretrain.clm import collate_packed
from fastpt.pretrain.mlm import MLMCollator
from fastpt.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from fastpt.train.checkpoint import rng_state
from fastpt.train.interrupt import TrainingInterrupted
from trainer_loop_util import _config, _weights

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_tiny import TinyLM, make_data  # noqa: E402
from trainer_ddp_checks import PackedLM, WordTokenizer, interrupt_during  # noqa: E402


# -- 4: exact resume with DataLoader workers ----------------------------------------------------

class TinyMLM(torch.nn.Module):
    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.dropout(self.embed(input_ids))))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)}


def _mlm_data(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 40, (10,), generator=g).tolist()} for _ in range(n)]


def _mlm_trainer(out, eval_data=None, **overrides):
    torch.manual_seed(0)
    cfg = _config(out, label_shift=0, batch_size=4, **{"max_steps": 6, **overrides})
    return Trainer(TinyMLM(), cfg, _mlm_data(40), eval_data=eval_data,
                   collate_fn=MLMCollator(40, 3, 0, [0, 1, 2, 3], seed=0))


def _packed_trainer(out, **overrides):
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(str(int(x)) for x in torch.randint(2, 50, (7,), generator=g)) for _ in range(11)]
    torch.manual_seed(0)
    return Trainer(PackedLM(), _config(out, batch_size=2, **{"max_steps": 6, **overrides}),
                   PackedDataset(lambda: docs, WordTokenizer(), seq_len=8, eos_id=1), collate_fn=collate_packed)


def _electra_trainer(out, **overrides):
    """ELECTRA samples its replacements from torch's global RNG, which checkpoints restore
    (its own generator, not saved, made the resumed run sample other tokens)."""
    from fastpt.models import EncoderConfig
    from fastpt.pretrain.electra import Electra
    torch.manual_seed(0)
    cfg = _config(out, label_shift=0, batch_size=4, **{"max_steps": 6, **overrides})
    model = Electra(EncoderConfig.from_name("bert-tiny", vocab_size=40, pad_token_id=0))
    return Trainer(model, cfg, _mlm_data(40), collate_fn=MLMCollator(40, 3, 0, [0, 1, 2, 3], seed=0))


@pytest.mark.parametrize("make, workers", [(_mlm_trainer, 0), (_mlm_trainer, 2), (_packed_trainer, 2),
                                           (_electra_trainer, 0)],
                         ids=["mlm-0", "mlm-2", "packed-2", "electra-0"])
def test_resume_with_workers_is_exact(tmp_path, make, workers):
    # grad_accum 3 crosses epoch boundaries; an MLM collator draws masks in the workers; the
    # packed blocks are dealt to the workers. Both resumed differently with 2 workers (2.6e-2
    # for MLM); without workers the resume stays bit-identical.
    options = dict(num_workers=workers, grad_accum=3, warmup_steps=2, schedule="cosine")
    full = make(tmp_path / "full", **options)
    full.train()
    cut = make(tmp_path / "cut", **options)
    interrupt_during(cut, 2)
    with pytest.raises(TrainingInterrupted):
        cut.train()
    resumed = make(tmp_path / "cut", **options)
    resumed.train(resume_from=str(tmp_path / "cut" / "checkpoints"))
    assert torch.equal(_weights(full), _weights(resumed))
    assert [r["loss"] for r in full.metrics.rows] == [r["loss"] for r in resumed.metrics.rows]


def test_masks_do_not_depend_on_workers(tmp_path):
    # Each batch's masks follow from (seed, rank, epoch, batch index), not from the process
    # that collates it: with and without workers the run is the same.
    runs = []
    for workers in (0, 2):
        t = _mlm_trainer(tmp_path / str(workers), num_workers=workers, max_steps=3)
        t.train()
        runs.append(_weights(t))
    assert torch.equal(*runs)


def test_malformed_per_rank_positions_are_refused(tmp_path):
    t = _mlm_trainer(tmp_path)

    def save(data):
        return save_checkpoint(str(tmp_path / "bad"), 1, t.model.state_dict(), {"state": {}, "param_groups": []},
                               t.scheduler.state_dict(), data)
    # save_checkpoint does not write what load_checkpoint would refuse ...
    with pytest.raises(CheckpointError, match="data.ranks"):
        save({"epoch": 0, "batches_in_epoch": 1, "ranks": [[0]]})
    # ... and load_checkpoint refuses it when another tool wrote it (with a consistent digest).
    state_file = os.path.join(save({"epoch": 0, "batches_in_epoch": 1, "ranks": [[0, 1]]}), "trainer_state.json")
    with open(state_file) as f:
        state = json.load(f)
    state["data"]["ranks"] = [[0]]
    state["state_sha256"] = sha256_json({k: v for k, v in state.items() if k != "state_sha256"})
    with open(state_file, "w") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointError, match="data.ranks"):
        load_checkpoint(str(tmp_path / "bad"))


def _two_process_rng_checkpoint(t, root, second=None):
    """A checkpoint of ``t`` that holds the RNG states of 2 processes (and no world_size, which
    would refuse it first), the second one ``second`` if given."""
    second = second or rng_state()
    save_checkpoint(str(root), 1, t.model.state_dict(), {"state": {}, "param_groups": []},
                    t.scheduler.state_dict(), {"epoch": 0, "batches_in_epoch": 1}, rng_states=[rng_state(), second])


def test_rng_states_of_another_number_of_processes_are_refused(tmp_path):
    t = _mlm_trainer(tmp_path)
    _two_process_rng_checkpoint(t, tmp_path / "two")
    before, draw = _weights(t), torch.get_rng_state()
    with pytest.raises(CheckpointError, match="field 'rng' holds the RNG states of 2 processes, not 1"):
        t.load(str(tmp_path / "two"))
    assert torch.equal(_weights(t), before) and torch.equal(torch.get_rng_state(), draw)  # nothing changed


def test_damaged_rng_state_of_another_process_is_refused(tmp_path):
    tensors, meta = rng_state()
    _two_process_rng_checkpoint(_mlm_trainer(tmp_path), tmp_path / "bad",
                                second=({**tensors, "rng.torch": tensors["rng.torch"][:10]}, meta))
    with pytest.raises(CheckpointError, match=r"RNG state of process 1 \(field 'rng.other_ranks\[0\]' and the tensors rng.1.torch"):
        load_checkpoint(str(tmp_path / "bad"))


def test_iterable_resume_with_other_workers_is_refused(tmp_path):
    _packed_trainer(tmp_path, num_workers=0, max_steps=1).train()
    with pytest.raises(CheckpointError, match=r"num_workers=0 \(now 2\)"):  # workers deal the blocks
        _packed_trainer(tmp_path / "other", num_workers=2).load(str(tmp_path / "checkpoints"))


# -- 6: a stop request on a save step ------------------------------------------------------------

@pytest.mark.parametrize("save_every, signal_in", [(1, 3), (2, 4)])
def test_stop_request_on_a_save_step_stops_after_that_step(tmp_path, save_every, signal_in):
    torch.manual_seed(0)
    t = Trainer(TinyLM(), _config(tmp_path, max_steps=8, batch_size=4, save_every=save_every, keep_last=20),
                make_data())
    interrupt_during(t, signal_in)
    with pytest.raises(TrainingInterrupted) as stopped:  # save_every=1 ran on to step 8
        t.train()
    assert stopped.value.step == signal_in == t.step  # save_every=2 stopped a step later
    assert os.path.basename(stopped.value.checkpoint) == f"step-{signal_in}"


# -- 7: evaluation changes nothing ----------------------------------------------------------------

def test_evaluation_is_repeatable_and_leaves_training_alone(tmp_path):
    held_out = _mlm_data(16, seed=9)
    t = _mlm_trainer(tmp_path / "a", eval_data=held_out)
    t.model.eval()
    assert t.evaluate() == t.evaluate()  # were 3.728 and 3.722: the training masks' generator
    assert not t.model.training  # was switched to training mode
    t.model.train()
    t.evaluate()
    assert t.model.training
    without = _mlm_trainer(tmp_path / "b")
    without.train()
    with_eval = _mlm_trainer(tmp_path / "c", eval_data=held_out, eval_every=2)
    with_eval.train()
    # every step after the first evaluation used to differ
    assert [r["loss"] for r in without.metrics.rows] == [r["loss"] for r in with_eval.metrics.rows]
    assert sum("eval_loss" in r for r in with_eval.metrics.rows) == 3


# -- 12: metrics of a resumed run -------------------------------------------------------------------

def test_resumed_run_rewrites_metrics_from_its_checkpoint(tmp_path):
    def make():
        torch.manual_seed(0)
        return Trainer(TinyLM(), _config(tmp_path, max_steps=10, batch_size=4, save_every=3), make_data())
    crashed = make()
    train_step = crashed.train_step

    def dying(micro):
        if crashed.step == 8:  # as SIGKILL would: after step 8, the last checkpoint at step 6
            raise SystemExit("killed")
        return train_step(micro)
    crashed.train_step = dying
    with pytest.raises(SystemExit, match="killed"):
        crashed.train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a row cut short by the kill
    resumed = make()
    resumed.train(resume_from=str(tmp_path / "checkpoints"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # were [1..8, 7, 8, 9, 10]
    csv_steps = [int(line.split(",")[0]) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == steps
    assert [r["step"] for r in resumed.metrics.rows] == steps  # the loss curve covers the whole run
    assert [r["loss"] for r in resumed.metrics.rows[:6]] == [r["loss"] for r in crashed.metrics.rows[:6]]


def test_composite_loss_terms_are_logged_beside_the_loss(tmp_path):
    """Each loss term's mean over the step goes to metrics.jsonl: ELECTRA's loss is the
    generator's MLM loss + 50 x the discriminator's, and both are logged (the CSV keeps its
    columns)."""
    t = _electra_trainer(tmp_path, max_steps=2, grad_accum=2)
    t.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] == pytest.approx(r["mlm_loss"] + 50 * r["disc_loss"], rel=1e-5)
    assert "mlm_loss" not in open(tmp_path / "metrics.csv").readline()


def test_batches_are_moved_to_the_training_device(tmp_path):
    """Every tensor of a (nested) batch goes to the Trainer's device; other values stay."""
    t = Trainer(TinyLM(dropout=0.0), _config(tmp_path), make_data()[:8])
    assert t.device == torch.device("cpu") and next(t.model.parameters()).device == t.device
    t.device = torch.device("meta")  # any other device shows the move
    moved = t._on_device({"a": torch.ones(2), "b": [torch.ones(1), 3, ("x", torch.zeros(1))], "c": None})
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][2][1].is_meta
    assert moved["b"][1] == 3 and moved["b"][2][0] == "x" and moved["c"] is None
    assert isinstance(moved["b"], list) and isinstance(moved["b"][2], tuple)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"device is 'cuda', but torch.cuda.is_available\(\) is False"):
        Trainer(TinyLM(), _config(tmp_path, device="cuda"), make_data()[:8])
