"""Two processes on gloo: DDP and FSDP2 match one process's gradient accumulation, sharded checkpoints resume on
any world size, the consolidated export equals the weights, and a killed rank stops the job with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run
from safetensors.torch import load_file

from nomoat.checkpoint import consolidate, list_checkpoints, load_checkpoint
from nomoat.config import RunConfig, replace, save_config
from nomoat.train import train

pytestmark = pytest.mark.slow

STEPS = 10


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def nomoat_train(cfg: RunConfig, folder: Path, *extra: str, nproc: int = 2, timeout: float = 240) -> None:
    """`nomoat train --nproc N` in a subprocess, as a user runs it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "run.toml")
    cmd = [sys.executable, "-m", "nomoat", "train", "--nproc", str(nproc), "--config", str(folder / "run.toml"), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(shakespeare_shards, tmp_path_factory):
    """One process with 2 accumulation steps, and 2 processes with DDP and with FSDP, all saving at step 5."""
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny_run(shakespeare_shards, root / "single", steps=STEPS, grad_accum=2, save_every=5, eval_every=0)
    train(cfg, progress=False)
    for parallel in ("ddp", "fsdp"):
        out = root / parallel
        nomoat_train(replace(cfg, train={"out_dir": str(out), "parallel": parallel}), out)
    return root, cfg


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_gradient_accumulation(runs, parallel):
    root, _ = runs
    single, multi = losses(root / "single"), losses(root / parallel)
    assert len(single) == len(multi) == STEPS
    assert max(abs(a - b) for a, b in zip(single, multi, strict=True)) < 1e-5, (single, multi)


def test_fsdp_checkpoint_is_sharded_and_consolidates_to_the_weights(runs, tmp_path):
    root, _ = runs
    ckpt = list_checkpoints(root / "fsdp")[0]
    assert sorted(p.name for p in (ckpt / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()  # no rank ever held the whole model
    exported = load_file(str(consolidate(ckpt, tmp_path / "model.safetensors")))
    unsharded = load_file(str(list_checkpoints(root / "single")[0] / "model.safetensors"))
    assert exported.keys() == unsharded.keys()
    for name, tensor in unsharded.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-5, rtol=0)
    loaded = load_checkpoint(ckpt).model.state_dict()  # inference loads the shards directly, the same tensors
    assert all(torch.equal(loaded[name], exported[name]) for name in exported)


@pytest.mark.parametrize("nproc", [1, 2])
def test_two_rank_checkpoint_resumes_on_any_world_size(runs, tmp_path, nproc):
    root, cfg = runs
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp", run)
    shutil.rmtree(list_checkpoints(run)[-1])  # as if the job had died after step 5's checkpoint
    resumed = replace(cfg, train={"out_dir": str(run), "parallel": "fsdp"})
    if nproc == 1:
        train(resumed, resume=True, progress=False)
    else:
        nomoat_train(resumed, tmp_path, "--resume")
    a, b = losses(root / "single"), losses(run)
    assert len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)


def test_a_killed_rank_stops_the_job_with_one_clear_line(shakespeare_shards, tmp_path):
    cfg = tiny_run(shakespeare_shards, tmp_path / "run", steps=100_000, grad_accum=2, save_every=5, eval_every=0)
    save_config(cfg, tmp_path / "run.toml")
    cmd = [sys.executable, "-m", "nomoat", "train", "--nproc", "2", "--config", str(tmp_path / "run.toml")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(tmp_path / "run") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_checkpoints(tmp_path / "run"), "no checkpoint was written"
        os.kill(_rank_pid(1, str(tmp_path / "run.toml")), signal.SIGKILL)
        _, err = job.communicate(timeout=90)
    finally:
        job.kill()
    assert job.returncode == 2
    assert err.strip().splitlines()[-1].startswith("nomoat: error: rank 1 failed (killed by SIGKILL)"), err[-2000:]
    assert load_checkpoint(tmp_path / "run").model is not None  # the last checkpoint is intact


def _rank_pid(rank: int, marker: str) -> int:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode()
            environ = (proc / "environ").read_bytes().decode()
        except (OSError, ValueError):
            continue
        if marker in cmdline and f"\0RANK={rank}\0" in f"\0{environ}":
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank}")


def test_ranks_with_different_configs_are_refused(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        "import os, torch\n"
        "from nomoat import distributed\n"
        "from nomoat.errors import UserError\n"
        "world = distributed.init(torch.device('cpu'))\n"
        "try:\n"
        "    distributed.check_same_config('lr = %s' % os.environ['RANK'], world)\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.stdout.count("rank 1 was started with a different config than rank 0") == 2, done.stdout + done.stderr


@pytest.fixture(scope="module")
def muon_runs(shakespeare_shards, tmp_path_factory):
    """The same three runs with Muon on the blocks' matrices."""
    root = tmp_path_factory.mktemp("muon")
    cfg = tiny_run(shakespeare_shards, root / "single", steps=STEPS, grad_accum=2, eval_every=0, optimizer="muon")
    train(cfg, progress=False)
    for parallel in ("ddp", "fsdp"):
        out = root / parallel
        nomoat_train(replace(cfg, train={"out_dir": str(out), "parallel": parallel}), out)
    return root


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_in_two_processes_matches_one(muon_runs, parallel):
    """Under FSDP each rank holds a slice of every matrix; Muon must still orthogonalise whole matrices."""
    single, multi = losses(muon_runs / "single"), losses(muon_runs / parallel)
    assert len(single) == len(multi) == STEPS
    assert max(abs(a - b) for a, b in zip(single, multi, strict=True)) < 1e-4, (single, multi)
