"""Trainer: exact resume after SIGKILL, 2-process DDP == 1 process, gradient accumulation,
schedules, checkpoint integrity."""

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastpt.train import CheckpointError, Trainer, TrainerConfig, load_checkpoint
from fastpt.train.schedules import lr_lambda, param_groups

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
from train_tiny import TinyLM, make_data  # noqa: E402


def _run(args, torchrun=False, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", SCRIPT] if torchrun else [sys.executable, SCRIPT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=180, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd + args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _weights(path):
    return load_file(os.path.join(path, "final.safetensors"))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(["--out", str(full), "--steps", "10"])
    proc = _run(["--out", str(killed), "--steps", "10", "--save-every", "3", "--kill-at", "7"],
                check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, mid-way
    assert not (killed / "final.safetensors").exists()
    _run(["--out", str(killed), "--steps", "10", "--resume"])
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # No dropout: ranks draw their masks independently, so only the deterministic part can match.
    _run(["--out", str(one), "--steps", "6", "--batch-size", "8", "--dropout", "0"])
    _run(["--out", str(two), "--steps", "6", "--batch-size", "4", "--dropout", "0"], torchrun=True)
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_process_fsdp_matches_one_process_and_resumes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(["--out", str(one), "--steps", "6", "--batch-size", "8", "--dropout", "0"])
    common = ["--out", str(two), "--steps", "6", "--batch-size", "4", "--dropout", "0",
              "--strategy", "fsdp", "--save-every", "3"]
    _run(common + ["--kill-at", "4"], torchrun=True, check=False)
    assert (two / "checkpoints" / "step-3").is_dir() and not (two / "final.safetensors").exists()
    _run(common + ["--resume"], torchrun=True)
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    cfg = dict(output_dir=str(tmp_path), max_steps=1, batch_size=8, lr=1e-2, label_shift=1,
               progress=False, max_grad_norm=None, schedule="constant")
    cfg.update(overrides)
    return Trainer(TinyLM(), TrainerConfig(**cfg), make_data())


def _gradients_at_step(trainer):
    """The gradients the optimizer steps with, captured just before its step."""
    grads = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    return grads


def test_grad_accumulation_equals_one_large_batch(tmp_path):
    data = make_data()[:8]
    big = _trainer(tmp_path / "a")
    big.model.dropout.p = 0.0
    big_grads = _gradients_at_step(big)
    big.train_step([torch.utils.data.default_collate(data)])
    small = _trainer(tmp_path / "b", batch_size=2, grad_accum=4)
    small.model.dropout.p = 0.0
    small_grads = _gradients_at_step(small)
    small.train_step([torch.utils.data.default_collate(data[i:i + 2]) for i in range(0, 8, 2)])
    assert big_grads.keys() == small_grads.keys() and big_grads
    for name, g in big_grads.items():
        torch.testing.assert_close(small_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # Adam's first step is lr * g / (|g| + eps): where a gradient entry is ~eps (a near-cancelling
    # sum) the summation order of the BLAS in use moves it by a fraction of lr, so the weights
    # are compared at that scale; the gradients above are the exact check.
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-2 * big.config.lr, msg=name)


def test_schedules_warmup_then_decay():
    cos = lr_lambda("cosine", warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(20) == pytest.approx(0.1) and cos(12) == pytest.approx(0.55)
    lin = lr_lambda("linear", warmup_steps=0, total_steps=10)
    assert lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda("exp", 0, 10)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_metrics_files_and_loss_curve(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, log_every=1)
    trainer.train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "metrics.csv").read_text().startswith("step,loss,lr")
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_state"])
def test_damaged_checkpoint_is_detected_and_previous_kept(tmp_path, damage):
    trainer = _trainer(tmp_path, max_steps=2, save_every=1)
    trainer.train()
    root = tmp_path / "checkpoints"
    victim = root / "step-2" / ("trainer_state.json" if damage == "delete_state" else "model.safetensors")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-3] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    fresh = _trainer(tmp_path / "fresh")
    with pytest.raises(CheckpointError, match="step-2"):
        fresh.load(str(root))
    fresh.load(str(root / "step-1"))  # the previous checkpoint is intact and loads
    assert fresh.step == 1


def test_checkpoint_for_another_model_is_rejected(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    other = Trainer(TinyLM(dim=8), TrainerConfig(output_dir=str(tmp_path / "o"), progress=False),
                    make_data())
    with pytest.raises(CheckpointError, match="does not match this model"):
        other.load(str(tmp_path / "checkpoints"))


def test_tied_weights_are_stored_once(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.model.head.weight = trainer.model.embed.weight
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters())
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    trainer.train()
    state = load_checkpoint(str(tmp_path / "checkpoints"))
    assert state["aliases"] == {"head.weight": "embed.weight"}
    assert torch.equal(state["model"]["head.weight"], trainer.model.embed.weight.detach())
    stored = load_file(str(tmp_path / "checkpoints" / "step-1" / "model.safetensors"))
    assert "head.weight" not in stored


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="strategy"):
        TrainerConfig(strategy="zero3")
    with pytest.raises(ValueError, match=r"TrainerConfig.device 'gpu' not in \('auto', 'cpu', 'cuda'\)"):
        TrainerConfig(device="gpu")
    with pytest.raises(ValueError, match="unknown TrainerConfig options"):
        TrainerConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    for bad in (dict(lr=math.inf), dict(weight_decay=math.nan), dict(weight_decay=-0.1),
                dict(min_lr_ratio=1.5), dict(betas=(0.9, 1.0)), dict(betas=(0.9,))):
        with pytest.raises(ValueError, match=next(iter(bad))):  # these trained on silently (NaN weights)
            TrainerConfig(**bad)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    batch = torch.utils.data.default_collate(make_data()[:4])
    grads = []
    for ac in (False, True):
        t = _trainer(tmp_path / str(ac), activation_checkpointing=ac)
        t.model.dropout.p = 0.0
        t.model(**batch)["loss"].backward()
        grads.append([p.grad.clone() for p in t.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_fastpt_models_train_without_logits_and_the_same_loss(tmp_path, kind):
    """The Trainer asks a fastpt model for its loss without the (B, T, V) logits (the chunked
    decoder loss, MLM on the labelled positions only): the same loss and gradients."""
    from fastpt.models import Decoder, DecoderConfig, Encoder, EncoderConfig
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_name("llama-tiny", vocab_size=50)) if kind == "decoder" else \
        Encoder(EncoderConfig.from_name("bert-tiny", vocab_size=50, dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(4, 50, (3, 7))
    labels = ids.clone() if kind == "decoder" else torch.where(torch.rand(3, 7) < 0.3, ids, -100)
    labels[0, 0] = ids[0, 0]
    batch = {"input_ids": ids, "labels": labels}
    trainer = Trainer(model, TrainerConfig(output_dir=str(tmp_path), max_steps=1, batch_size=3,
                                           label_shift=1 if kind == "decoder" else 0), [batch])
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("return_logits")), with_kwargs=True)
    model.zero_grad()
    loss, _ = trainer._forward(batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = model(**batch)
    full.loss.backward()
    assert seen[0] is False and full.logits is not None
    torch.testing.assert_close(loss, full.loss.float(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
