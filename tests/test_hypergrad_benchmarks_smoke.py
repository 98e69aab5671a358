"""Tiny runs (--quick) of the hypergradient benchmark scripts, into pytest's tmp_path, so that they cannot
rot: each writes a results file with its configuration, versions and device, and a figure."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SCRIPTS = ["hypergrad_cost", "hypergrad_multitask", "hypergrad_cleaning", "hypergrad_lr_schedule",
           "hypergrad_init_scales", "hypergrad_synthetic_data"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_results_and_figure(script, tmp_path):
    module = importlib.import_module(script)
    out = tmp_path / f"{script}.json"
    module.main(["--quick", "true", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["kind"] == script and payload["config"]["quick"] is True
    env = payload["environment"]
    assert env["device"] == "cpu" and env["device_name"] and env["versions"]["torch"]
    assert env["ohotorch_source"]["sha256"]
    assert out.with_suffix(".png").stat().st_size > 0
