"""Smoke tests of the benchmark suite (scripts/bench*.py): helpers on fake numbers, the
torch-exported peer graph against transformers, and one tiny end-to-end run. No timing asserts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import bench_onnx  # noqa: E402
import bench_onnx_worker  # noqa: E402
import bench_readme  # noqa: E402
import bench_scaling  # noqa: E402
import bench_torch_onnx  # noqa: E402

# -- helpers on fake numbers -----------------------------------------------------------------------


def test_median_ratio_summarize():
    assert bench_common.median([3.0, 1.0, 2.0]) == 2.0
    assert bench_common.median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert bench_common.ratio(3.0, 2.0) == 1.5
    assert bench_common.ratio(3.0, 0.0) is None and bench_common.ratio(None, 1.0) is None
    trials = [{"a": 1.0, "b": 9.0}, {"a": 3.0, "b": 7.0}, {"a": 2.0, "b": 8.0}]
    assert bench_common.summarize(trials) == {"a": 2.0, "b": 8.0}


def test_formatting_and_markdown_table():
    assert bench_common.fmt(12345.678) == "12,345.7"
    assert bench_common.fmt(None) == "-" and bench_common.fmt(float("nan")) == "-"
    assert bench_common.fmt_ratio(1.234) == "1.23x" and bench_common.fmt_ratio(None) == "-"
    text = bench_common.markdown_table(["x", "y"], [[1, "a"], [2, "b"]])
    assert text.splitlines() == ["| x | y |", "|---|---|", "| 1 | a |", "| 2 | b |"]


def test_machine_info_and_memory():
    info = bench_common.machine_info()
    assert info["cores"] >= 1 and info["cpu"] and len(info["load_average"]) == 3
    assert info["versions"]["numpy"] and info["versions"]["python"]
    assert bench_common.peak_rss_mb() >= bench_common.current_rss_mb() * 0.5 > 0


def fake_runs(onnx_ort_gen: float) -> dict:
    def run(prompt, gen, mb):
        rates = {"prompt_tps": prompt, "generation_tps": gen}
        return {"batch1": rates, "batch8": dict(rates), "peak_rss_mb": mb}

    return {
        "mlx": run(1000.0, 100.0, 150.0),
        "onnx-portable": run(2000.0, 110.0, 170.0),
        "onnx-ort": run(3000.0, onnx_ort_gen, 180.0),
        "torch-onnx": run(1500.0, 80.0, 175.0),
    }


def test_onnx_ratios_goals_and_tables():
    runs = fake_runs(onnx_ort_gen=120.0)
    ratios = bench_onnx.compare(runs)
    assert ratios["onnx-ort/torch-onnx"]["batch1.generation_tps"] == pytest.approx(1.5)
    assert ratios["torch-onnx/onnx-ort"]["batch8.prompt_tps"] == pytest.approx(0.5)
    models = {"gpt2-small": {"runners": runs, "ratios": ratios}}
    goal = bench_onnx.goals(models)["gpt2-small.batch1"]
    assert goal["ort_vs_torch_onnx_met"] and goal["onnx_ort_vs_mlx_met"]
    slow = {"m": {"runners": fake_runs(90.0), "ratios": bench_onnx.compare(fake_runs(90.0))}}
    assert not bench_onnx.goals(slow)["m.batch8"]["ort_vs_torch_onnx_met"]  # 1.125 < 1.3
    text = bench_onnx.table({"models": models})
    assert "| gpt2-small | 1 | onnx-ort | 3,000.0 | 2.00x | 3.00x | 120.0 | 1.50x | 1.20x |" in text
    rows = bench_readme.rows_onnx({"models": models})
    assert {r["peer"] for r in rows} == {"torch-onnx", "mlx"} and all(r["ratio"] for r in rows)


def test_summarize_profile():
    events = [
        {"cat": "Session", "name": "model_run", "dur": 1000},
        {"cat": "Node", "name": "a_kernel_time", "dur": 600, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_kernel_time", "dur": 200, "args": {"op_name": "Add"}},
        {"cat": "Node", "name": "b_fence_before", "dur": 5, "args": {"op_name": "Add"}},
    ]
    p = bench_onnx_worker.summarize_profile(events)
    assert p["runs"] == 1 and p["kernel_ms"] == pytest.approx(0.8)
    assert p["outside_kernels_share"] == pytest.approx(0.2)
    assert list(p["ops"]) == ["MatMul", "Add"] and p["ops"]["MatMul"]["share"] == 0.75


def test_scaling_fit_recovers_linear_and_quadratic_parts():
    points = [(L, 5.0 + 0.01 * L) for L in (64, 128, 256, 512, 1024, 2048)]
    fit = bench_scaling.fit_linear_quadratic(points)
    assert fit["a_us"] == pytest.approx(5.0) and fit["b_us"] == pytest.approx(0.01)
    assert fit["crossover_context"] == pytest.approx(500.0) and fit["r2"] == pytest.approx(1.0)
    f = bench_scaling.flops_per_token(256, 1536)
    assert f["attention"] == f["linear"]  # L = 2D + F = 6D


def fake_results() -> dict:
    machine = {
        "cpu": "Test CPU",
        "cores": 2,
        "load_average": [0.5, 0.5, 0.5],
        "versions": dict.fromkeys(("python", "mlx", "mlx-lm", "torch", "onnxruntime"), "1")
        | {"transformers": "1"},
    }
    train = {
        "configs": {
            "small": {
                "config": dict(layers=4, width=128, context=64, batch=12),
                "results": {
                    "mlx": {"tokens_per_sec": 3000.0},
                    "torch_eager": {"tokens_per_sec": 2000.0},
                    "torch_compile": {"tokens_per_sec": 4000.0},
                },
            }
        },
        "machine": {"blas": "blas: openblas Test"},
    }
    section = {"command": "python scripts/bench.py", "when": "now", "machine": machine}
    section["load_average_end"] = [0.6, 0.5, 0.5]
    return {"sections": {"train": {**section, "data": {"timing": train, "memory": {}}}}}


def test_bench_table_and_readme_block(tmp_path):
    results = fake_results()
    rows = bench_readme.all_rows(results)
    assert [(r["peer"], r["ratio"]) for r in rows] == [
        ("PyTorch eager", 1.5),
        ("torch.compile", 0.75),
    ]
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Benchmarks\n\n{bench_readme.START}\nold\n{bench_readme.END}\n\n## Next\n"
    )
    assert bench_readme.update_readme(results, readme)
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{bench_readme.END}\n\n## Next\n")
    assert "| train | train 4L/128w/ctx 64/b 12 tok/s | MLX | 3,000.0 |" in text
    assert "`python scripts/bench.py`" in text and "Test CPU, 2 cores" in text
    assert "blas: openblas Test" in text
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert not bench_readme.update_readme(results, bare)


def test_rows_whose_trials_vary_by_more_than_ten_percent_say_so():
    assert bench_common.spread([100.0, 104.0, 96.0]) == pytest.approx(0.08)
    assert bench_common.spread([100.0, 130.0, 90.0]) == pytest.approx(0.4)
    sizes = {
        "small": {
            "config": {"num_hidden_layers": 4, "hidden_size": 256},
            **{
                batch: {
                    "ours": {"prompt_tps": 20.0, "generation_tps": 10.0},
                    "mlx_lm": {"prompt_tps": 10.0, "generation_tps": 10.0},
                    "spread": {"prompt_tps": 0.25, "generation_tps": 0.05},
                }
                for batch in ("batch1", "batch8")
            },
        }
    }
    rows = bench_readme.rows_generate({"timing": {"sizes": sizes}})
    table = bench_readme.table(rows)
    assert "| 2.00x (trials vary 25%) |" in table and "| 1.00x |" in table


# -- the torch-exported peer computes what transformers computes ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_export_matches_transformers(family, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import mlx.core as mx

    from mlx_transformer.checkpoint.hf import save_hf
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    mx.random.seed(0)
    config = bench_onnx.model_config(family, "tiny")
    config["vocab_size"] = 300
    model = Transformer(ModelConfig(**config))
    save_hf(model, tmp_path / "hf")
    io = bench_torch_onnx.export_torch_onnx(tmp_path / "hf", tmp_path / "onnx")
    assert io["num_hidden_layers"] == 2 and (tmp_path / "onnx/model.onnx").is_file()
    # a left-padded batch, prefill and one cached decode step, against transformers itself
    assert bench_torch_onnx.torch_export_parity(tmp_path / "hf", tmp_path / "onnx") <= 1e-4


# -- one tiny end-to-end run ---------------------------------------------------------------------


@pytest.mark.slow
def test_bench_quick_onnx_writes_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPTS / "bench.py"), "--quick", "--only", "onnx"]
    proc = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    section = results["sections"]["onnx"]
    assert section["machine"]["cores"] >= 1 and "--quick" in section["command"]
    models = section["data"]["models"]
    assert set(models) == {"gpt2-tiny", "llama-tiny"}
    for m in models.values():
        assert set(m["runners"]) == set(bench_onnx.RUNNERS)
        for run in m["runners"].values():
            assert "error" not in run, run.get("error")
            assert run["batch8"]["generation_tps"] > 0 and run["peak_rss_mb"] > 0
        assert m["parity"]["torch-onnx_vs_transformers"] <= 1e-4
        assert max(v for k, v in m["parity"].items() if k.endswith("_vs_mlx")) <= 1e-3
    assert results["rows"] and "| onnx |" in proc.stdout


def test_window_rows_are_higher_is_better():
    """bench_window.py's results as table rows: ratios above 1 mean the window (rolling cache)
    wins, for throughput and for the slowest decode step alike."""
    data = {
        "decode": {
            "window": 256,
            "new_tokens": 2048,
            "ours": {"generation_tps": 300.0, "peak_mb_after_8w": 50.0},
            "mlx_lm": {"generation_tps": 200.0, "peak_mb_after_8w": 60.0},
        },
        "train": [
            {"context": 1024, "window": None, "batch": 4, "step_s": 2.0, "peak_memory_mb": 9.0},
            {"context": 1024, "window": 256, "batch": 4, "step_s": 1.0, "peak_memory_mb": 8.0},
        ],
        "stall": {
            "new_tokens": 1024,
            "rolling": {"longest_step_ms": 10.0},
            "slide": {"longest_step_ms": 40.0},
        },
    }
    data["attention"] = [
        {
            "context": 2048,
            "window": 256,
            "full": {"ms": 800.0, "peak_mb": 900.0},
            "dense": {"ms": 1000.0, "peak_mb": 900.0},
            "blocked": {"ms": 200.0, "peak_mb": 100.0},
        }
    ]
    rows = bench_readme.rows_window(data)
    assert [round(r["ratio"], 2) for r in rows] == [1.5, 2.0, 4.0, 5.0, 4.0]
    assert rows[1]["ours_value"] == 4 * 1024 / 1.0
