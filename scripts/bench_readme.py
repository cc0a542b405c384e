"""The benchmark table of scripts/bench.py and the README block it is written into.

One row per (workload, ours, peer) out of each section's results; `update_readme` rewrites the
text between `<!-- bench:start -->` and `<!-- bench:end -->` in README.md.
"""

from __future__ import annotations

from pathlib import Path

from bench_common import NOISY, fmt, fmt_ratio, markdown_table, ratio, spread

README = Path(__file__).resolve().parents[1] / "README.md"
SCALING_PNG = "docs/scaling.png"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


# -- one table -------------------------------------------------------------------------------------


def row(
    section, workload, ours, ours_v, peer, peer_v, ours_mb=None, peer_mb=None, noise=None
) -> dict:
    """One table row; `noise`: the wider (max - min) / median of the two sides' trials."""
    return {
        "noise": noise,
        "section": section,
        "workload": workload,
        "ours": ours,
        "ours_value": ours_v,
        "peer": peer,
        "peer_value": peer_v,
        "ratio": ratio(ours_v, peer_v),
        "ours_peak_mb": ours_mb,
        "peer_peak_mb": peer_mb,
    }


def rows_train(data: dict) -> list[dict]:
    out, names = [], {"torch_eager": "PyTorch eager", "torch_compile": "torch.compile"}
    mem = data.get("memory", {})
    for config, r in data.get("timing", {}).get("configs", {}).items():
        res, c = r["results"], r["config"]
        label = f"train {c['layers']}L/{c['width']}w/ctx {c['context']}/b {c['batch']} tok/s"
        ours_mb = mem.get(f"{config}/mlx", {}).get("peak_rss_mb")
        for impl, peer in names.items():
            if impl in res and "mlx" in res:
                peer_mb = mem.get(f"{config}/{impl}", {}).get("peak_rss_mb")
                ours_v, peer_v = res["mlx"]["tokens_per_sec"], res[impl]["tokens_per_sec"]
                out.append(row("train", label, "MLX", ours_v, peer, peer_v, ours_mb, peer_mb))
    return out


def rows_generate(data: dict) -> list[dict]:
    out, mem = [], data.get("memory", {})
    for size, r in data.get("timing", {}).get("sizes", {}).items():
        c = r["config"]
        name = f"Llama {c['num_hidden_layers']}L/{c['hidden_size']}w"
        ours_mb = mem.get(f"{size}/ours", {}).get("peak_rss_mb")
        peer_mb = mem.get(f"{size}/mlx_lm", {}).get("peak_rss_mb")
        for batch in ("batch1", "batch8"):
            for metric in ("prompt_tps", "generation_tps"):
                label = f"{name} b{batch[5:]} {metric.split('_')[0]} tok/s"
                ours_v, peer_v = r[batch]["ours"][metric], r[batch]["mlx_lm"][metric]
                noise = r[batch].get("spread", {}).get(metric)
                sides = ("ours", ours_v, "mlx-lm", peer_v, ours_mb, peer_mb, noise)
                out.append(row("generate", label, *sides))
    return out


ONNX_PAIRS = (
    ("onnx-ort", "torch-onnx", ("prompt_tps", "generation_tps")),
    ("onnx-portable", "torch-onnx", ("prompt_tps", "generation_tps")),
    ("onnx-ort", "mlx", ("generation_tps",)),
    ("onnx-portable", "mlx", ("generation_tps",)),
)


def rows_onnx(data: dict) -> list[dict]:
    out = []
    for model, m in data.get("models", {}).items():
        runs = m["runners"]
        for batch in ("batch1", "batch8"):
            for ours, peer, metrics in ONNX_PAIRS:
                a, b = runs.get(ours, {}), runs.get(peer, {})
                if "error" in a or "error" in b or not a or not b:
                    continue
                for metric in metrics:
                    label = f"{model} b{batch[5:]} {metric.split('_')[0]} tok/s"
                    noise = max(
                        spread(t[metric] for t in side.get("trials", {}).get(batch, [])) or 0.0
                        for side in (a, b)
                    )
                    out.append(
                        row(
                            "onnx",
                            label,
                            ours,
                            a[batch][metric],
                            peer,
                            b[batch][metric],
                            a["peak_rss_mb"],
                            b["peak_rss_mb"],
                            noise,
                        )
                    )
    return out


def rows_window(data: dict) -> list[dict]:
    """Sliding window: decode over 8x the window vs mlx-lm's RotatingKVCache; training with a
    window vs without; the rolling cache's longest step vs `--overflow slide`'s."""
    out = []
    d = data.get("decode")
    if d:
        ours, theirs = d["ours"], d["mlx_lm"]
        label = f"decode {d['new_tokens']} tok, window {d['window']}, tok/s"
        out.append(
            row("window", label, "rolling cache", ours["generation_tps"], "mlx-lm rotating",
                theirs["generation_tps"], ours["peak_mb_after_8w"], theirs["peak_mb_after_8w"])
        )  # fmt: skip
    train = {(r["context"], r["window"]): r for r in data.get("train", [])}
    for (L, W), r in train.items():
        full = train.get((L, None))
        if W is not None and full:
            label = f"train ctx {L} tok/s"
            tps = [x["batch"] * L / x["step_s"] for x in (r, full)]
            out.append(
                row("window", label, f"window {W}", tps[0], "full attention", tps[1],
                    r["peak_memory_mb"], full["peak_memory_mb"])
            )  # fmt: skip
    for r in data.get("attention", []):
        label = f"attention fwd+bwd, L {r['context']}, calls/s"
        for peer in ("full", "dense"):
            name = {"full": "causal full", "dense": f"window {r['window']} as a mask"}[peer]
            out.append(
                row("window", label, f"window {r['window']} blocked", 1e3 / r["blocked"]["ms"],
                    name, 1e3 / r[peer]["ms"], r["blocked"]["peak_mb"], r[peer]["peak_mb"])
            )  # fmt: skip
    s = data.get("stall")
    if s:
        label = f"slowest of {s['new_tokens']} decode steps, steps/s (the slide's re-prefill)"
        out.append(
            row("window", label, "rolling cache", 1e3 / s["rolling"]["longest_step_ms"],
                "--overflow slide", 1e3 / s["slide"]["longest_step_ms"])
        )  # fmt: skip
    return out


def rows_quality(data: dict) -> list[dict]:
    """Training seconds to the target loss (bench_quality.py, interpolated between checkpoints):
    lower wins, so the ratio is the peer's time over ours."""
    out, runs = [], data.get("runs", {})
    for r in data.get("ratios", []):
        ours, peer = runs[r["run"]], runs[r["vs"]]
        val = "whole val" if not data.get("val_batches") else f"{data['val_batches']} val batches"
        label = f"train s to {data['target']} nats/char, {val} (lower wins)"
        line = row(
            "quality", label, r["run"], ours["interpolated_s"], r["vs"], peer["interpolated_s"]
        )
        line["ratio"] = r["interpolated_s"]
        out.append(line)
    return out


def all_rows(results: dict) -> list[dict]:
    makers = {
        "train": rows_train,
        "generate": rows_generate,
        "onnx": rows_onnx,
        "window": rows_window,
        "quality": rows_quality,
    }
    out = []
    for name, maker in makers.items():
        section = results["sections"].get(name)
        if section and "error" not in section["data"]:
            out += maker(section["data"])
    return out


def noisy_note(noise: float | None) -> str:
    """Flag a row whose trials varied by more than 10%: its ratio is not to be trusted."""
    return f" (trials vary {noise:.0%})" if noise is not None and noise > NOISY else ""


def table(rows: list[dict]) -> str:
    headers = ["section", "workload", "ours", "", "peer", "", "ratio", "peak MiB ours / peer"]
    cells = [
        [
            r["section"],
            r["workload"],
            r["ours"],
            fmt(r["ours_value"]),
            r["peer"],
            fmt(r["peer_value"]),
            fmt_ratio(r["ratio"]) + noisy_note(r.get("noise")),
            f"{fmt(r['ours_peak_mb'], 0)} / {fmt(r['peer_peak_mb'], 0)}",
        ]
        for r in rows
    ]
    return markdown_table(headers, cells)


def scaling_text(data: dict) -> str:
    if not data or "error" in data:
        return ""
    cells = [
        [r["context"], r["batch"], f"{r['step_s'] * 1e3:,.0f}", f"{r['us_per_token']:.1f}"]
        + [f"{r['attention_share_fit']:.0%}", f"{r['peak_memory_mb']:,.0f}"]
        for r in data["by_context"]
    ]
    headers = ["context", "batch", "ms/step", "µs/token", "attention share (fit)", "peak MiB"]
    return (
        f"Training step vs context (width {data['fixed']['width']}, {data['fixed']['layers']} "
        f"layers, {data['fixed']['tokens_per_step']} tokens per step): {data['summary']}.\n\n"
        + markdown_table(headers, cells)
        + f"\n\n![training step time and memory vs context and width]({SCALING_PNG})\n"
    )


# -- README and JSON -------------------------------------------------------------------------------


def blas_line(results: dict) -> str:
    sections = results["sections"]
    train = sections.get("train", {}).get("data", {}).get("timing", {})
    gen = sections.get("generate", {}).get("data", {}).get("timing", {})
    return gen.get("blas_summary") or train.get("machine", {}).get("blas") or "n/a"


def readme_block(results: dict) -> str:
    lines = [START, ""]
    for name, s in results["sections"].items():
        m = s["machine"]
        v = m["versions"]
        lines.append(
            f"- **{name}** ({s['when']}): `{s['command']}` — {m['cpu']}, {m['cores']} cores, "
            f"load average {m['load_average'][0]} → {s['load_average_end'][0]}; "
            f"python {v['python']}, mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, torch {v['torch']}, "
            f"onnxruntime {v['onnxruntime']}, transformers {v['transformers']}"
        )
    lines += ["", f"MLX's BLAS: {blas_line(results)}.", ""]
    lines += [
        "Load averages are 1-minute averages at each section's start and end; the end includes the",
        "benchmark's own processes (up to 2 on 2 cores), and this VM reads about 1 when idle.",
        "",
    ]
    # The start is what other jobs left: 2 or more means at least a core was busy elsewhere.
    busy = [n for n, s in results["sections"].items() if s["machine"]["load_average"][0] >= 2.0]
    if busy:
        lines += [
            f"Shared machine: {', '.join(busy)} started at a load average of 2 or more (other jobs",
            "on the cores); PyTorch's OpenMP threads and onnxruntime's spinning threads suffer",
            "most from that. Rerun on an idle machine for clean numbers.",
            "",
        ]
    lines += [
        "Medians over trials; ratio = ours / peer (above 1: ours is faster); peak MiB = peak",
        "resident memory of a process running that implementation alone.",
        "",
        table(all_rows(results)),
        "",
    ]
    scaling = results["sections"].get("scaling", {}).get("data")
    text = scaling_text(scaling) if scaling else ""
    if text:
        lines += [text]
    lines.append(END)
    return "\n".join(lines)


def update_readme(results: dict, path: Path = README) -> bool:
    """Replace the text between the markers; False when the markers are missing."""
    text = path.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + readme_block(results) + tail)
    return True
