"""Checkpoints: atomic saves survive a failure midway, loads refuse what does not fit, no pickles."""

import pickle
import shutil

import pytest
import torch
from conftest import tiny_run

import nomoat.checkpoint as ckpt_module
from nomoat.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from nomoat.errors import UserError
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer


@pytest.fixture
def saved(shakespeare_shards, tmp_path):
    cfg = tiny_run(shakespeare_shards, tmp_path)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    tok = Tokenizer.load(shakespeare_shards[1])
    trainer = {"step": 1, "rng": torch.get_rng_state(), "loader": {"seed": 7, "step": 1}}
    save_checkpoint(tmp_path, 1, model, cfg, tok, {"format_version": 1}, trainer)
    return cfg, model, tok, trainer


def test_round_trip_loads_the_same_weights(saved, tmp_path):
    cfg, model, _, _ = saved
    loaded = load_checkpoint(tmp_path, trainer_state=True)
    assert loaded.cfg == cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.trainer["loader"] == {"seed": 7, "step": 1}
    assert resolve_checkpoint(tmp_path) == loaded.path == tmp_path / "checkpoints/step_00000001"


def test_failure_midway_leaves_the_previous_checkpoint_loadable(saved, tmp_path, monkeypatch):
    cfg, model, tok, trainer = saved

    def broken_save(obj, path):  # half a file, then the disk fills up
        open(path, "wb").write(b"\x80\x02partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, cfg, tok, None, trainer)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert load_checkpoint(tmp_path, trainer_state=True).trainer["step"] == 1


def test_keep_last_prunes_old_checkpoints(saved, tmp_path):
    cfg, model, tok, trainer = saved
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, model, cfg, tok, None, trainer, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_bad_checkpoints_are_named(saved, tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    folder = list_checkpoints(tmp_path)[-1]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(broken)
    (broken / "config.toml").write_text((folder / "config.toml").read_text().replace("d_ff = 64", "d_ff = 96"))
    shutil.copy(folder / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(UserError, match=r"layers.0.mlp.gate_proj.weight has shape \(64, 32\), config wants \(96"):
        load_checkpoint(broken)


def test_trainer_state_loads_without_pickled_objects(saved, tmp_path):
    folder = list_checkpoints(tmp_path)[-1]
    torch.save({"evil": object()}, folder / "trainer.pt")
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_checkpoint(folder, trainer_state=True)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_state_shards_are_checked_before_and_while_loading(shakespeare_shards, tmp_path):
    from nomoat.train import train

    train(tiny_run(shakespeare_shards, tmp_path / "run", steps=2, eval_every=0), progress=False)
    folder = tmp_path / "sharded"
    shutil.copytree(list_checkpoints(tmp_path / "run")[-1], folder)
    (folder / "model.safetensors").unlink()  # as a FSDP run leaves it: the weights come from state/
    assert load_checkpoint(folder).model is not None
    shard = next((folder / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="a shard is unreadable or corrupt"):
        load_checkpoint(folder)
    marker = tmp_path / "ran"
    (folder / "state" / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(UserError, match="is not part of checkpoint metadata"):
        load_checkpoint(folder)
    assert not marker.exists()  # nothing in the crafted pickle ran
