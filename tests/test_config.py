"""Config: TOML round trips for every preset, typed overrides, and errors that name the key."""

import dataclasses
from pathlib import Path

import pytest

from nomoat.config import (
    PRESET_DIR,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    load_config,
    replace,
    to_dict,
    to_toml,
)
from nomoat.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def test_presets_are_the_promised_ones():
    assert {"cpu", "gpt2-124m", "pythia-160m", "llama-1b"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_toml(name):
    cfg = load_config(name)
    again = from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_presets_have_their_famous_sizes():
    import torch

    from nomoat.model import Transformer

    with torch.device("meta"):
        gpt2 = Transformer(load_config("gpt2-124m").model)
        llama = Transformer(load_config("llama-1b").model)
    # GPT-2 small counts 124M with its 50257-token table; the preset pads it to 50304
    assert 124.0e6 < gpt2.num_params() < 124.6e6
    assert 1.1e9 < llama.num_params() < 1.35e9


def test_overrides_are_typed():
    cfg = load_config(
        "cpu", {"train.lr": "3e-4", "train.steps": "1e3", "train.compile": "true", "model.n_kv_head": "2"}
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.train.compile is True
    assert cfg.model.n_kv_head == 2


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lr", "fast", "train.lr: expected float"),
        ("train.steps", "2.5", "train.steps: expected int"),
        ("train.compile", "maybe", "train.compile: expected true or false"),
        ("model.norm", "batchnorm", "model.norm: 'batchnorm' is not one of"),
        ("train.lrr", "1", "did you mean 'train.lr'"),
        ("train.optimizer", "sgd", "train.optimizer: 'sgd' is not one of"),
        ("train.muon_lr", "-0.02", "train.muon_lr must be positive"),
        ("train.time_budget", "-5", "train.time_budget must be >= 0"),
        ("trian.lr", "1", "did you mean 'train.lr'"),
    ],
)
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_config("cpu", {key: value})


def test_toml_values_are_type_checked(tmp_path):
    with pytest.raises(UserError, match="train.steps: expected int, got str"):
        from_dict({"train": {"steps": "ten"}})
    with pytest.raises(UserError, match="did you mean 'model.n_layer'"):
        from_dict({"model": {"n_layers": 4}})
    with pytest.raises(UserError, match="did you mean 'train'"):
        from_dict({"trian": {}})
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0  # an int is a fine float


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(UserError, match="no such file or preset"):
        load_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(str(bad))


def test_configs_are_frozen_keyword_only_and_validated():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(50257)  # type: ignore[misc]
    with pytest.raises(UserError, match="divisible"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(UserError, match="n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(UserError, match="exceeds model.max_seq_len"):
        RunConfig(model=ModelConfig(max_seq_len=64), train=TrainConfig(seq_len=128))


def test_replace_changes_one_section():
    cfg = load_config("cpu")
    changed = replace(cfg, train={"steps": 7})
    assert changed.train.steps == 7 and changed.model == cfg.model


def test_set_by_user_tells_a_users_choice_from_a_presets_default(tmp_path):
    from nomoat.config import set_by_user

    assert not set_by_user("cpu", {}, "model.vocab_size")  # a preset's value is a default for its shape
    assert set_by_user("cpu", {"model.vocab_size": "4096"}, "model.vocab_size")
    own = tmp_path / "run.toml"
    own.write_text("[model]\nvocab_size = 4096\n")
    assert set_by_user(str(own), {}, "model.vocab_size")
    own.write_text("[train]\nsteps = 10\n")  # no [model]: every model field is a default
    assert not set_by_user(str(own), {}, "model.vocab_size")


def test_absolute_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    from nomoat.config import FinetuneConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = replace(RunConfig(), data={"shards": "shards/", "tokenizer": "~/tok.json"})
    cfg = replace(cfg, train={"out_dir": "runs/a", "eval_tasks": ("hellaswag=hs.jsonl", "mine.toml")})
    cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(base="/abs/base", data="chats.jsonl"))
    done = absolute_paths(cfg)
    assert done.data.shards == str(tmp_path / "shards") and done.train.out_dir == str(tmp_path / "runs/a")
    assert done.data.tokenizer == str(Path.home() / "tok.json")
    assert done.train.eval_tasks == (f"hellaswag={tmp_path}/hs.jsonl", f"{tmp_path}/mine.toml")
    fc = done.finetune
    assert (fc.base, fc.data, fc.val_data) == ("/abs/base", f"{tmp_path}/chats.jsonl", "")
    assert absolute_paths(done) == done
