"""Generation speed of this project against mlx-lm on the same Llama-style weights, in one run.

For each model size, random weights in our Transformer are written in the Hugging Face Llama
layout (`mlx_transformer.checkpoint.hf.save_hf`) and loaded by mlx-lm
(`mlx_lm.utils.load_model`); the logits of both are compared first. Then, interleaving the two
peers trial by trial:

  batch 1   our `generate_step` vs mlx-lm's `generate_step` (greedy): prompt tok/s = prompt
            tokens / time to the first token; generation tok/s = (new tokens - 1) / time from the
            first token to the last. Same clock and loop for both.
  batch 8   our `batch_generate_step` vs mlx-lm's `BatchGenerator` (greedy, EOS off), the same
            clock and loop for both: prompt tok/s = 8 * prompt tokens / time to the first
            step's tokens, generation tok/s = 8 * (new tokens - 1) / the time after them, and
            end-to-end tokens/s = 8 * new tokens / wall time.

Medians over trials; ratio = ours / mlx-lm. Both run in this one process, so under the same BLAS
(`ensure_fast_blas()` re-executes with OpenBLAS preloaded where available; see "blas" in the JSON).

    python scripts/bench_generate.py [--sizes small,large] [--trials 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from bench_common import NOISY, spread

from mlx_transformer.cpu import blas

SIZES = {
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=768
    ),
    "large": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048
    ),
}
LLAMA = dict(
    vocab_size=8000,
    num_key_value_heads=4,  # GQA
    max_position_embeddings=512,
    position_encoding="rope",
    norm_type="rmsnorm",
    hidden_act="swiglu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)


class NullDetokenizer:
    def add_token(self, token: int) -> None:
        pass

    def finalize(self) -> None:
        pass

    last_segment = ""


class TokenShim:
    """Just enough tokenizer for both batch_generate functions, with EOS switched off."""

    bos_id, eos_id = 1, -1
    eos_token_ids: list[int] = []

    def detokenizer(self):
        return NullDetokenizer()

    def decode(self, ids) -> str:
        return ""


def build_peers(size: str, tmp: str):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from mlx_transformer.checkpoint.hf import save_hf
    from mlx_transformer.config import ModelConfig
    from mlx_transformer.model import Transformer

    mx.random.seed(0)
    ours = Transformer(ModelConfig(**LLAMA, **SIZES[size]))
    ours.eval()
    mx.eval(ours.parameters())
    save_hf(ours, f"{tmp}/{size}")
    theirs, _ = load_model(__import__("pathlib").Path(f"{tmp}/{size}"))
    probe = mx.random.randint(0, 8000, (1, 32))
    diff = mx.abs(ours(probe) - theirs(probe)).max().item()
    if diff > 1e-3:
        raise SystemExit(f"{size}: logits differ by {diff}; the conversion is wrong")
    return ours, theirs, diff


def time_stream(tokens) -> tuple[float, float, list]:
    """(seconds to the first token, seconds from the first to the last, the tokens)."""
    t0 = time.perf_counter()
    out, t_first = [], None
    for token in tokens:
        if t_first is None:
            t_first = time.perf_counter()
        out.append(token)
    return t_first - t0, time.perf_counter() - t_first, out


def batch1(ours, theirs, prompt, new_tokens):
    """Rates of both peers for one prompt, and the share of greedy tokens they agree on."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step as lm_step

    from mlx_transformer.generate.api import generate_step

    a = time_stream(generate_step(prompt, ours, max_tokens=new_tokens))
    b = time_stream(t for t, _ in lm_step(mx.array(prompt), theirs, max_tokens=new_tokens))
    rates = {}
    for name, (ttft, rest, _) in (("ours", a), ("mlx_lm", b)):
        rates[name] = {"prompt_tps": len(prompt) / ttft, "generation_tps": (new_tokens - 1) / rest}
    same = sum(int(x) == int(y) for x, y in zip(a[2], b[2])) / new_tokens
    return rates, same


def lm_batch_steps(model, prompts, new_tokens):
    """mlx-lm's batch generator as an iterator of steps (lists of B tokens), like ours."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[], max_tokens=new_tokens)
    uids = gen.insert(prompts, [new_tokens] * len(prompts))
    row = {uid: b for b, uid in enumerate(uids)}
    try:
        while responses := gen.next_generated():
            step = [0] * len(prompts)
            for r in responses:
                step[row[r.uid]] = r.token
            yield step
    finally:
        gen.close()


def batch8(ours, theirs, prompts, new_tokens):
    """Both peers' batch generators (token ids in, token ids out, greedy, no EOS) on one clock:
    prompt tok/s = prompt tokens / time to the first step's tokens, generation tok/s = tokens
    after them / the time after them, end to end = all new tokens / wall time. (mlx-lm's own
    `prompt_tps` times its prefill alone, without the first decode step.)"""
    from mlx_transformer.generate.api import batch_generate_step

    rates = {}
    runs = (
        ("ours", lambda: batch_generate_step(prompts, ours, max_tokens=new_tokens)),
        ("mlx_lm", lambda: lm_batch_steps(theirs, prompts, new_tokens)),
    )
    for name, steps in runs:
        t0 = time.perf_counter()
        ttft, rest, out = time_stream(steps())
        wall = time.perf_counter() - t0
        B, n = len(prompts), len(out)
        rates[name] = {
            "prompt_tps": B * len(prompts[0]) / ttft,
            "generation_tps": B * (n - 1) / rest,
            "end_to_end_tps": B * n / wall,
        }
    return rates


def medians(trials: list[dict], keys: tuple[str, ...] | None = None) -> dict:
    out = {}
    for peer in ("ours", "mlx_lm"):
        names = keys or tuple(trials[0][peer])
        out[peer] = {k: statistics.median(t[peer][k] for t in trials) for k in names}
    out["ratio"] = {k: out["ours"][k] / out["mlx_lm"][k] for k in out["ours"]}
    out["spread"] = {  # the wider of the two peers' (max - min) / median
        k: max(spread([t[p][k] for t in trials]) for p in ("ours", "mlx_lm")) for k in out["ours"]
    }
    return out


def bench_size(size, args, tmp) -> dict:
    import mlx.core as mx

    ours, theirs, diff = build_peers(size, tmp)
    rng = __import__("numpy").random.default_rng(1)
    prompts = rng.integers(4, 8000, (8, args.prompt_tokens)).tolist()
    # Warm-up: kernels, allocator, traces. MLX's CPU compiler builds the compiled decode step's
    # kernels per batch size the first time on a machine (~15 s at batch 8, then cached in
    # $TMPDIR/mlx); a batch-8 trial that pays it reports a fraction of the steady rate.
    batch1(ours, theirs, prompts[0], 2)
    batch8(ours, theirs, prompts, 2)
    # Prefill of the small model takes ~50 ms, so prompt tok/s comes from many short runs (2 new
    # tokens: both peers queue one decode step before the first token is read, as in long runs);
    # generation tok/s from fewer long ones.
    short = [batch1(ours, theirs, prompts[0], 2)[0] for _ in range(args.prompt_trials)]
    long, agree = [], []
    for _ in range(args.trials):
        rates, same = batch1(ours, theirs, prompts[0], args.new_tokens)
        long.append(rates)
        agree.append(same)
    prompt, gen = medians(short, ("prompt_tps",)), medians(long, ("generation_tps",))
    one = {k: {**prompt[k], **gen[k]} for k in prompt}  # ours, mlx_lm, ratio, spread
    eight = [batch8(ours, theirs, prompts, args.new_tokens) for _ in range(args.batch_trials)]
    mx.clear_cache()
    return {
        "config": {**LLAMA, **SIZES[size]},
        "max_logit_diff": diff,
        "greedy_token_agreement": statistics.median(agree),
        "batch1": one,
        "batch8": medians(eight),
    }


def table(results: dict) -> str:
    lines = [f"{'':14}{'ours':>10}{'mlx-lm':>10}{'ratio':>8}"]
    for size, r in results["sizes"].items():
        for batch in ("batch1", "batch8"):
            for k, v in r[batch]["ours"].items():
                name = f"{size} {batch[5:]}x {k.replace('_tps', '')}"
                theirs, ratio = r[batch]["mlx_lm"][k], r[batch]["ratio"][k]
                noisy = r[batch]["spread"][k]
                flag = f"  trials vary {noisy:.0%}" if noisy > NOISY else ""
                lines.append(f"{name:32}{v:10.1f}{theirs:10.1f}{ratio:8.2f}{flag}")
    lines[0] = f"{'tokens/s':32}{'ours':>10}{'mlx-lm':>10}{'ratio':>8}"
    return "\n".join(lines)


def main(argv=None) -> int:
    blas.ensure_fast_blas()  # may re-execute this script with OpenBLAS preloaded
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--trials", type=int, default=3, help="batch-1 long runs per size")
    parser.add_argument("--prompt-trials", type=int, default=15, help="short runs per size")
    parser.add_argument("--batch-trials", type=int, default=3, help="batch-8 trials per size")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx_lm

    results = {
        "blas": blas.blas_info(),
        "blas_summary": blas.blas_summary(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "trials": {
            "prompt": args.prompt_trials,
            "batch1": args.trials,
            "batch8": args.batch_trials,
        },
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            results["sizes"][size] = bench_size(size, args, tmp)
            print(f"{size}: done", file=sys.stderr, flush=True)
    print(results["blas_summary"], file=sys.stderr)
    print(table(results), file=sys.stderr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
