"""`mlx-transformer inspect`: attention maps, logit lens, ablations and head scores, as files.

OUT/attention.png  attention.npz    every layer x head, token labels on the axes
OUT/logit_lens.png logit_lens.json  P(actual next token) by layer x position; top-k per layer
OUT/ablation.png   ablation.json    loss increase when each head / MLP is knocked out
OUT/heads.json                      previous-token, first-token and induction scores per head

`--trace` instead traces one answer (causal tracing, direct logit attribution, head patching):
see `trace_report`.

Texts start with EOS, the token every document starts after in training (`prepare` joins documents
with EOS and never writes BOS), so position 0 is one the model has seen in that place.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError
from . import analysis as interpret
from .tokens import document_ids, token_labels

MAX_LABELLED_TOKENS = 64  # beyond this, tick labels are unreadable


def plot_attention(weights: np.ndarray, labels: list[str], path: Path) -> None:
    """weights: (layers, heads, L, L) for one sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_heads, L, _ = weights.shape
    cell = min(3.2, max(1.6, L * 0.09))
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell * n_heads + 1, cell * n_layers + 1), squeeze=False
    )
    show_labels = L <= MAX_LABELLED_TOKENS
    for i in range(n_layers):
        for h in range(n_heads):
            ax = axes[i, h]
            ax.imshow(weights[i, h], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"layer {i} head {h}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if show_labels and h == 0:
                ax.set_yticks(range(L), labels, fontsize=max(3, 8 - L // 12))
            if show_labels and i == n_layers - 1:
                ax.set_xticks(range(L), labels, fontsize=max(3, 8 - L // 12), rotation=90)
    fig.suptitle("attention weights (row: query, column: key)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(
    data: np.ndarray,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    xticks: list[str] | None = None,
    cmap: str = "magma",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(
        figsize=(max(5, 0.22 * data.shape[1] + 2), max(3, 0.4 * data.shape[0] + 1.5))
    )
    im = ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    if xticks is not None and len(xticks) <= MAX_LABELLED_TOKENS:
        ax.set_xticks(range(len(xticks)), xticks, fontsize=6, rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_component(spec: str, n_layers: int, n_heads: int) -> tuple:
    """ "L.H" → ("head", L, H); "mlp.L" → ("mlp", L)."""
    try:
        if spec.startswith("mlp."):
            component = ("mlp", int(spec[4:]))
        else:
            layer, head = spec.split(".")
            component = ("head", int(layer), int(head))
    except ValueError:
        raise UserError(f"--ablate {spec!r}: use LAYER.HEAD (e.g. 1.3) or mlp.LAYER") from None
    if not 0 <= component[1] < n_layers or (
        component[0] == "head" and not 0 <= component[2] < n_heads
    ):
        raise UserError(f"--ablate {spec!r}: the model has {n_layers} layers of {n_heads} heads")
    return component


def check_top_k(top_k: int) -> None:
    if not (isinstance(top_k, int) and top_k >= 1):
        raise UserError(f"--top-k must be a positive integer, got {top_k}")


def check_out(out: Path) -> None:
    """`--out` is a folder, new or not; never a file (it would be in the way, and is kept)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; pick another path")


def inspect_model(
    model,
    tokenizer,
    prompt: str,
    out: str | Path,
    text: str | None = None,
    ablate: str | None = None,
    mode: str = "zero",
    top_k: int = 5,
) -> dict:
    """Write the pictures and numbers for `prompt` into `out`; returns the summary it printed.

    Every input is checked before anything is written.
    """
    out = Path(out)
    check_top_k(top_k)
    check_out(out)
    ids = document_ids(tokenizer, prompt)
    context = model.config.max_position_embeddings
    if len(ids) < 2:
        raise UserError("the prompt must have at least one token")
    if len(ids) > context:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {context}")
    n_layers, n_heads = len(model.layers), model.config.num_attention_heads
    component = parse_component(ablate, n_layers, n_heads) if ablate else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    x = mx.array([ids])
    labels = token_labels(tokenizer, ids)

    weights = interpret.attention_maps(model, x)[:, 0]
    np.savez_compressed(
        out / "attention.npz", weights=weights, ids=np.array(ids), labels=np.array(labels)
    )
    plot_attention(weights, labels, out / "attention.png")

    lens = interpret.lens_summary(interpret.logit_lens(model, x)[:, 0], np.array(ids), top_k)
    plot_heatmap(
        lens["correct_prob"],
        out / "logit_lens.png",
        "logit lens: P(actual next token) after each layer",
        "position (next token)",
        "layer (0 = embeddings)",
        labels[1:],
        cmap="viridis",
    )
    n_stages = lens["top_ids"].shape[0]
    lens_json = {
        "tokens": labels,
        "correct_prob": lens["correct_prob"].tolist(),
        "top": [
            [
                [
                    {"token": tokenizer.id_to_piece(int(t)), "prob": float(p)}
                    for t, p in zip(lens["top_ids"][s, j], lens["top_probs"][s, j])
                ]
                for j in range(len(ids))
            ]
            for s in range(n_stages)
        ],
    }
    (out / "logit_lens.json").write_text(json.dumps(lens_json))
    print(f"logit lens at the last position (after {labels[-1]!r}):")
    for s in range(n_stages):
        tops = ", ".join(
            f"{tokenizer.id_to_piece(int(t))!r} {p:.2f}"
            for t, p in zip(lens["top_ids"][s, -1], lens["top_probs"][s, -1])
        )
        print(f"  {'embed' if s == 0 else f'layer {s - 1}':>9}: {tops}")

    eval_ids = mx.array([document_ids(tokenizer, text)[:context]]) if text else x
    if component is not None:
        means = interpret.component_means(model, eval_ids[:, :-1]) if mode == "mean" else None
        base = interpret.sequence_loss(model, eval_ids)
        with interpret.ablated(model, component, means):
            loss = interpret.sequence_loss(model, eval_ids)
        print(
            f"ablating {ablate} ({mode}): loss {base:.4f} -> {loss:.4f} ({loss - base:+.4f} nats)"
        )
        summary = {"component": ablate, "mode": mode, "base_loss": base, "loss": loss}
    else:
        scores = interpret.ablation_scores(model, eval_ids, mode)
        table = np.concatenate([scores["heads"], scores["mlp"][:, None]], axis=1)
        plot_heatmap(
            table,
            out / "ablation.png",
            f"loss increase when knocked out ({mode}); last column: MLP",
            "head",
            "layer",
            [str(h) for h in range(n_heads)] + ["MLP"],
            cmap="coolwarm",
        )
        ranked = sorted(
            [(f"{i}.{h}", scores["heads"][i, h]) for i in range(n_layers) for h in range(n_heads)]
            + [(f"mlp.{i}", scores["mlp"][i]) for i in range(n_layers)],
            key=lambda kv: -kv[1],
        )
        print(f"ablation ({mode}), base loss {scores['base_loss']:.4f} nats; largest increases:")
        for name, delta in ranked[:8]:
            print(f"  {name:>7}: {delta:+.4f}")
        summary = {
            "mode": mode,
            "base_loss": scores["base_loss"],
            "heads": scores["heads"].tolist(),
            "mlp": scores["mlp"].tolist(),
            "ranked": ranked,
        }
    (out / "ablation.json").write_text(json.dumps(summary, indent=1))

    heads = interpret.head_scores(model, x)
    (out / "heads.json").write_text(json.dumps({k: v.tolist() for k, v in heads.items()}))
    for kind, score in heads.items():
        best = ", ".join(f"{i}.{h} ({s:.2f})" for i, h, s in interpret.top_heads(score))
        print(f"{kind.replace('_', '-')} heads: {best}")
    print(f"wrote {out}/attention.png, logit_lens.png, ablation.*, heads.json")
    return {"ablation": summary, "heads": {k: v.tolist() for k, v in heads.items()}}


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (with tokenizer.model)")
    parser.add_argument(
        "--prompt", required=True, help="the text to look at (<= ~64 tokens reads best)"
    )
    parser.add_argument("--out", required=True, help="folder for the pictures and numbers")
    parser.add_argument(
        "--text", help="file whose loss the ablations measure (default: the prompt)"
    )
    parser.add_argument("--ablate", help="one component only: LAYER.HEAD or mlp.LAYER")
    parser.add_argument("--ablation-mode", choices=["zero", "mean"], default="zero")
    parser.add_argument("--top-k", type=int, default=5)
    trace = parser.add_argument_group(
        "causal tracing (--trace): where the model carries what it needs to say --answer"
    )
    trace.add_argument("--trace", action="store_true", help="trace --answer, not the maps above")
    trace.add_argument("--answer", help="the text the model says after the prompt")
    trace.add_argument("--subject", help="part of the prompt to corrupt with noise")
    trace.add_argument("--corrupt", help="or: a counterfactual prompt of as many tokens")
    trace.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    trace.add_argument("--noise", type=float, default=3.0, help="x the embedding std (default 3)")
    trace.add_argument("--window", type=int, help="MLP layers restored together (default 3)")
    trace.add_argument("--seed", type=int, default=0, help="of the noise")
    trace.add_argument(
        "--overwrite", action="store_true", help="replace a folder an earlier --trace wrote"
    )


def run(args) -> int:
    from ..checkpoint.mlx_io import load_checkpoint
    from ..tokenizer_files import load_tokenizer

    trace_only = {"--answer": args.answer, "--subject": args.subject, "--corrupt": args.corrupt,
                  "--window": args.window, "--overwrite": args.overwrite or None}  # fmt: skip
    if args.trace:
        return run_trace(args)
    stray = [flag for flag, value in trace_only.items() if value is not None]
    if stray:
        raise UserError(f"{stray[0]} is for causal tracing; add --trace")
    check_top_k(args.top_k)  # the settings first, before anything is loaded
    check_out(Path(args.out))
    text = None
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--text {args.text}: cannot read it ({e})") from None
    model = load_checkpoint(args.model)
    tokenizer = load_tokenizer(args.model)
    tokenizer.check_fits(model.config.vocab_size)
    inspect_model(
        model, tokenizer, args.prompt, args.out, text, args.ablate, args.ablation_mode, args.top_k
    )
    return 0


def run_trace(args) -> int:
    from .. import atomic
    from ..checkpoint.mlx_io import load_checkpoint
    from ..tokenizer_files import load_tokenizer
    from .trace_report import TRACE, check_settings, trace_model

    if args.answer is None:
        raise UserError("--trace needs --answer: the text the model should say after the prompt")
    if args.text or args.ablate:
        raise UserError("--text and --ablate are for the default inspect; drop them with --trace")
    check_settings(args.subject, args.corrupt, args.samples, args.noise, args.window)
    atomic.check_output(args.out, TRACE, overwrite=args.overwrite, inputs=[args.model])
    model = load_checkpoint(args.model)
    tokenizer = load_tokenizer(args.model)
    tokenizer.check_fits(model.config.vocab_size)
    trace_model(
        model, tokenizer, args.prompt, args.answer, args.out, args.subject, args.corrupt,
        args.samples, args.noise, args.window, args.seed, args.overwrite, inputs=[args.model],
    )  # fmt: skip
    return 0
