"""The development suite (benchmarks/suite.py) in its quick mode: tiny tasks, one seed, a few steps.

Runs into pytest's tmp_path, never into benchmarks/results/. Checks the structure the later work relies
on (every method of every task, per-run trajectories, the summary's goals and the Markdown table, the
figures) and the few behaviours the suite promises: every method at one seed starts from the same
weights and batches, grid runs keep their lr, OHO moves it, failures are reported rather than fatal.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("sklearn")
pytest.importorskip("schedulefree")
pytest.importorskip("prodigyopt")

import suite  # noqa: E402
import suite_plot  # noqa: E402
import suite_tasks  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite_quick.json"
    suite.main(["--quick", "--workers", "1", "--no-progress", "--out", str(out),
                "--oho-variant", 'every2={"hyper_every": 2, "val_batches": 2}'])
    return out, json.loads(out.read_text())


def test_quick_suite_runs_every_method_of_every_task(quick):
    out, payload = quick
    assert payload["complete"] and payload["environment"]["versions"]["torch"]
    assert payload["environment"]["versions"]["schedulefree"] and payload["environment"]["versions"]["prodigyopt"]
    runs = payload["runs"]
    assert {r["task"] for r in runs} == set(suite_tasks.TASKS)
    for name in suite_tasks.TASKS:
        task = suite_tasks.get_task(name, True)
        mine = [r for r in runs if r["task"] == name]
        expected = suite.methods_of(task, payload["variants"])
        assert sorted({r["method"] for r in mine}) == sorted(expected)
        assert sorted(r["lr"] for r in mine if r["method"] == "oho") == sorted(task.oho_lr0s)
        assert len({r["lr"] for r in mine if r["method"] == suite.GRIDS[task.family][0]}) >= 5
        assert len({r["lr"] for r in mine if r["method"] == suite.GRIDS[task.family][1]}) >= 5
    for run in runs:
        assert "error" not in run, run.get("traceback")
        assert run["seed"] == 0 and run["wall_time_s"] > 0
        trace = run["trace"]
        assert trace["step"] and len(trace["lr"]) == len(trace["step"]) == len(trace["weight_decay"])
        assert len(trace["train_loss"]) == len(trace["step"])
        assert run["evals"]["step"][0] == 0 and len(run["evals"]["test_loss"]) == len(run["evals"]["step"])
        if not run["diverged"]:
            assert math.isfinite(run["test_loss"]) and run["test_loss"] == run["evals"]["test_loss"][-1]
        if run["method"].startswith("oho"):
            assert len(trace["hyper_val_loss"]) == len(trace["step"])


def test_every_method_starts_from_the_same_weights(quick):
    _, payload = quick
    for name in suite_tasks.TASKS:
        initial = {r["evals"]["test_loss"][0] for r in payload["runs"] if r["task"] == name}
        assert len(initial) == 1, (name, initial)


def test_grid_lrs_stay_fixed_and_oho_moves_them(quick):
    _, payload = quick
    for run in payload["runs"]:
        if run["method"] in ("sgd", "adamw") and not run["diverged"]:
            assert all(v == pytest.approx(run["lr"]) for v in run["trace"]["lr"])
        if run["method"] == "cosine":
            assert run["trace"]["lr"][-1] < run["lr"]
    moved = [r for r in payload["runs"] if r["method"] == "oho" and r["final_lr"] != pytest.approx(r["lr"])]
    assert moved


def test_variant_options_reach_the_loop_and_ohotorch(quick):
    _, payload = quick
    assert payload["variants"]["oho_every2"] == {"hyper_every": 2, "val_batches": 2}
    assert payload["variants"]["oho_full"] == {"discount": 1.0}
    every2 = [r for r in payload["runs"] if r["method"] == "oho_every2"]
    assert every2 and all(r["oho_kwargs"] == {"hyper_every": 2, "val_batches": 2} for r in every2)


def test_summary_and_markdown(quick):
    out, payload = quick
    summary = payload["summary"]
    for name, entry in summary["tasks"].items():
        assert entry["best_fixed"]["lr"] in suite_tasks.get_task(name, True).grid_lrs
        oho = entry["oho"]["oho"]
        assert set(oho["per_lr0"]) == {str(lr) for lr in suite_tasks.get_task(name, True).oho_lr0s}
        assert isinstance(oho["goal_no_failure"], bool) and "cost_ratio" in oho
        if oho["median_test_loss"] is not None:
            assert oho["ratio_best_fixed"] == pytest.approx(oho["median_test_loss"] / entry["best_fixed"]["test_loss"],
                                                            rel=1e-3)
    assert set(summary["geomean"]) >= {"oho", "prodigy", "schedule_free", "best_fixed", "best_cosine"}
    text = out.with_suffix(".md").read_text()
    assert "| oho |" in text and "### charlm (adamw)" in text


def test_summarise_reproduces_the_summary(quick, tmp_path):
    out, payload = quick
    copy = tmp_path / "copy.json"
    copy.write_text(out.read_text())
    again = suite.main(["--summarise", str(copy)])
    assert again["summary"] == payload["summary"]


def test_figures(quick, tmp_path):
    out, _ = quick
    figures = suite_plot.main([str(out), "--out-dir", str(tmp_path)])
    assert len(figures) == 2 * len(suite_tasks.TASKS)
    assert all(f.suffix == ".png" and f.stat().st_size > 0 for f in figures)


def test_a_failing_run_is_recorded_not_fatal():
    record = suite.run_one({"task": "digits_mlp", "method": "oho", "lr": 0.01, "seed": 0, "quick": True,
                            "oho_kwargs": {"no_such_option": 1}})
    assert record["diverged"] and "TypeError" in record["error"] and record["test_loss"] is None


def test_process_pool(tmp_path):
    out = tmp_path / "pool.json"
    payload = suite.main(["--quick", "--workers", "2", "--no-progress", "--tasks", "digits_mlp",
                          "--methods", "sgd,oho", "--out", str(out)])
    assert len(payload["runs"]) == 5 + 3 and all("error" not in r for r in payload["runs"])
    # the same run in a worker process and in this one: the same numbers
    local = suite.run_one({"task": "digits_mlp", "method": "sgd", "lr": 0.1, "seed": 0, "quick": True})
    pooled = next(r for r in payload["runs"] if r["method"] == "sgd" and r["lr"] == 0.1)
    assert pooled["test_loss"] == local["test_loss"] and pooled["trace"]["train_loss"] == local["trace"]["train_loss"]


def test_unknown_task_is_refused():
    with pytest.raises(SystemExit):
        suite.main(["--tasks", "nope"])


def test_merge_of_per_task_files_gives_the_same_summary(quick, tmp_path):
    _, payload = quick
    paths = []
    for name in suite_tasks.TASKS:
        part = dict(payload, runs=[r for r in payload["runs"] if r["task"] == name],
                    tasks={name: payload["tasks"][name]})
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(part))
    merged = suite.main(["--merge", *map(str, paths), "--out", str(tmp_path / "merged.json")])
    assert merged["summary"] == payload["summary"] and len(merged["parts"]) == len(paths)
    assert json.loads((tmp_path / "merged.json").read_text())["complete"]


def test_fast_spike_prototype_puts_the_lr_back_and_never_fires_on_a_huge_factor():
    def run(factor):
        return suite.run_one({"task": "digits_mlp", "method": "oho", "lr": 0.001, "seed": 0, "quick": True,
                              "oho_kwargs": {"fast_spike": factor}})
    plain = suite.run_one({"task": "digits_mlp", "method": "oho", "lr": 0.001, "seed": 0, "quick": True})
    never, always = run(1e9), run(1e-9)  # 1e-9: every loss after the first is a "spike"
    assert never["fast_spikes"] == 0 and never["test_loss"] == plain["test_loss"]
    assert never["trace"]["lr"] == plain["trace"]["lr"]
    assert always["fast_spikes"] >= 1 and "error" not in always
    # each spike put the lr back to its start (0.001), so it never got as far as without the guard
    assert max(always["trace"]["lr"]) < max(plain["trace"]["lr"])
