"""Training checkpoints refuse what they cannot resume exactly: missing tensors, an edited
trainer_state.json, wrong dtypes, NaN, malformed state files, a 'latest' leading elsewhere,
another batch size; pruning and clean-up never lose the checkpoint just written."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastpt.train import CheckpointError, Trainer, TrainerConfig, load_checkpoint, save_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from train_tiny import TinyLM, make_data  # noqa: E402


def _trainer(out, **overrides):
    torch.manual_seed(0)
    cfg = dict(output_dir=str(out), max_steps=1, batch_size=8, lr=1e-2, label_shift=1,
               progress=False, schedule="constant")
    cfg.update(overrides)
    return Trainer(TinyLM(), TrainerConfig(**cfg), make_data())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint root (step-1, trained for one step), written once for the module."""
    out = tmp_path_factory.mktemp("saved")
    _trainer(out).train()
    return out / "checkpoints"


@pytest.fixture
def root(saved, tmp_path):
    """A private copy of the saved checkpoint root, free to damage."""
    return shutil.copytree(saved, tmp_path / "checkpoints")


def _digest(state: dict) -> str:
    """The documented digest: SHA-256 of the canonical JSON (sorted keys, no spaces) without it."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rewrite(step_dir, model=None, optim=None, state=None):
    """Edit a checkpoint and record the new hashes, as a tool that rewrites it consistently
    would: then only the checks under test stand between the damage and a silent resume."""
    for name, edit in (("model.safetensors", model), ("optimizer.safetensors", optim)):
        if edit is not None:
            tensors = load_file(step_dir / name)
            edit(tensors)
            save_file(tensors, step_dir / name)
    st = json.loads((step_dir / "trainer_state.json").read_text())
    for name, entry in st["files"].items():
        data = (step_dir / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    st = state(st) if state is not None else st
    if isinstance(st, dict):
        st["state_sha256"] = _digest(st)
    (step_dir / "trainer_state.json").write_text(json.dumps(st))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# -- D1: missing tensors ----------------------------------------------------------------------

def test_tensor_missing_from_model_file_is_refused(root, tmp_path):
    _rewrite(root / "step-1", model=lambda w: w.pop("embed.weight"))
    fresh = _trainer(tmp_path / "fresh")
    before = _weights(fresh)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing embed\.weight"):
        fresh.load(str(root))
    # Refused before anything changed: the trainer still has its own initial weights.
    for k, v in _weights(fresh).items():
        assert torch.equal(v, before[k]), k


# -- D2: trainer_state.json is itself verified --------------------------------------------------

@pytest.mark.parametrize("edit", ["step", "batches_in_epoch", "lr"])
def test_edited_trainer_state_is_refused(root, tmp_path, edit):
    path = root / "step-1" / "trainer_state.json"
    st = json.loads(path.read_text())
    if edit == "step":
        st["step"] = 7
    elif edit == "batches_in_epoch":
        st["data"]["batches_in_epoch"] += 1
    else:
        st["optimizer"]["param_groups"][0]["lr"] = 123.0
    path.write_text(json.dumps(st))
    with pytest.raises(CheckpointError, match=r"step-1/trainer_state\.json was altered"):
        _trainer(tmp_path / "fresh").load(str(root))


def test_state_without_files_entry_is_refused_and_corruption_still_caught(root, tmp_path):
    model = root / "step-1" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x40
    model.write_bytes(bytes(data))

    def drop_files(st):
        del st["files"]
        return st
    _rewrite(root / "step-1", state=drop_files)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: field 'files'"):
        _trainer(tmp_path / "fresh").load(str(root))


def test_state_without_digest_is_refused(root):
    path = root / "step-1" / "trainer_state.json"
    st = json.loads(path.read_text())
    st.pop("state_sha256", None)  # as a checkpoint written before the digest existed
    path.write_text(json.dumps(st))
    with pytest.raises(CheckpointError, match="state_sha256"):
        load_checkpoint(str(root))


# -- D3: dtypes, NaN, optimizer state shapes -----------------------------------------------------

def _nan(tensors, suffix):
    name = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[name] = torch.full_like(tensors[name], float("nan"))


@pytest.mark.parametrize("damage, match", [
    (dict(model=lambda w: w.update({k: (v * 1000).to(torch.int32) for k, v in w.items()})),
     r"model\.safetensors does not match this model: \S+ is torch\.int32"),
    (dict(model=lambda w: w.update({"head.weight": w["head.weight"].half()})),
     r"model\.safetensors does not match this model: head\.weight is torch\.float16"),
    (dict(model=lambda w: _nan(w, "head.bias")), r"model\.safetensors: head\.bias holds NaN"),
    (dict(optim=lambda t: _nan(t, "exp_avg_sq")), r"optimizer\.safetensors: state/\S+/exp_avg_sq holds NaN"),
    (dict(optim=lambda t: t.update({"state/embed.weight/exp_avg": torch.zeros(3)})),
     r"optimizer\.safetensors: state/embed\.weight/exp_avg is torch\.float32 \(3,\)"),
], ids=["int32-weights", "float16-weight", "nan-weight", "nan-optimizer", "exp_avg-shape"])
def test_tensors_unfit_for_the_model_are_refused(root, tmp_path, damage, match):
    _rewrite(root / "step-1", **damage)
    with pytest.raises(CheckpointError, match=match):
        _trainer(tmp_path / "fresh").load(str(root))


# -- D4: malformed state files ---------------------------------------------------------------------

def _set(*keys, value):
    def edit(st):
        target = st
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return st
    return edit


def _drop(key):
    def edit(st):
        del st[key]
        return st
    return edit


def _cut_rng(t):
    t["rng.torch"] = t["rng.torch"][:10]


@pytest.mark.parametrize("damage, match", [
    (dict(state=lambda st: [1, 2]), r"trainer_state\.json holds a JSON list"),
    (dict(state=_drop("aliases")), "field 'aliases'"),
    (dict(state=_drop("optimizer")), "field 'optimizer'"),
    (dict(state=_drop("data")), "field 'data'"),
    (dict(state=_set("data", "epoch", value="0")), "field 'data'"),
    (dict(state=_set("aliases", value={"head.weight": "nope"})), "field 'aliases' maps 'head.weight' to 'nope'"),
    (dict(state=_set("files", value={"model.safetensors": 5})), "field 'files'"),
    (dict(state=_set("rng", "python", value="x")), r"trainer_state\.json: the RNG state"),
    (dict(optim=_cut_rng), r"trainer_state\.json: the RNG state"),
    (dict(optim=lambda t: t.update({"state/a/b/c": torch.zeros(1)})), r"optimizer\.safetensors: tensor 'state/a/b/c'"),
    (dict(optim=lambda t: t.update({"state/nope/exp_avg": torch.zeros(1)})), "optimizer state for 'nope'"),
    (dict(state=_set("scheduler", value={"foo": 1})), "field 'scheduler'"),
    (dict(state=_set("scheduler", "last_epoch", value="1")), r"field 'scheduler'.*last_epoch"),
], ids=["list", "no-aliases", "no-optimizer", "no-data", "epoch-str", "alias-absent", "files-int",
        "rng-python", "rng-torch-size", "optim-key-slash", "optim-unknown-param", "scheduler-garbage",
        "scheduler-type"])
def test_malformed_state_raises_checkpoint_error_naming_the_field(root, tmp_path, damage, match):
    _rewrite(root / "step-1", **damage)
    fresh = _trainer(tmp_path / "fresh")
    before = _weights(fresh)
    with pytest.raises(CheckpointError, match=match):
        fresh.load(str(root))
    for k, v in _weights(fresh).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("latest", ["[1]", '{"path": 5}', '{"step": 1}', "ABSOLUTE", '{"path": "../other/step-1"}',
                                    '{"path": "step-1/../.."}'])
def test_bad_latest_is_refused(root, tmp_path, latest):
    other = shutil.copytree(root, tmp_path / "other")  # a valid checkpoint the bad pointer could reach
    if latest == "ABSOLUTE":
        latest = json.dumps({"path": str(other / "step-1")})
    (root / "latest").write_text(latest)
    with pytest.raises(CheckpointError, match=r"checkpoints/latest"):
        load_checkpoint(str(root))


# -- D5: pruning and stale temporary folders -------------------------------------------------------

def _save(root, step, keep_last):
    trainer = _trainer(root.parent / "t")
    state = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    return save_checkpoint(str(root), step, state, {"state": {}, "param_groups": []}, None,
                           {"epoch": 0, "batches_in_epoch": step}, keep_last=keep_last)


def test_saving_below_an_existing_step_keeps_the_new_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 4, keep_last=1)
    _save(root, 3, keep_last=1)  # a run resumed from step 3 after step 4 was written
    assert load_checkpoint(str(root))["step"] == 3
    assert sorted(os.listdir(root)) == ["latest", "step-3"]
    _save(root, 5, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step-3", "step-5"]


def test_temp_folders_of_dead_saves_are_removed_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root.mkdir()
        for pid in (dead.pid, live.pid):
            (root / f".step-9.tmp-{pid}").mkdir()
            (root / f".step-9.tmp-{pid}" / "model.safetensors").write_bytes(b"partial")
        _save(root, 1, keep_last=2)
        names = sorted(os.listdir(root))
    finally:
        live.kill()
        live.wait()
    assert f".step-9.tmp-{dead.pid}" not in names
    assert f".step-9.tmp-{live.pid}" in names  # maybe another process saving right now


def test_resave_killed_between_its_renames_loses_nothing(tmp_path):
    """A re-save of step N moves step-N aside as step-N.old before renaming the new one in; a
    save killed between the two leaves only step-N.old, which 'latest' still names as step-N."""
    root = tmp_path / "checkpoints"
    _save(root, 2, keep_last=2)
    os.replace(root / "step-2", root / "step-2.old")
    assert load_checkpoint(str(root))["step"] == 2
    assert sorted(os.listdir(root)) == ["latest", "step-2"]
    shutil.copytree(root / "step-2", root / "step-2.old")  # killed after the second rename instead
    _save(root, 3, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step-2", "step-3"]


# -- resuming with another batch size or number of processes ---------------------------------------

def test_resume_with_another_batch_size_is_refused(root, tmp_path):
    with pytest.raises(CheckpointError, match=r"batch_size=8 \(now 4\)"):
        _trainer(tmp_path / "fresh", batch_size=4).load(str(root))


def test_resume_with_another_world_size_is_refused(root, tmp_path):
    _rewrite(root / "step-1", state=_set("extra", "world_size", value=2))
    with pytest.raises(CheckpointError, match=r"processes=2 \(now 1\)"):
        _trainer(tmp_path / "fresh").load(str(root))


# -- what must still load --------------------------------------------------------------------------

def test_valid_checkpoint_with_tied_weights_resumes(tmp_path):
    def tied(out):
        trainer = _trainer(out)
        trainer.model.head.weight = trainer.model.embed.weight
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters())
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
        return trainer
    first = tied(tmp_path / "a")
    first.train()
    second = tied(tmp_path / "b")
    second.load(str(tmp_path / "a" / "checkpoints"))
    assert second.step == 1
    for k, v in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k
    assert second.model.head.weight is second.model.embed.weight
