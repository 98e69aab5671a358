"""Short runs of the measurement scripts behind the README's defaults, overhead and blockwise figures,
so that they cannot rot. Results go to tmp_path, never into benchmarks/results/."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_overhead_smoke(tmp_path):
    import overhead

    out = tmp_path / "overhead.json"
    overhead.main(["--models", "mlp", "--batch-size", "8", "--val-batch-size", "8", "--iters", "10",
                   "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["mlp"]["variants"]
    assert rows["sgd"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert rows["oho_adamw_full"]["baseline"] == "adamw" and rows["oho_adam_greedy"]["baseline"] == "adam"
    assert rows["oho_global_full"]["tangents"] == 2 and rows["oho_layer_exact_full"]["tangents"] == 6
    assert all(r["ms"] > 0 for r in rows.values())


def test_defaults_smoke(tmp_path):
    import defaults

    out = tmp_path / "defaults.json"
    payload = defaults.main(["--epochs", "1", "--lrs", "0.01,0.1", "--models", "mlp",
                             "--candidates", "greedy_b999,full_b999", "--out", str(out)])
    assert set(payload["summary"]) == {"frozen", "greedy_b999", "full_b999"}
    assert len(payload["runs"]) == 6
    again = defaults.main(["--summarise", str(out)])
    assert again["summary"]["greedy_b999"]["median_test_loss"] == payload["summary"]["greedy_b999"]["median_test_loss"]


def test_blockwise_error_smoke(tmp_path):
    import blockwise_error

    out = tmp_path / "blockwise.json"
    payload = blockwise_error.main(["--steps", "1,3", "--out", str(out)])
    first, second = payload["results"]
    assert first["relative_error"] < 1e-12  # one step: blockwise is exact
    assert 0 < second["relative_error"] < 10
