"""The files that let standard runtimes load an export folder unchanged: a Hugging Face
`config.json` (optimum, transformers.js) and onnxruntime-genai's `genai_config.json`.

Both describe the graph's interface, not a set of weights: the folder holds no PyTorch weights,
and these clients take every computation from the ONNX graph. What they read is the IO names
(`contract.io_table`: the Hugging Face layout), the KV-cache dims (layers, key/value heads, head
size), the context length and the special token ids.

Hugging Face family (`hf_family`): the one that is exactly the model (`family_of`: gpt2, llama,
qwen2, qwen3); otherwise "llama", whose config states every KV dim explicitly (num_key_value_heads,
head_dim). For a model of one of these families that config is also a faithful description of
the model; for the others (the paper's post-norm, sinusoidal, ReLU decoder among them) no Hugging
Face family describes the model, so the Llama config describes only the graph's interface: a
client that runs the graph is exact, one that rebuilds the model from config.json alone (with
other weights) is not.

onnxruntime-genai: "type": "llama" for every model. Its llama path feeds input_ids,
attention_mask, position_ids and past/present by the names given here, which is all our graph
takes; its "gpt2" type expects another input set (measured: "Model input was not found").
The ort flavour's cache is one buffer shared between past and present
(`past_present_share_buffer`: GroupQueryAttention appends in place; same tokens as without); the
portable graph concatenates, so it is not shared there. Search defaults to greedy up to the
context length. A sliding window lives in the graph's mask, so genai runs it
exactly with its growing cache; genai's own `decoder.sliding_window` is not written: it selects a
windowed static cache for NPU graphs (uint8 caches), which refuses ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlx_transformer.checkpoint.hf_config import family_of, token_ids
from mlx_transformer.checkpoint.hf_config import hf_config as family_config
from mlx_transformer.checkpoint.hf_window import window_to_hf
from mlx_transformer.config import ModelConfig
from mlx_transformer.errors import UserError

from .contract import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, POSITION_IDS, PRESENT

HF_CONFIG_FILE = "config.json"  # the Hugging Face one; ours is contract.MODEL_CONFIG_FILE
GENAI_CONFIG_FILE = "genai_config.json"
README_FILE = "README.md"
# transformers.js's `dtype` option for each precision's file name (contract.MODEL_FILES).
TRANSFORMERS_JS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}


def hf_family(config: ModelConfig) -> tuple[str, bool]:
    """(model_type of config.json, whether that family describes the model itself and not only
    the graph's interface)."""
    family = family_of(config)
    return (family, True) if family else ("llama", False)


def hf_config(config: ModelConfig, special_tokens: dict | None) -> dict:
    """The Hugging Face config.json that describes the exported graph (see the module doc)."""
    family, exact = hf_family(config)
    hf = {**family_config(config, family, special_tokens), "use_cache": True}
    if exact and config.windowed:
        try:  # the family with the window stated: Mistral, Ministral, or Qwen's own fields
            hf = window_to_hf(hf, config)
        except UserError:  # attention sinks: no Hugging Face field says them
            exact = False
    if not exact:
        hf["mlx_transformer_note"] = (
            "no Hugging Face family describes this model; this config describes the ONNX "
            "graph's interface only (KV-cache dims, context, token ids)"
        )
    return hf


def genai_config(
    config: ModelConfig,
    model_file: str,
    special_tokens: dict | None,
    share_buffer: bool = False,
    eos_ids: Sequence[int] = (),
) -> dict:
    """onnxruntime-genai's genai_config.json for the graph in `model_file` (relative path);
    `share_buffer`: the graph appends to its past in place (the ort flavour, no window);
    `eos_ids`: every id generation stops at, where the tokenizer has several (a list)."""
    c = config
    ids = token_ids(config, special_tokens)
    if len(eos_ids) > 1:
        ids["eos_token_id"] = [int(i) for i in eos_ids]
    return {
        "model": {
            "type": "llama",
            "context_length": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            **ids,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": f"{PAST}.%d.key",
                    "past_value_names": f"{PAST}.%d.value",
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": f"{PRESENT}.%d.key",
                    "present_value_names": f"{PRESENT}.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": c.max_position_embeddings,
            "min_length": 0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
            "early_stopping": True,
            "past_present_share_buffer": share_buffer,
        },
    }


def readme(config: ModelConfig, io: dict) -> str:
    """The folder's README.md: what each file is for and one way to load it per runtime."""
    family, exact = hf_family(config)
    model, precision = io["model"], io["precision"]
    dtype = TRANSFORMERS_JS_DTYPES[precision]
    held = io.get("precisions") or {precision: {"model": model}}
    rows = [
        (
            entry["model"],
            f"{p}: every runtime (transformers.js's dtype {TRANSFORMERS_JS_DTYPES[p]!r})"
            + (", the default" if p == precision else ""),
        )
        for p, entry in held.items()
    ]
    rows += [
        ("io.json, mlx_transformer_config.json, tokenizer.model", "onnx-generate, verify"),
        ("config.json", "optimum, transformers.js"),
        ("genai_config.json", "onnxruntime-genai"),
        (
            "tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
            "generation_config.json",
            "transformers, transformers.js, onnxruntime-genai",
        ),
    ]
    table = "\n".join(f"| {files} | {who} |" for files, who in rows)
    tokenizer = io.get("deploy", {}).get("tokenizer.json", "-")
    describes = (
        f"`config.json` is a Hugging Face **{family}** config and describes this model."
        if exact
        else f"No Hugging Face family describes this model ({describe(config)}): "
        f"`config.json` is a **{family}** config that describes the ONNX graph's interface "
        "only (its inputs and outputs, KV-cache dims, context, token ids). Runtimes that run "
        "the graph (onnxruntime-genai, optimum, transformers.js) are exact with it; do not "
        "build a PyTorch model from it."
    )
    return f"""# ONNX export ({io["flavour"]} flavour, {", ".join(held)})

Written by `mlx-transformer export`. {describes}

| file | read by |
| --- | --- |
{table}

Inputs: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{{i}}.key/value`
(optional: `num_logits_to_keep`, default 0 = logits at every position, n = the last n);
outputs: `logits`, `present.{{i}}.key/value` (float32, Hugging Face layout).
Tokenizer files: {tokenizer}.

```sh
mlx-transformer onnx-generate THIS_FOLDER --prompt "Hello" --max-tokens 50
```

```python
import onnxruntime_genai as og  # pip install onnxruntime-genai

model = og.Model("THIS_FOLDER")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)  # greedy by default
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Hello"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

```python
# optimum + optimum-onnx 0.1.0 (it needs transformers < 4.58)
from optimum.onnxruntime import ORTModelForCausalLM

model = ORTModelForCausalLM.from_pretrained("THIS_FOLDER", subfolder="onnx",
                                            file_name="{Path(model).name}")
```

```js
import {{ pipeline }} from "@huggingface/transformers";
const generate = await pipeline("text-generation", "THIS_FOLDER", {{ dtype: "{dtype}" }});
```
"""


def describe(c: ModelConfig) -> str:
    return f"{c.norm_position}-norm {c.norm_type}, {c.position_encoding} positions, {c.hidden_act}"
