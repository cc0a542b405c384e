"""`mlx-transformer inspect --trace`: where the model keeps what it needs to say `--answer`.

OUT/trace.png                 P(answer) restoring the residual / MLP / attention state of each
                              (layer, position), and a window of MLP layers, into the corrupted run
OUT/logit_attribution.png     each head's and MLP's direct share of the answer's logit
OUT/head_patching.png         P(answer) patching one head's clean output into the corrupted run
OUT/trace.json                every number above, the tokens and the settings
OUT/summary.txt               what the command printed: which layers and positions carry it

The folder is written whole or not at all (`atomic.write_folder`); an existing one is replaced
only with `--overwrite`, and only if an earlier trace wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import atomic
from ..errors import UserError
from . import tracing
from .tokens import document_ids, token_labels

TRACE = atomic.FolderKind(
    "causal trace",
    entries=("trace.png", "logit_attribution.png", "head_patching.png", "trace.json",
             "summary.txt"),
)  # fmt: skip
TITLES = {
    "resid": "residual stream (block output)",
    "mlp": "MLP output",
    "attn": "attention output",
    "mlp_window": "MLP outputs, window of {window} layers",
}


def answer_token(tokenizer, prompt: str, answer: str) -> tuple[int, list[int]]:
    """The answer's first token as it follows the prompt, and all its tokens."""
    if not answer:
        raise UserError("--answer is empty; give the text the model should say next")
    before = tokenizer.encode(prompt)
    joined = tokenizer.encode(prompt + answer)
    ids = joined[len(before) :] if joined[: len(before)] == before else tokenizer.encode(answer)
    if not ids:
        raise UserError(f"--answer {answer!r} encodes to no tokens; give visible text")
    return ids[0], ids


def subject_span(tokenizer, prompt: str, subject: str, offset: int) -> range:
    """Token positions (in the prompt's ids, which start `offset` tokens in) that spell `subject`
    (its last occurrence, the one nearest the answer)."""
    start = prompt.rfind(subject) if subject else -1
    if start < 0:
        raise UserError(
            f"--subject {subject!r} is not in the prompt; give a part of the prompt exactly"
        )
    end = start + len(subject)
    ids = tokenizer.encode(prompt)
    ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]  # char end per token
    if not ends or ends[-1] != len(prompt):  # decoding changed the text (normalisation)
        before, upto = len(tokenizer.encode(prompt[:start])), len(tokenizer.encode(prompt[:end]))
        return range(offset + before, offset + max(upto, before + 1))
    first = next(k for k, e in enumerate(ends) if e > start)
    last = next(k for k, e in enumerate(ends) if e >= end)
    return range(offset + first, offset + last + 1)


def plot_trace(result: dict, labels: list[str], subject: range | None, window: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["resid", "mlp", "attn", "mlp_window"]
    n_layers, L = result["resid"].shape
    fig, axes = plt.subplots(1, 4, figsize=(4 * max(3.0, 0.22 * L + 1.5), max(3.0, 0.35 * L + 1)))
    cmaps = {"resid": "Purples", "mlp": "Greens", "attn": "Reds", "mlp_window": "Greens"}
    marked = [f"{t}*" if subject and j in subject else t for j, t in enumerate(labels)]
    for ax, kind in zip(axes, kinds):
        low = min(result["corrupt_prob"], result[kind].min())
        high = max(result[kind].max(), low + 1e-9)
        im = ax.imshow(result[kind].T, cmap=cmaps[kind], aspect="auto", interpolation="nearest",
                       vmin=low, vmax=high)  # fmt: skip
        ax.set_title(TITLES[kind].format(window=window), fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(range(n_layers))
        ax.set_yticks(range(L), marked, fontsize=max(4, 8 - L // 16))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"P(answer) restoring one state into the corrupted run (clean {result['clean_prob']:.3f},"
        f" corrupted {result['corrupt_prob']:.3f}; * = corrupted tokens)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attribution(dla: dict, path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = ranked_attribution(dla)[:top]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(ranked) + 1.5))
    names, values = [n for n, _ in ranked][::-1], [v for _, v in ranked][::-1]
    ax.barh(names, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.axvline(0, color="k", lw=0.5)
    ax.set_title(f"direct logit attribution to the answer (logit {dla['logit']:.2f})", fontsize=9)
    ax.set_xlabel("contribution to the answer's logit")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(patched: np.ndarray, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, H = patched.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * H + 2), max(3, 0.4 * n_layers + 1.5)))
    im = ax.imshow(patched, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("head"), ax.set_ylabel("layer")
    ax.set_xticks(range(H)), ax.set_yticks(range(n_layers))
    ax.set_title(
        f"P(answer) patching one clean head (all positions); corrupted "
        f"{result['corrupt_prob']:.3f}, clean {result['clean_prob']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ranked_attribution(dla: dict) -> list[tuple[str, float]]:
    heads, mlp = dla["heads"], dla["mlp"]
    parts = [(f"L{i}H{h}", float(heads[i, h])) for i in range(heads.shape[0])
             for h in range(heads.shape[1])]  # fmt: skip
    parts += [(f"MLP{i}", float(v)) for i, v in enumerate(mlp)]
    parts += [(k, float(dla[k])) for k in ("embed", "pos_embed", "biases")]
    return sorted(parts, key=lambda kv: -abs(kv[1]))


def describe(result: dict, labels: list[str], subject: range | None, window: int) -> list[str]:
    """The text summary: where restoring brings the answer back."""
    lines = []
    clean, corrupt = result["clean_prob"], result["corrupt_prob"]
    gap = clean - corrupt
    if gap <= 0:
        lines.append(
            "  (the corruption does not lower P(answer): nothing to restore; corrupt a part of "
            "the prompt the answer depends on)"
        )
    for kind in ("resid", "mlp", "attn", "mlp_window"):
        grid = result[kind]
        i, j = np.unravel_index(np.argmax(grid), grid.shape)
        share = f" ({(grid[i, j] - corrupt) / gap:.0%} of the gap)" if gap > 0 else ""
        lines.append(
            f"  {TITLES[kind].format(window=window):<36} peak at layer {i}, position {j} "
            f"{labels[j]!r}: P {grid[i, j]:.3f}{share}"
        )
    if subject is not None:
        last = subject.stop - 1
        mlp = result["mlp"][:, last]
        lines.append(
            f"  at the last corrupted token ({labels[last]!r}, position {last}) the MLP effect "
            f"peaks at layer {int(np.argmax(mlp))} (P {mlp.max():.3f}); the attention effect at "
            f"the last position peaks at layer {int(np.argmax(result['attn'][:, -1]))}"
        )
    return lines


def trace_model(
    model,
    tokenizer,
    prompt: str,
    answer: str,
    out: str | Path,
    subject: str | None = None,
    corrupt: str | None = None,
    samples: int = 10,
    noise: float = 3.0,
    window: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    inputs=(),
) -> dict:
    """Trace where `prompt` -> `answer` is carried and write OUT; returns the numbers.

    window: MLP layers restored together (default 3, or the model's depth if smaller).
    """
    out = Path(out)
    check_settings(subject, corrupt, samples, noise, window)
    atomic.check_output(out, TRACE, overwrite=overwrite, inputs=inputs)
    n_layers = len(model.layers)
    window = min(3, n_layers) if window is None else window
    if window > n_layers:
        raise UserError(f"--window {window}: the model has {n_layers} layers")
    ids = document_ids(tokenizer, prompt)
    offset = len(ids) - len(tokenizer.encode(prompt))
    context = model.config.max_position_embeddings
    if len(ids) <= offset:
        raise UserError("the prompt must have at least one token")
    if len(ids) > context:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {context}")
    target, answer_ids = answer_token(tokenizer, prompt, answer)
    notes = []
    if len(answer_ids) > 1:
        notes.append(
            f"note: --answer {answer!r} is {len(answer_ids)} tokens; tracing its first, "
            f"{tokenizer.id_to_piece(target)!r}"
        )
    x = mx.array(ids)
    span = None
    if corrupt is not None:
        other = document_ids(tokenizer, corrupt)
        if len(other) != len(ids):
            raise UserError(
                f"--corrupt is {len(other) - offset} tokens and --prompt {len(ids) - offset}; "
                "a counterfactual prompt must have as many tokens, aligned position by position"
            )
        if other == ids:
            raise UserError("--corrupt is the same text as --prompt; change the subject in it")
        corruption = tracing.Corruption(mx.array(other))
    else:
        span = subject_span(tokenizer, prompt, subject, offset)
        corruption = tracing.Corruption(
            x, tracing.subject_noise(model, len(ids), span, samples, noise, seed)
        )
    labels = token_labels(tokenizer, ids)

    result = tracing.causal_trace(model, x, target, corruption, window)
    heads = tracing.head_patching(model, x, target, corruption)
    pre_norm = model.config.norm_position == "pre"
    dla = tracing.logit_attribution(model, x, target) if pre_norm else None

    piece = tokenizer.id_to_piece(target)
    lines = notes + [
        f"P({piece!r} after the prompt): clean {result['clean_prob']:.3f}, corrupted "
        f"{result['corrupt_prob']:.3f} ("
        + (f"noise x{noise} on {[labels[j] for j in span]}, {samples} samples)"
           if span is not None else "counterfactual prompt)"),
        "restoring one clean state into the corrupted run brings it back most at:",
    ] + describe(result, labels, span, window)  # fmt: skip
    best = np.unravel_index(np.argmax(heads), heads.shape)
    lines.append(
        f"patching one head: largest P {heads.max():.3f} at layer {best[0]} head {best[1]}"
    )
    if dla is not None:
        top = ", ".join(f"{n} {v:+.2f}" for n, v in ranked_attribution(dla)[:6])
        lines.append(f"direct logit attribution (logit {dla['logit']:.2f}): {top}")
    else:
        lines.append("direct logit attribution: skipped (post-norm model; not additive)")
    report = {
        "prompt": prompt, "answer": answer, "answer_token": piece, "answer_id": target,
        "tokens": labels, "subject_positions": list(span) if span is not None else None,
        "corrupt": corrupt, "samples": samples if span is not None else None,
        "noise": noise if span is not None else None, "window": window, "seed": seed,
        "clean_prob": result["clean_prob"], "corrupt_prob": result["corrupt_prob"],
        **{k: result[k].tolist() for k in ("resid", "mlp", "attn", "mlp_window")},
        "head_patching": heads.tolist(),
        "logit_attribution": None if dla is None else {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dla.items()
        },
    }  # fmt: skip
    text = "\n".join(lines) + "\n"

    def fill(folder: Path) -> None:
        plot_trace(result, labels, span, window, folder / "trace.png")
        plot_heads(heads, result, folder / "head_patching.png")
        if dla is not None:
            plot_attribution(dla, folder / "logit_attribution.png")
        (folder / "trace.json").write_text(json.dumps(report, indent=1))
        (folder / "summary.txt").write_text(text)

    atomic.write_folder(out, fill, TRACE, overwrite=overwrite, inputs=inputs)
    print(text + f"wrote {out}/trace.png, head_patching.png, logit_attribution.png, trace.json, "
          "summary.txt", end="\n")  # fmt: skip
    return report


def check_settings(subject, corrupt, samples, noise, window) -> None:
    """The flags alone, before anything is loaded."""
    if (subject is None) == (corrupt is None):
        raise UserError("--trace needs exactly one of --subject (noise on it) or --corrupt TEXT")
    if samples < 1:
        raise UserError(f"--samples must be a positive integer, got {samples}")
    if not (noise > 0 and np.isfinite(noise)):
        raise UserError(f"--noise must be a positive number, got {noise}")
    if window is not None and window < 1:
        raise UserError(f"--window must be a positive integer, got {window}")
