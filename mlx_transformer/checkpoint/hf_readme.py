"""The README.md of a Hugging Face folder written by `convert --to-hf`: what the model is and
how transformers and mlx-lm load it."""

from __future__ import annotations

from ..config import ModelConfig


def hf_readme(
    config: ModelConfig,
    hf: dict,
    mlx_lm_limits: list[str],
    has_tokenizer: bool,
    own_tokenizer: bool = False,
) -> str:
    """The output folder's README.md: what it is and which runtimes load it."""
    family = hf["model_type"]
    lines = [
        f"# {family} model written by mlx-transformer",
        "",
        f"`{hf['architectures'][0]}`: {config.num_hidden_layers} layers, hidden size "
        f"{config.hidden_size}, {config.num_attention_heads} heads, vocabulary "
        f"{config.vocab_size}, context {config.max_position_embeddings} tokens "
        f"({config.num_parameters() / 1e6:.2f} M parameters, {hf['torch_dtype']}).",
        "",
        "## Load it",
        "",
        "transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
    ]
    if has_tokenizer:
        lines.append('tokenizer = AutoTokenizer.from_pretrained("PATH")')
    lines += ["```", ""]
    if mlx_lm_limits:
        lines += [
            "mlx-lm: **does not load this model correctly** ("
            + "; ".join(mlx_lm_limits)
            + "). Use transformers, or mlx-transformer itself (`convert --from-hf`).",
            "",
        ]
    else:
        lines += ["mlx-lm:", "", "```python"]
        if has_tokenizer:
            lines += ["from mlx_lm import load", 'model, tokenizer = load("PATH")']
        else:
            lines += [
                "from pathlib import Path",
                "from mlx_lm.utils import load_model",
                'model, config = load_model(Path("PATH"))',
            ]
        lines += ["```", ""]
    if own_tokenizer:
        lines += ["The tokenizer files are the model's own, as `convert --from-hf` imported them."]
    elif has_tokenizer:
        lines += [
            "The tokenizer files give the same ids as the sentencepiece model in tokenizer.model,",
            "which mlx-transformer uses: no bos/eos is added, spaces and newlines are kept as",
            "they are. A literal `<s>`, `</s>`, `<unk>` or `<pad>` in text is text to it;",
            "transformers agrees (`split_special_tokens`), the `tokenizers` library does with",
            "`tokenizer.encode_special_tokens = True`, transformers.js reads it as the token.",
        ]
    else:
        lines += ["No tokenizer was given, so this folder has no tokenizer files."]
    return "\n".join(lines) + "\n"
