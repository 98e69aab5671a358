"""Short runs of every benchmark script (tiny sizes, CPU) so that the scripts cannot rot.

Each run writes into pytest's tmp_path, never into benchmarks/results/. The checks are structural (the
results file carries config, versions, device, curves, hyperparameter trajectories and final figures;
plot.py draws it), plus the few behaviours the benchmarks promise: every method starts from the same
weights, only OHO moves its hyperparameters, validation images are never augmented.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import ohotorch  # noqa: E402
import plot  # noqa: E402

pytest.importorskip("sklearn")

# Small everything, one CPU thread (fast, and immune to a busy second core), no progress bars.
BASE = ["--device", "cpu", "--threads", "1", "--progress", "false"]
DIGITS = BASE + ["--epochs", "2", "--n-train", "120", "--n-val", "60", "--n-test", "60", "--batch-size", "30",
                 "--val-batch-size", "30", "--width", "16"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The scripts set torch's thread count; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(path: Path) -> dict:
    assert path.exists(), f"no results file at {path}"
    return json.loads(path.read_text())


def _check_header(payload: dict, kind: str, synthetic: bool, epochs: int = 2) -> None:
    assert payload["kind"] == kind
    assert payload["synthetic"] is synthetic
    env = payload["environment"]
    for name in ("torch", "torchvision", "numpy", "ohotorch"):
        assert env["versions"][name], name
    assert env["device"] == "cpu" and env["device_name"] and env["ohotorch_source"]["sha256"]
    assert payload["config"]["task"]["epochs"] == epochs


def _check_run(result: dict, epochs: int) -> None:
    curves = result["curves"]
    assert curves["epoch"] == list(range(epochs + 1))
    for key in ("train_loss", "val_loss", "test_loss", "test_acc", "wall_time", "lr", "weight_decay"):
        assert len(curves[key]) == epochs + 1, key
    assert all(len(row) == len(result["groups"]) for row in curves["lr"])
    assert result["trace"]["step"], "no per-step trace"
    final = result["final"]
    assert not final["diverged"] and math.isfinite(final["test_loss"]) and 0.0 <= final["test_acc"] <= 1.0


def _plots(path: Path, tmp_path: Path, expected: int) -> None:
    figures = plot.main([str(path), "--out-dir", str(tmp_path / "figures")])
    assert len(figures) == expected and all(f.suffix == ".png" and f.stat().st_size > 0 for f in figures)


def test_digits_compares_every_method(tmp_path):
    import digits

    methods = ",".join(common.ALL_METHODS)
    out = tmp_path / "digits.json"
    digits.main(DIGITS + ["--seeds", "1", "--methods", methods, "--n-groups", "2", "--out", str(out)])
    payload = _load(out)
    _check_header(payload, "compare", synthetic=False)
    results = {name: runs[0] for name, runs in payload["methods"].items()}  # one seed
    assert list(results) == list(common.ALL_METHODS)
    for result in results.values():
        _check_run(result, epochs=2)
    # Same seed, same initial weights: every method starts from the same losses.
    initial = {r["curves"]["test_loss"][0] for r in results.values()}
    assert len(initial) == 1
    # Baselines keep or schedule their lr; OHO moves lr and weight decay, per group when layerwise.
    assert results["sgd"]["curves"]["lr"][-1] == [0.1]
    assert results["cosine"]["curves"]["lr"][-1][0] < 0.1
    for name in common.OHO_METHODS:
        trace = results[name]["trace"]
        assert trace["lr"][-1] != trace["lr"][0] and trace["hypergradient"]["lr"]
    assert len(results["oho_layer_exact"]["groups"]) == 4
    assert len(results["oho_grouped_exact"]["groups"]) == 2
    assert [row["method"] for row in payload["summary"]] == list(common.ALL_METHODS)
    _plots(out, tmp_path, expected=3)


def test_mnist_synthetic_cnn(tmp_path):
    import mnist

    mnist.main(BASE + ["--epochs", "2", "--synthetic", "true", "--model", "cnn", "--width", "8", "--n-train", "64",
                       "--n-val", "32", "--n-test", "32", "--batch-size", "16", "--val-batch-size", "16",
                       "--methods", "sgd,step,oho_layer_exact", "--seeds", "2", "--results-dir", str(tmp_path)])
    payload = _load(tmp_path / "compare_cnn_synthetic.json")
    _check_header(payload, "compare", synthetic=True)
    for runs in payload["methods"].values():
        assert len(runs) == 2  # --seeds 2
        for run in runs:
            _check_run(run, epochs=2)
    summary = payload["summary"][0]
    assert summary["seeds"] == 2 and len(summary["per_seed_test_loss"]) == 2


def test_cifar10_synthetic_resnet18(tmp_path):
    import cifar10_resnet18 as cifar

    out = tmp_path / "cifar.json"
    payload = cifar.main(BASE + ["--epochs", "1", "--synthetic", "true", "--image-size", "8",
                                 "--n-train", "8", "--n-val", "4", "--n-test", "4", "--train-eval-size", "4",
                                 "--batch-size", "4", "--val-batch-size", "4", "--eval-batch-size", "4",
                                 "--workers", "0", "--methods", "adam,oho_global,oho_layer_blockwise",
                                 "--out", str(out)])
    saved = _load(out)
    _check_header(saved, "compare", synthetic=True, epochs=1)
    assert set(saved["methods"]) == {"adam", "oho_global", "oho_layer_blockwise"}
    assert len(saved["methods"]["oho_layer_blockwise"][0]["groups"]) > 20  # one per ResNet18 layer
    assert payload["methods"]["oho_global"][0]["curves"]["epoch"] == [0, 1]


def test_cifar10_validation_is_not_augmented():
    import cifar10_resnet18 as cifar

    cfg = cifar.Config(synthetic=True, image_size=8, n_train=8, n_val=4, n_test=4, train_eval_size=4, workers=0,
                       batch_size=4, val_batch_size=4, eval_batch_size=4, device="cpu")
    data = cifar.load_data(cfg, torch.device("cpu"))
    train_transform = repr(data.train.dataset.dataset.transform)
    assert "RandomCrop" in train_transform and "RandomHorizontalFlip" in train_transform
    for loader in [data.val, *data.evals.values()]:
        assert "Random" not in repr(loader.dataset.dataset.transform)
    first, second = (torch.cat([x for x, _ in data.evals["val"]]) for _ in range(2))
    assert torch.equal(first, second)
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_search_counts_runs_to_target(tmp_path):
    import search

    out = tmp_path / "search.json"
    search.main(DIGITS + ["--task", "digits", "--trials", "3", "--tpe-startup", "1",
                          "--search-methods", "sgd,adam", "--samplers", "random,tpe", "--out", str(out)])
    payload = _load(out)
    _check_header(payload, "search", synthetic=False)
    assert len(payload["trials"]) == 2 * 2 * 3
    assert all(t["wall_time_s"] > 0 for t in payload["trials"])
    rows = {row["method"]: row for row in payload["summary"]}
    assert set(rows) == {"sgd/random", "sgd/tpe", "adam/random", "adam/tpe", "oho_global"}
    assert payload["target_source"] == "oho_global"
    assert payload["target"] == pytest.approx(payload["oho"]["oho_global"]["final"]["test_loss"])
    assert rows["oho_global"]["runs_to_target"] == 1
    for row in rows.values():
        assert row["runs_to_target"] is None or 1 <= row["runs_to_target"] <= 3
    _plots(out, tmp_path, expected=2)


def test_time_to_target_uses_the_incumbent():
    import search

    trials = [{"val_loss": 1.0, "test_loss": 0.9, "wall_time_s": 2.0},
              {"val_loss": 2.0, "test_loss": 0.1, "wall_time_s": 3.0},  # best test, but not the incumbent
              {"val_loss": 0.5, "test_loss": 0.4, "wall_time_s": 4.0}]
    result = search.time_to_target(trials, target=0.5, objective="val_loss")
    assert result["runs_to_target"] == 3 and result["wall_to_target_s"] == 9.0
    assert result["oracle_runs_to_target"] == 2 and result["oracle_wall_to_target_s"] == 5.0


def test_robustness_grid_and_reset(tmp_path):
    import robustness

    out = tmp_path / "robustness.json"
    robustness.main(DIGITS + ["--task", "digits", "--grid-lrs", "0.05,0.2", "--grid-wds", "1e-4",
                              "--resets", "lr=0.5", "--out", str(out)])
    payload = _load(out)
    _check_header(payload, "robustness", synthetic=False)
    assert len(payload["grid"]["runs"]) == 2 * 2
    assert {row["method"] for row in payload["grid"]["summary"]} == {"sgd", "oho_global"}
    runs = payload["reset"]["runs"]
    assert [(r["method"], r["reset"]) for r in runs] == [
        ("oho_global", "none"), ("oho_global", "lr=0.5"), ("sgd", "none"), ("sgd", "lr=0.5")]
    reset_sgd = runs[3]["curves"]["lr"]
    assert reset_sgd[0] == [0.1] and reset_sgd[-1] == [0.5]
    _plots(out, tmp_path, expected=2)


def test_config_parser():
    cfg = common.parse_config(["--epochs", "3", "--methods", "sgd,adam", "--nesterov", "--momentum=0.9",
                               "--meta-lr", "none", "--tune", "lr"], common.TrainConfig)
    assert (cfg.epochs, cfg.methods, cfg.nesterov, cfg.momentum, cfg.meta_lr, cfg.tune) == \
        (3, ("sgd", "adam"), True, 0.9, None, ("lr",))
    assert common.parse_config(["--bf16", "false", "--meta-lr", "0.01"], common.TrainConfig).meta_lr == 0.01
    with pytest.raises(ValueError, match="Unknown option"):
        common.parse_config(["--epoch", "3"], common.TrainConfig)
    with pytest.raises(ValueError, match="Unknown method"):
        common.parse_config(["--methods", "sgd,nope"], common.TrainConfig)
    import digits

    quick = common.parse_config(["--quick"], digits.Config)
    assert quick.quick and quick.epochs == digits.Config.PRESETS["quick"]["epochs"]
    assert common.parse_config(["--quick", "--epochs", "7"], digits.Config).epochs == 7  # explicit wins
    assert common.parse_options(["discount=0.9", "reset_every=50", "hvp=central"]) == \
        {"discount": 0.9, "reset_every": 50, "hvp": "central"}


def test_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(BENCH / "digits.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--epochs" in done.stdout and "--methods" in done.stdout


def test_overhead_precisions_and_compile(tmp_path):
    import overhead

    out = tmp_path / "overhead.json"
    # aot_eager: the compile machinery (dynamo, AOT autograd) without inductor's C++ build time.
    overhead.main(BASE[:4] + ["--models", "mlp", "--variants", "sgd,oho_global_full,adam,oho_adam_greedy",
                              "--precisions", "fp32,bf16", "--compiled", "false,true", "--compile-backend",
                              "aot_eager", "--batch-size", "8", "--val-batch-size", "8", "--iters", "1",
                              "--warmup", "1", "--out", str(out)])
    payload = _load(out)
    assert payload["environment"]["device"] == "cpu" and payload["config"]["precisions"] == ["fp32", "bf16"]
    rows = payload["results"]["mlp"]["variants"]
    assert set(rows) == {overhead.row_key(v, p, c) for v in ("sgd", "oho_global_full", "adam", "oho_adam_greedy")
                         for p in ("fp32", "bf16") for c in (False, True)}
    assert "oho_global_full" in rows and "oho_global_full@bf16+compiled" in rows  # fp32 eager: plain keys
    for key, row in rows.items():
        setting = "" if "@" not in key else "@" + key.split("@")[1]
        assert row["baseline"] == overhead.baseline_of(row["variant"]) + setting  # same precision, same compile
        assert row["ms"] > 0 and row["ratio_to_baseline"] > 0
        if row["compiled"]:
            assert row["warmup_steps"] == 3 and row["frames_compiled_warmup"] >= 1
            assert row["recompiles_timed"] == 0 and row["ratio_to_eager"] > 0
    assert rows["sgd@bf16"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert rows["oho_global_full@bf16"]["tangents"] == 2 and rows["oho_global_full@bf16"]["tangent_buffers"] == 4
    assert rows["oho_adam_greedy@bf16"]["tangents"] == 2
    assert "peak_x_params" not in rows["oho_global_full"]  # CUDA only
    assert overhead.Config().suffix() == ""  # the default run keeps its file name
    assert overhead.Config(precisions=("bf16",), compiled=(True,)).suffix() == "_bf16_compiled"
    with pytest.raises(ValueError, match="precisions"):
        overhead.Config(precisions=("fp16",))


def test_bf16_accuracy_quick(tmp_path):
    import bf16_accuracy

    out = tmp_path / "bf16.json"
    bf16_accuracy.main(BASE[:4] + ["--quick", "--out", str(out)])
    payload = _load(out)
    assert payload["kind"] == "bf16_accuracy" and payload["environment"]["device"] == "cpu"
    assert payload["config"]["steps"] == 3 and payload["config"]["models"] == ["mlp"]
    greedy, full = payload["results"]["mlp"]["greedy"], payload["results"]["mlp"]["full"]
    assert set(greedy["trajectory"]) == {"bf16", "fp64"}  # no finite differences: no step settings
    assert set(full["trajectory"]) == {"bf16", "bf16, fp32 step", "fp32, bf16 step", "bf16, fd_rel 0.03", "fp64"}
    assert set(full["same_state_val"]) == {"bf16", "fp64"}  # one per precision
    assert set(full["same_state_step"]) == set(full["trajectory"])
    for block in (greedy, full):
        assert len(block["reference"]["hypergradients"]["lr"]) == 3
        for comparison in ("trajectory", "same_state_val", "same_state_step"):
            for entry in block[comparison].values():
                for metrics in entry["metrics"].values():
                    assert math.isfinite(metrics["median_rel_err"]) and 0.0 <= metrics["sign_agreement"] <= 1.0
        for entry in block["same_state_step"].values():
            assert len(entry["tangent_rel_err"]["lr"]) == 3
    # Greedy horizon (no finite differences): float32's own error, seen from float64, is far below bf16's.
    err = {s: greedy["trajectory"][s]["metrics"]["lr"]["median_rel_err"] for s in ("bf16", "fp64")}
    assert err["fp64"] < 1e-4 and err["fp64"] < err["bf16"]
    # meta_lr=0: a finite-difference step changes tangents, never the weights.
    assert full["trajectory"]["fp32, bf16 step"]["weight_drift"] == 0.0
    assert len(payload["summary"]) == 2 + 2 + 2 + 5 + 2 + 5


def test_method_names_mean_one_algorithm_in_every_script():
    import overhead

    spec = common.parse_method
    assert spec("oho_global") == dataclasses.replace(spec("oho_greedy"), name="oho_global")
    assert (spec("oho_layer_blockwise_full").groups, spec("oho_layer_blockwise_full").influence,
            spec("oho_layer_blockwise_full").discount) == ("layer", "blockwise", 1.0)
    assert (spec("oho_adamw_discount0.9_h10").inner, spec("oho_adamw_discount0.9_h10").discount,
            spec("oho_adamw_discount0.9_h10").hyper_every) == ("adamw", 0.9, 10)
    for bad in ("oho_global_blockwise", "oho_full_greedy", "oho_discount2", "oho_h0", "sgd_full", "oho_layer_x"):
        assert not common.is_method(bad), bad
    torch.manual_seed(0)
    model = common.mlp(8, 8, 3, 2)
    train_cfg = common.TrainConfig(momentum=0.9)
    overhead_cfg = overhead.Config()
    for name, cls, groups, discount, influence in [
            ("oho_global", ohotorch.OHO, 1, 0.0, "exact"), ("oho_global_full", ohotorch.OHO, 1, 1.0, "exact"),
            ("oho_layer_blockwise_discount0.5", ohotorch.OHO, 3, 0.5, "blockwise"),
            ("oho_adam_full", ohotorch.OHOAdam, 1, 1.0, "exact"),
            ("oho_adamw_greedy", ohotorch.OHOAdamW, 1, 0.0, "exact")]:
        # the training loop (run_method) and overhead.py build the same algorithm for a name
        built = common.build_optimizer(name, model, train_cfg)[0], overhead.make_optimizer(name, model, overhead_cfg)
        for opt in built:
            assert type(opt) is cls and len(opt.param_groups) == groups, name
            assert (opt.discount, opt.influence) == (discount, influence), name
    opt, sched = common.build_optimizer("cosine", model, common.OptimizerSettings(lr=0.5, epochs=4))
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.5 and sched.T_max == 4
    with pytest.raises(ValueError, match="horizon in the method name"):
        common.build_optimizer("oho_global", model, dataclasses.replace(train_cfg, oho_options=("discount=1.0",)))


def test_parser_help_and_bare_arguments():
    text = common.config_help(common.TrainConfig)
    assert "--n-groups" in text and "--n_groups" in text and "hyperparameter groups" in text  # comment as help
    cfg = common.parse_config(["a.json", "--dpi=80", "b.json", "--out_dir", "x"], plot.PlotConfig, positional="inputs")
    assert (cfg.inputs, cfg.dpi, cfg.out_dir) == (("a.json", "b.json"), 80, "x")

    @dataclasses.dataclass
    class Flags:
        quick: bool = False
        inputs: Tuple[str, ...] = ()

    assert common.parse_config(["--quick", "a.json"], Flags, positional="inputs") == Flags(True, ("a.json",))
    assert common.parse_config(["--quick", "false", "a.json"], Flags, positional="inputs") == Flags(False, ("a.json",))
    with pytest.raises(common.ConfigError, match="cannot read"):
        common.parse_config(["--epochs", "x"], common.TrainConfig)


def test_aux_task_quick(tmp_path):
    import aux_task

    out = tmp_path / "aux.json"
    payload = aux_task.main(["--quick", "--epochs", "1", "--n-train", "60", "--width", "8", "--out", str(out)])
    saved = _load(out)
    assert saved["kind"] == "aux_task" and saved["environment"]["device"] == "cpu"
    assert saved["environment"]["versions"]["torch"] and "ohotorch" in saved["environment"]["versions"]
    assert len(saved["runs"]["grid"]) == len(saved["config"]["rho_grid"])
    oho, l2 = payload["runs"]["oho_aux_discount0"][0], payload["runs"]["oho_l2"][0]
    assert oho["final_rho"] != saved["config"]["rho0"]  # rho was tuned
    assert len(l2["final_l2"]) == 3 and l2["final_l2"] != [saved["config"]["l2_0"]] * 3
    assert {r["rho"] for r in saved["runs"]["grid"]} == set(saved["config"]["rho_grid"])


def test_host_time_counts_the_optimizers_own_time_and_launches(tmp_path):
    import host_time
    out = tmp_path / "host_time.json"
    payload = host_time.main(["--variants", "sgd,oho_greedy,oho_global_full", "--iters", "2", "--warmup", "2",
                              "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["parameters"] == 62 and saved["environment"]["device"] == "cpu"
    rows = payload["results"]
    for row in rows.values():
        assert row["step_ms"] > row["closure_ms"] > 0 and math.isfinite(row["host_ms"])
    assert rows["sgd"]["cuda_launches"] < rows["oho_greedy"]["cuda_launches"] < rows["oho_global_full"]["cuda_launches"]
    assert len(list(host_time.narrow_resnet18(4).buffers())) == 60
    floats, counters = [torch.zeros(2)] * 3, [torch.zeros((), dtype=torch.int64)]
    assert host_time.cuda_launches("_foreach_copy_", (floats, floats)) == 1
    assert host_time.cuda_launches("_foreach_copy_", (floats + counters, floats + counters)) == 4  # per tensor
    assert host_time.cuda_launches("view", (floats[0],)) == 0
