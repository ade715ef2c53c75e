"""Device choices: train.dtype=auto on a CPU, settled by a measured probe once per CPU and shape."""

import pytest
import torch

from nomoat import device
from nomoat.device import choose_precision

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path))
    return tmp_path / "precision.json"


def probe_saying(fp32: float, bf16: float, calls: list[bool]):
    def probe(use_bf16: bool) -> float:
        calls.append(use_bf16)
        return bf16 if use_bf16 else fp32

    return probe


def test_auto_probes_once_per_cpu_and_shape_then_keeps_its_verdict(cache, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    calls: list[bool] = []
    dtype, why = choose_precision(CPU, "auto", "shape A", probe_saying(1.0, 0.5, calls))
    assert (dtype, calls) == ("bfloat16", [False, True]) and "2.00x" in why
    # A second probe on a busy machine might now say otherwise: the cached verdict stands.
    assert choose_precision(CPU, "auto", "shape A", probe_saying(0.5, 1.0, calls))[0] == "bfloat16"
    assert len(calls) == 2 and cache.is_file()
    assert choose_precision(CPU, "auto", "shape B", probe_saying(1.0, 0.95, calls))[0] == "float32"  # < 10% faster


def test_auto_stays_fp32_without_native_bf16_and_explicit_choices_stand(cache, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    never = probe_saying(1.0, 0.1, calls := [])
    dtype, why = choose_precision(CPU, "auto", "shape", never)
    assert dtype == "float32" and "no native bf16" in why and not calls
    assert choose_precision(CPU, "bfloat16", "shape", never) == ("bfloat16", "set by train.dtype")
    assert choose_precision(torch.device("cuda"), "auto", "shape", never)[0] == "bfloat16"
    assert not cache.exists()


def test_a_corrupt_cache_is_measured_afresh(cache, monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: {"amx_bf16"})
    cache.write_text("{not json")
    assert choose_precision(CPU, "auto", "shape", probe_saying(1.0, 0.4, []))[0] == "bfloat16"


def test_cpu_description_names_the_features_behind_the_figures():
    text = device.cpu_description()
    assert "threads" in text and text.count(",") >= 2
