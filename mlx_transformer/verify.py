"""`mlx-transformer verify CKPT ONNX_DIR`: check an ONNX export against the MLX model.

MLX is the reference, so this lives on the MLX side. Checks, in order:
1. the file: `onnx.checker` (full), strict shape inference, the IO table against io.json;
2. the weights: every checkpoint tensor is in the graph, within its precision's tolerance
   (quantized matrices dequantized: `export.dequantize`);
3. a second implementation: `onnx.reference.ReferenceEvaluator` (portable flavour);
4. every execution provider present: where the nodes ran (full / partial / none — a silent CPU
   fallback is reported, never counted as a GPU pass) and the parity cases below.

Cases (token level; the text case needs tokenizer.model): prefill with empty past on a ragged
left-padded batch (logits and KV cache), prefill + decode == full forward, batch and length
varied in one session, the maximum context, greedy generation, text generation.
Every precision has a budget against the checkpoint (`BUDGETS`): fp32 element-wise and greedy
tokens exact; fp16, int8 and int4 a logit error and a next-token agreement, set between what a
faithful export and the export of a different checkpoint measure. Writes verify.json and
verify.md (budgets beside the measured values); exit 1 on failure. What needs no MLX (the
budgets, checks 1 and 2, the comparison, the report) is `export.verify_checks`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnxruntime as ort

from export import providers
from export.contract import LOGITS, MODEL_FILE, feeds, read_io, select_precision
from export.runtime import OnnxGenerator
from export.session import OnnxModel, left_pad, positions_from_mask
from export.verify_checks import (
    BUDGETS,
    Budget,
    Checks,
    check_file,
    check_weights,
    compare,
    markdown,
)

from . import atomic
from .checkpoint.mlx_io import load_checkpoint
from .errors import UserError
from .generate.api import generate_step
from .model import make_cache

# -- cases ----------------------------------------------------------------------------------------


def left_padded(rng, lengths: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows of these lengths, left-padded: (input_ids, attention_mask)."""
    return left_pad([rng.integers(0, vocab, n) for n in lengths])


def mlx_logits(model, ids, mask, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), attention_mask=mx.array(mask), cache=cache))


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
    if budget.atol is not None:  # element-wise budgets hold the cache too; the others: decode
        result["ok"] = result["ok"] and cache_err <= budget.atol * 10
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
    """Batch size and length varied at run time in one session (compared over all of them)."""
    got, want = [], []
    for lengths in ([1], [5, 2, 9, 3], [min(20, model.config.max_position_embeddings), 1]):
        ids, mask = left_padded(rng, lengths, model.config.vocab_size)
        got.append(onnx_model(ids, mask)[0][mask == 1])
        want.append(mlx_logits(model, ids, mask)[mask == 1])
    return compare(np.concatenate(got), np.concatenate(want), budget)


def case_max_context(model, onnx_model, budget, rng) -> dict:
    T = model.config.max_position_embeddings
    ids = rng.integers(0, model.config.vocab_size, (1, T))
    mask = np.ones((1, T), np.int64)
    return {**compare(onnx_model(ids, mask)[0], mlx_logits(model, ids, mask), budget), "T": T}


def mlx_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens of the MLX generator (no stop at EOS)."""
    return list(generate_step(prompt, model, max_tokens=n))


def case_greedy(model, generator, budget, n: int) -> dict:
    """MLX's greedy tokens: generated identically (exact budgets), or else the logits along
    them within the budget (teacher-forced: one near-tie cannot derail the rest)."""
    cfg = model.config
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, cfg.vocab_size, 6)]
    n = min(n, cfg.max_position_embeddings - len(prompt))
    want = mlx_greedy(model, prompt, n)
    got = generator.generate_tokens([prompt], max_tokens=n, stop_at_eos=False)[0].tokens
    match = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)
    path = np.array([prompt + want[:-1]])
    mask, along = np.ones_like(path), slice(len(prompt) - 1, None)
    result = compare(
        generator.model(path, mask)[0][0, along], mlx_logits(model, path, mask)[0, along], budget
    )
    if budget.greedy_exact:
        result["ok"] = result["ok"] and match == n
    return {**result, "greedy_match": f"{match}/{n}"}


def case_text(model, generator, budget, n: int) -> dict:
    tokenizer = generator.tokenizer
    prompt = "The "
    ids = tokenizer.encode(prompt)
    n = min(n, model.config.max_position_embeddings - len(ids))
    want = tokenizer.decode(mlx_greedy(model, ids, n))
    got = generator.generate(prompt, max_tokens=n, stop_at_eos=False)[0].text
    exact = budget.greedy_exact  # otherwise the token case holds the budget
    return {"ok": got == want if exact else None, "text_equal": got == want, "chars": len(want)}


# -- driver ---------------------------------------------------------------------------------------


def run_provider(checks: Checks, name: str, ckpt_model, onnx_dir: Path, budget, args) -> None:
    try:
        onnx_model = OnnxModel(onnx_dir, provider=name, precision=args.precision)
    except Exception as e:
        checks.add("session", False, name, error=str(e).splitlines()[0])
        return
    placement = onnx_model.placement
    strict_error = None
    if name != "CPUExecutionProvider":
        try:
            quiet = providers.session_options()
            quiet.log_severity_level = 4  # the failure is reported in the table, not logged
            graph = onnx_dir / onnx_model.io.get("model", MODEL_FILE)
            providers.create_session(graph, name, options=quiet, strict=True)
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
    generator = OnnxGenerator(onnx_dir, provider=name, precision=args.precision)
    m, om = ckpt_model, onnx_model
    cases = {
        "prefill, empty past": lambda: case_prefill(m, om, budget, rng),
        "prefill + decode == full": lambda: case_decode(m, om, budget, rng, args.decode_steps),
        "varied batch/length": lambda: case_shapes(m, om, budget, rng),
        "maximum context": lambda: case_max_context(m, om, budget, rng),
        "greedy tokens": lambda: case_greedy(m, generator, budget, args.tokens),
    }
    if generator.tokenizer is not None:
        cases["greedy text"] = lambda: case_text(m, generator, budget, args.tokens)
    for check, case in cases.items():
        checks.run(check, case, name)


def verify(ckpt: str | Path, onnx_dir: str | Path, **options) -> dict:
    """Verify an export against its checkpoint; returns the report (also written to disk).

    Args:
        ckpt: the checkpoint folder that was exported.
        onnx_dir: the export folder.
        options: providers (list of names; default all available), tokens (greedy length, 64),
            decode_steps (8), report (folder for verify.json / verify.md; default onnx_dir),
            precision (which of the folder's precisions; default its first; the report of
            another is verify-PRECISION.json / .md).
    """
    args = checked_options(options)
    ckpt, onnx_dir = Path(ckpt), Path(onnx_dir)
    folder_io = read_io(onnx_dir)
    io = select_precision(folder_io, args.precision, onnx_dir)
    path = onnx_dir / io.get("model", MODEL_FILE)
    precision = io.get("precision")
    if precision not in BUDGETS:
        raise UserError(
            f"{onnx_dir}: io.json gives precision {precision!r}, not one of "
            f"{', '.join(BUDGETS)}; re-export the model"
        )
    budget = BUDGETS[precision]
    model = load_checkpoint(ckpt, dtype="float32")
    checks = Checks()
    start = time.time()
    checks.run(
        "onnx.checker + strict shape inference + IO", lambda: check_file(path, io, model.config)
    )
    checks.run("weights equal the checkpoint", lambda: check_weights(path, ckpt))
    if io.get("flavour") == "portable" and precision == "fp32":
        checks.run("onnx.reference evaluator", lambda: case_reference(model, path))
    names = args.providers or providers.available()
    for name in names:
        run_provider(checks, providers.full_name(name), model, onnx_dir, budget, args)
    report = {
        "checkpoint": str(ckpt),
        "onnx": str(onnx_dir),
        "flavour": io.get("flavour"),
        "precision": precision,
        "budget": {k: v for k, v in asdict(budget).items() if v is not None},
        "precision_report": io.get("precision_report"),
        "providers": [providers.full_name(n) for n in names],
        "seconds": round(time.time() - start, 2),
        "ok": not checks.failed,
        "checks": checks.rows,
    }
    out = Path(args.report or onnx_dir)
    name = "verify" if precision == folder_io.get("precision") else f"verify-{precision}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / f"{name}.json", json.dumps(report, indent=2, default=str) + "\n")
        atomic.write_text(out / f"{name}.md", markdown(report))
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return report


DEFAULTS = {"providers": None, "tokens": 64, "decode_steps": 8, "report": None, "precision": None}


def checked_options(options: dict) -> argparse.Namespace:
    """verify's options with their defaults; a value that cannot work is a UserError."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"verify() got unknown options: {', '.join(unknown)}")
    args = argparse.Namespace(**{**DEFAULTS, **options})
    for name in ("tokens", "decode_steps"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    for name in args.providers or []:
        built_in = ort.get_available_providers()  # plugins are registered only when asked for
        full = providers.full_name(name)
        if full not in built_in and full not in providers.available():
            names = ", ".join(providers.available())
            raise UserError(f"--provider {name} is not available here (available: {names})")
    if args.report is not None and Path(args.report).exists() and not Path(args.report).is_dir():
        raise UserError(f"--report {args.report} is a file; give a folder for the report")
    return args


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT")
    parser.add_argument("onnx", metavar="ONNX_DIR")
    parser.add_argument("--provider", action="append", dest="providers", help="default: all")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens to compare")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--report", help="folder for verify.json/verify.md (default ONNX_DIR)")
    parser.add_argument(
        "--precision", help="which of the folder's precisions to verify (default: its first)"
    )


def run(args: argparse.Namespace) -> int:
    report = verify(
        args.checkpoint,
        args.onnx,
        providers=args.providers,
        tokens=args.tokens,
        decode_steps=args.decode_steps,
        report=args.report,
        precision=args.precision,
    )
    print(markdown(report))
    return 0 if report["ok"] else 1


# verify's API, with the MLX-free parts it takes from export.verify_checks.
__all__ = [
    "verify",
    "checked_options",
    "add_arguments",
    "run",
    "BUDGETS",
    "Budget",
    "Checks",
    "check_file",
    "check_weights",
    "compare",
    "markdown",
]
