"""Files written through fastpt._atomic get the mode a plain open() would give them: the
temporary file of an atomic write is created 0600, and checkpoints, adapters and reports were
left unreadable to the group and others whatever the umask."""

from __future__ import annotations

import os
import stat

import pytest

from fastpt._atomic import atomic_write, atomic_write_json
from fastpt.models import Decoder, DecoderConfig
from fastpt.train.checkpoint import save_checkpoint


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)
    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    with open(tmp_path / "plain", "w") as f:  # what open() gives, the mode to match
        f.write("x")
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.json") == _mode(tmp_path / "plain") == 0o666 & ~mask


def test_saved_model_files_are_readable_by_others(tmp_path, umask):
    umask(0o022)
    Decoder(DecoderConfig.from_name("llama-tiny")).save_pretrained(tmp_path / "m")
    modes = {p.name: _mode(p) for p in (tmp_path / "m").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_training_checkpoint_files_are_readable_by_others(tmp_path, umask):
    """safetensors writes its files 0600 itself, also outside atomic_write."""
    umask(0o022)
    model = Decoder(DecoderConfig.from_name("llama-tiny"))
    step = save_checkpoint(str(tmp_path / "ckpt"), 1, model.state_dict(), {"state": {}, "param_groups": []},
                           None, {"epoch": 0, "batches_in_epoch": 1})
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path)): _mode(p) for p in files}
    assert any(name.endswith(".safetensors") for name in modes), modes
    assert set(modes.values()) == {0o644}, modes
