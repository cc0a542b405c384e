"""`mlx-transformer verify CKPT ONNX_DIR`: check an ONNX export against the MLX model.

MLX is the reference, so this lives on the MLX side. Checks, in order:
1. the file: `onnx.checker` (full), strict shape inference, the IO table against io.json;
2. the weights: every initializer named after a checkpoint tensor holds its values;
3. a second implementation: `onnx.reference.ReferenceEvaluator` (portable flavour);
4. every execution provider present: where the nodes ran (full / partial / none — a silent CPU
   fallback is reported, never counted as a GPU pass) and the parity cases below.

Cases (token level; the text case needs tokenizer.model): prefill with empty past on a ragged
left-padded batch (logits and KV cache), prefill + decode == full forward, batch and length
varied in one session, the maximum context, greedy generation, text generation.
Tolerances for fp32 logits: atol 1e-4, rtol 1e-3, greedy tokens exact; lower precisions are
reported against looser budgets (`BUDGETS`). Writes verify.json and verify.md; exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx

from export import providers
from export.contract import LOGITS, MODEL_FILE, feeds, io_table, read_io
from export.runtime import OnnxGenerator
from export.session import OnnxModel, left_pad, positions_from_mask
from export.weights import read_checkpoint

from .checkpoint.mlx_io import load_checkpoint
from .generate.api import generate_step
from .model import make_cache

# precision -> (atol, rtol, greedy must be exact). int8/int4 have no logit budget here: their
# cost is measured at export time (io.json "precision_report") and reported here as n/a.
BUDGETS = {"fp32": (1e-4, 1e-3, True), "fp16": (5e-2, 2e-2, False)}


class Checks:
    """Collects named results: {"check", "provider", "ok", ...details}."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, check: str, ok: bool | None, provider: str = "-", **details) -> None:
        self.rows.append({"check": check, "provider": provider, "ok": ok, **details})

    def run(self, check: str, fn, provider: str = "-") -> None:
        """Run fn() -> details dict (with "ok"); an exception is a failed check."""
        try:
            details = fn()
        except Exception as e:  # report, carry on with the other checks
            details = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        self.add(check, details.pop("ok"), provider, **details)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["ok"] is False]


# -- static checks --------------------------------------------------------------------------------


def check_file(path: Path, io: dict, config) -> dict:
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    inputs, outputs = io_table(config)
    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    expected = ([n for n, _, _ in inputs], [n for n, _, _ in outputs])
    in_io = ([x["name"] for x in io["inputs"]], [x["name"] for x in io["outputs"]])
    return {"ok": names == expected == in_io, "nodes": len(proto.graph.node)}


def check_weights(path: Path, ckpt: Path) -> dict:
    """Initializers named `key` or `key.T` (transposed) equal the checkpoint's tensors."""
    _, weights = read_checkpoint(ckpt)
    proto = onnx.load(str(path))
    compared, worst = 0, 0.0
    for t in proto.graph.initializer:
        key, transposed = (t.name[:-2], True) if t.name.endswith(".T") else (t.name, False)
        if key not in weights.arrays:
            continue  # quantized weights are renamed; shared constants have paths as names
        value = onnx.numpy_helper.to_array(t).astype(np.float32)
        want = weights.arrays[key].T if transposed else weights.arrays[key]
        worst = max(worst, float(np.abs(value - want).max() / (np.abs(want).max() + 1e-12)))
        compared += 1
    return {"ok": compared > 0 and worst <= 1e-3, "tensors": compared, "max_rel_error": worst}


# -- cases ----------------------------------------------------------------------------------------


def left_padded(rng, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows of these lengths, left-padded: (input_ids, attention_mask)."""
    return left_pad([rng.integers(0, vocab, n) for n in lengths])


def mlx_logits(model, ids, mask, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), attention_mask=mx.array(mask), cache=cache))


def compare(got, want, budget, where=None) -> dict:
    """ok: within the budget (None when the precision has no logit budget)."""
    if where is not None:
        got, want = got[where], want[where]
    err = float(np.abs(got - want).max())
    ok = None
    if budget is not None:
        atol, rtol, _ = budget
        ok = bool(np.all(np.abs(got - want) <= atol + rtol * np.abs(want)))
    return {"ok": ok, "max_abs_error": err, "argmax_agreement": float(_agree(got, want))}


def _agree(got, want) -> float:
    return (got.argmax(-1) == want.argmax(-1)).mean()


def case_prefill(model, onnx_model, budget, rng) -> dict:
    """Ragged left-padded batch, empty past: logits and the KV cache at real positions."""
    cfg = model.config
    T = min(17, cfg.max_position_embeddings)
    ids, mask = left_padded(rng, [T, max(1, T // 2), max(1, T - 4)], cfg.vocab_size)
    logits, present = onnx_model(ids, mask)
    cache = make_cache(model)
    real = mask.astype(bool)
    result = compare(logits, mlx_logits(model, ids, mask, cache), budget, real)
    cache_err = 0.0
    for i, c in enumerate(cache):
        for got, want in zip(present[2 * i : 2 * i + 2], c.state):
            got = np.asarray(got if isinstance(got, np.ndarray) else got.numpy())
            want = np.array(want[..., :T, :])
            diff = np.abs(got - want).transpose(0, 2, 1, 3)[real]
            cache_err = max(cache_err, float(diff.max()))
    result["cache_max_abs_error"] = cache_err
    if budget is not None:
        result["ok"] = result["ok"] and cache_err <= budget[0] * 10
    return result


def case_decode(model, onnx_model, budget, rng, steps: int) -> dict:
    """Prefill, a multi-token chunk after past, then single tokens == one full forward."""
    cfg = model.config
    T = min(8 + 4 + steps, cfg.max_position_embeddings)
    ids, mask = left_padded(rng, [T, max(2, T - 7)], cfg.vocab_size)
    bounds = [(0, min(8, T - 1)), (min(8, T - 1), min(12, T))]
    bounds += [(t, t + 1) for t in range(bounds[-1][1], T)]
    pieces, past = [], None
    for start, stop in bounds:
        if stop > start:
            logits, past = onnx_model(ids[:, start:stop], mask[:, :stop], past)
            pieces.append(logits)
    full = mlx_logits(model, ids, mask)
    return compare(np.concatenate(pieces, axis=1), full, budget, mask.astype(bool))


def case_shapes(model, onnx_model, budget, rng) -> dict:
    """Batch size and length varied at run time in one session."""
    worst = {"ok": True if budget else None, "max_abs_error": 0.0, "argmax_agreement": 1.0}
    for lengths in ([1], [5, 2, 9, 3], [min(20, model.config.max_position_embeddings), 1]):
        ids, mask = left_padded(rng, lengths, model.config.vocab_size)
        r = compare(onnx_model(ids, mask)[0], mlx_logits(model, ids, mask), budget, mask == 1)
        worst["ok"] = worst["ok"] and r["ok"] if budget else None
        worst["max_abs_error"] = max(worst["max_abs_error"], r["max_abs_error"])
        worst["argmax_agreement"] = min(worst["argmax_agreement"], r["argmax_agreement"])
    return worst


def case_max_context(model, onnx_model, budget, rng) -> dict:
    T = model.config.max_position_embeddings
    ids = rng.integers(0, model.config.vocab_size, (1, T))
    mask = np.ones((1, T), np.int64)
    return {**compare(onnx_model(ids, mask)[0], mlx_logits(model, ids, mask), budget), "T": T}


def mlx_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of the MLX generator (no stop at EOS)."""
    return list(generate_step(prompt, model, max_tokens=n))


def case_greedy(model, generator, budget, n: int) -> dict:
    cfg = model.config
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, cfg.vocab_size, 6)]
    n = min(n, cfg.max_position_embeddings - len(prompt))
    want = mlx_greedy(model, prompt, n)
    got = generator.generate_tokens([prompt], max_tokens=n, stop_at_eos=False)[0].tokens
    match = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
    exact = budget is not None and budget[2]
    return {"ok": match == n if exact else None, "greedy_match": f"{match}/{n}"}


def case_text(model, generator, budget, n: int) -> dict:
    tokenizer = generator.tokenizer
    prompt = "The "
    ids = tokenizer.encode(prompt)
    n = min(n, model.config.max_position_embeddings - len(ids))
    want = tokenizer.decode(mlx_greedy(model, ids, n))
    got = generator.generate(prompt, max_tokens=n, stop_at_eos=False)[0].text
    exact = budget is not None and budget[2]
    return {"ok": got == want if exact else None, "text_equal": got == want, "chars": len(want)}


# -- driver ---------------------------------------------------------------------------------------


def run_provider(checks: Checks, name: str, ckpt_model, onnx_dir: Path, budget, args) -> None:
    try:
        onnx_model = OnnxModel(onnx_dir, provider=name)
    except Exception as e:
        checks.add("session", False, name, error=str(e).splitlines()[0])
        return
    placement = onnx_model.placement
    strict_error = None
    if name != "CPUExecutionProvider":
        try:
            quiet = providers.session_options()
            quiet.log_severity_level = 4  # the failure is reported in the table, not logged
            providers.create_session(onnx_dir / MODEL_FILE, name, options=quiet, strict=True)
        except Exception as e:
            strict_error = str(e).splitlines()[0][:200]
    fallback = name != "CPUExecutionProvider" and placement.status == "none"
    checks.add(
        "placement",
        None if fallback else True,
        name,
        status=placement.status,
        nodes=placement.nodes,
        ops_left_to_cpu=placement.ops_on_cpu,
        without_cpu_fallback=strict_error or "runs",
        workarounds=onnx_model.workarounds,
    )
    if fallback:  # everything ran on the CPU: not a pass for this provider
        checks.add("parity", None, name, skipped="all nodes fell back to the CPU EP")
        return
    rng = np.random.default_rng(0)
    generator = OnnxGenerator(onnx_dir, provider=name)
    checks.run(
        "prefill, empty past", lambda: case_prefill(ckpt_model, onnx_model, budget, rng), name
    )
    checks.run(
        "prefill + decode == full",
        lambda: case_decode(ckpt_model, onnx_model, budget, rng, args.decode_steps),
        name,
    )
    checks.run(
        "varied batch/length", lambda: case_shapes(ckpt_model, onnx_model, budget, rng), name
    )
    checks.run(
        "maximum context", lambda: case_max_context(ckpt_model, onnx_model, budget, rng), name
    )
    checks.run(
        "greedy tokens", lambda: case_greedy(ckpt_model, generator, budget, args.tokens), name
    )
    if generator.tokenizer is not None:
        checks.run(
            "greedy text", lambda: case_text(ckpt_model, generator, budget, args.tokens), name
        )


def verify(ckpt: str | Path, onnx_dir: str | Path, **options) -> dict:
    """Verify an export against its checkpoint; returns the report (also written to disk).

    Args:
        ckpt: the checkpoint folder that was exported.
        onnx_dir: the export folder.
        options: providers (list of names; default all available), tokens (greedy length, 64),
            decode_steps (8), report (folder for verify.json / verify.md; default onnx_dir).
    """
    defaults = {"providers": None, "tokens": 64, "decode_steps": 8, "report": None}
    args = argparse.Namespace(**{**defaults, **options})
    ckpt, onnx_dir = Path(ckpt), Path(onnx_dir)
    io = read_io(onnx_dir)
    path = onnx_dir / io.get("model", MODEL_FILE)
    budget = BUDGETS.get(io["precision"])
    model = load_checkpoint(ckpt, dtype="float32")
    checks = Checks()
    start = time.time()
    checks.run(
        "onnx.checker + strict shape inference + IO", lambda: check_file(path, io, model.config)
    )
    checks.run("weights equal the checkpoint", lambda: check_weights(path, ckpt))
    if io["flavour"] == "portable" and io["precision"] == "fp32":
        checks.run("onnx.reference evaluator", lambda: case_reference(model, path))
    names = args.providers or providers.available()
    for name in names:
        run_provider(checks, providers.full_name(name), model, onnx_dir, budget, args)
    report = {
        "checkpoint": str(ckpt),
        "onnx": str(onnx_dir),
        "flavour": io["flavour"],
        "precision": io["precision"],
        "budget": dict(zip(("atol", "rtol", "greedy_exact"), budget)) if budget else None,
        "precision_report": io.get("precision_report"),
        "providers": [providers.full_name(n) for n in names],
        "seconds": round(time.time() - start, 2),
        "ok": not checks.failed,
        "checks": checks.rows,
    }
    out = Path(args.report or onnx_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verify.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "verify.md").write_text(markdown(report))
    return report


def case_reference(model, path: Path) -> dict:
    """The portable graph run by onnx.reference (pure numpy) against MLX."""
    from onnx.reference import ReferenceEvaluator

    cfg = model.config
    ids, mask = left_padded(np.random.default_rng(9), [7, 4], cfg.vocab_size)
    empty = np.zeros((2, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    past = [empty] * (2 * cfg.num_hidden_layers)
    inputs = feeds(ids, mask, positions_from_mask(mask, 7), past)
    logits = ReferenceEvaluator(str(path)).run([LOGITS], inputs)[0]
    return compare(logits, mlx_logits(model, ids, mask), BUDGETS["fp32"], mask == 1)


def markdown(report: dict) -> str:
    lines = [
        f"# verify: {report['onnx']} ({report['flavour']}, {report['precision']})",
        "",
        f"Result: **{'PASS' if report['ok'] else 'FAIL'}** in {report['seconds']} s; "
        f"logit budget: {report['budget'] or 'none (see the precision report of io.json)'}.",
        "",
        "| check | provider | ok | details |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["checks"]:
        details = {k: v for k, v in row.items() if k not in ("check", "provider", "ok")}
        text = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
        mark = {True: "yes", False: "**NO**", None: "n/a"}[row["ok"]]
        lines.append(f"| {row['check']} | {row['provider']} | {mark} | {text} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT")
    parser.add_argument("onnx", metavar="ONNX_DIR")
    parser.add_argument("--provider", action="append", dest="providers", help="default: all")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens to compare")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--report", help="folder for verify.json/verify.md (default ONNX_DIR)")


def run(args: argparse.Namespace) -> int:
    report = verify(
        args.checkpoint,
        args.onnx,
        providers=args.providers,
        tokens=args.tokens,
        decode_steps=args.decode_steps,
        report=args.report,
    )
    print(markdown(report))
    return 0 if report["ok"] else 1
