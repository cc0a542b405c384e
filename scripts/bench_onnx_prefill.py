"""Prompt (prefill) time of scripts/bench_onnx.py's ONNX graphs, alternating in one process.

    python scripts/bench_onnx_prefill.py [--families gpt2,llama] [--batches 1,8] [--trials 15]
        [--prompt-tokens 128] [--profile]

For each family: the models of `bench_onnx.prepare` (our portable and ort flavours, and
torch.onnx of the same weights), each prompt run the way `OnnxGenerator` runs it (`OnnxModel`,
shared KV buffers). Our graphs run twice: `logits_to_keep=1` (the LM head at the last position
only, what generation asks for) and `0` (every position's logits, as before that input existed);
the torch graph computes every position either way. One trial of every row in turn, so load
changes hit all rows alike; medians. Logits are checked against the torch graph's last row.
--profile adds onnxruntime's per-op kernel time of each row (separate profiling sessions).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import fmt_ratio, markdown_table, median  # noqa: E402
from bench_onnx import prepare  # noqa: E402
from bench_onnx_worker import summarize_profile  # noqa: E402

# (row name, folder in bench_onnx.prepare's paths, logits_to_keep)
ROWS = (
    ("ort, last logits", "onnx-ort", 1),
    ("ort, all logits", "onnx-ort", 0),
    ("portable, last logits", "onnx-portable", 1),
    ("portable, all logits", "onnx-portable", 0),
    ("torch-onnx", "torch-onnx", 1),
)
PEER = "torch-onnx"


def time_rows(paths: dict, prompts, trials: int) -> tuple[dict, dict]:
    """(ms per trial by row, max |last logits - the peer's|) for one batch of prompts."""
    import numpy as np

    from export.session import OnnxModel

    # A session per row, as in generation, where a session's prompts all keep the same.
    models = {name: OnnxModel(paths[folder], share_buffer=True) for name, folder, _ in ROWS}
    mask = np.ones_like(prompts)
    want, _ = models[PEER](prompts, mask, logits_to_keep=1)
    errors, times = {}, {name: [] for name, _, _ in ROWS}
    for name, _, keep in ROWS:  # warm-up and parity
        logits, _ = models[name](prompts, mask, logits_to_keep=keep)
        errors[name] = float(np.abs(logits[:, -1:] - want).max())
    for _ in range(trials):
        for name, _, keep in ROWS:
            tic = time.perf_counter()
            models[name](prompts, mask, logits_to_keep=keep)
            times[name].append((time.perf_counter() - tic) * 1e3)
    return times, errors


def profile_rows(paths: dict, prompts, trials: int, out_dir: Path) -> dict:
    """Per row: onnxruntime's kernel time by op type (ms per run, after a warm-up run), and the
    LM head's."""
    import json

    import numpy as np

    from export.providers import create_session, session_options
    from export.session import OnnxModel

    mask, out = np.ones_like(prompts), {}
    for name, folder, keep in ROWS:
        model = OnnxModel(paths[folder], share_buffer=True)
        so = session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(out_dir / folder)
        model.session, _ = create_session(model.dir / model.io["model"], "cpu", options=so)
        for _ in range(trials + 1):
            model(prompts, mask, logits_to_keep=keep)
        events = json.loads(Path(model.session.end_profiling()).read_text())
        runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
        events = [e for e in events if e.get("ts", 0) > runs[0]]  # the first run warms up
        summary = summarize_profile(events)
        head = sum(
            e["dur"]
            for e in events
            if e.get("cat") == "Node" and e.get("name", "").startswith("/model/lm_head/")
        )
        runs = max(summary["runs"], 1)
        out[name] = {
            "run_ms": summary["run_ms"] / runs,
            "lm_head_ms": head / 1e3 / runs,
            "ops": {op: v["ms"] / runs for op, v in summary["ops"].items()},
        }
    return out


def report(family: str, batch: int, times: dict, errors: dict) -> str:
    peer = median(times[PEER])
    rows = []
    for name, values in times.items():
        m = median(values)
        rows.append([family, batch, name, f"{m:.1f}", f"{min(values):.1f}",
                     fmt_ratio(peer / m), f"{errors[name]:.1e}"])  # fmt: skip
    headers = ["model", "batch", "graph", "median ms", "min ms", "speed vs torch-onnx"]
    return markdown_table(headers + ["max |Δ last logits|"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="gpt2,llama")
    p.add_argument("--size", default="small")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="onnxruntime per-op kernel time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import numpy as np

    print(f"load average {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            prepared = prepare(family, args.size, Path(tmp), args.seed)
            paths, vocab = prepared["paths"], prepared["config"]["vocab_size"]
            rng = np.random.default_rng(args.seed)
            for batch in (int(b) for b in args.batches.split(",")):
                prompts = rng.integers(4, vocab, (batch, args.prompt_tokens))
                times, errors = time_rows(paths, prompts, args.trials)
                print(report(family, batch, times, errors), flush=True)
                print(f"load average {os.getloadavg()}", file=sys.stderr)
                if args.profile:
                    profile = profile_rows(paths, prompts, args.trials, Path(tmp))
                    for name, prof in profile.items():
                        ops = ", ".join(
                            f"{op} {ms:.1f}" for op, ms in list(prof["ops"].items())[:6]
                        )
                        print(f"  {family} b{batch} {name}: {prof['run_ms']:.1f} ms/run, "
                              f"LM head {prof['lm_head_ms']:.1f}; {ops}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
