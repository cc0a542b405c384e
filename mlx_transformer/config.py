"""The model configuration: one dataclass that *is* the checkpoint's `config.json` schema.

This module imports no MLX, so `export/` (numpy + onnx only) shares the same schema and checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import atomic
from .errors import UserError

MODEL_TYPE = "mlx-transformer"
FORMAT_VERSION = 1

POSITION_ENCODINGS = ("sinusoidal", "learned", "rope", "none")
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
# Rotary frequency scalings (Hugging Face's rope_type) and the fields each one needs.
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

# Upper bounds on the sizes, far above any published model. A config of a few bytes must not
# describe a model whose mere tensor table (or KV cache, or position table) exhausts memory:
# past these a value is a typo or a hostile file. A checkpoint's weights file bounds the rest.
MAX_SIZES = {
    "vocab_size": 2**24,
    "hidden_size": 2**17,
    "num_hidden_layers": 2**14,
    "num_attention_heads": 2**14,
    "num_key_value_heads": 2**14,
    "head_dim": 2**14,
    "intermediate_size": 2**20,
    "max_position_embeddings": 2**27,
}
# A config.json is a few hundred bytes; anything past this is not one.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and what to do."""


@dataclass
class ModelConfig:
    """Architecture of a decoder-only Transformer.

    The defaults are a small GPT-2-style model (learned positions, pre-norm LayerNorm, GELU-tanh,
    tied embeddings). The original paper's decoder is `position_encoding="sinusoidal"`,
    `norm_position="post"`, `hidden_act="relu"`, `scale_embeddings=True`; a Llama-style model is
    `position_encoding="rope"`, `norm_type="rmsnorm"`, `hidden_act="swiglu"`, no biases.
    """

    vocab_size: int = 8000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # Fewer key/value heads than query heads: grouped-query (1 = multi-query). None = multi-head.
    num_key_value_heads: int | None = None
    # None = hidden_size // num_attention_heads.
    head_dim: int | None = None
    # None = 4 * hidden_size, or for SwiGLU 8/3 * hidden_size rounded up to a multiple of 64.
    intermediate_size: int | None = None
    max_position_embeddings: int = 256
    # Local attention: a query at position i sees keys at positions i - W < j <= i (W keys, itself
    # included) plus the first `attention_sinks` tokens (StreamingLLM). None = full attention.
    sliding_window: int | None = None
    # Per layer "full_attention" or "sliding_attention"; None = every layer slides when
    # sliding_window is set (Mistral), else every layer is full.
    layer_types: list[str] | None = None
    attention_sinks: int = 0
    position_encoding: str = "learned"
    rope_theta: float = 10000.0
    # True: rotate interleaved pairs (x0,x1),(x2,x3)...; False: rotate the two halves (Llama/HF).
    rope_traditional: bool = False
    # Rotary frequency scaling, as Hugging Face writes it: None (plain), {"rope_type": "linear",
    # "factor": f} (positions / f), or {"rope_type": "llama3", ...ROPE_SCALINGS["llama3"]}.
    rope_scaling: dict[str, Any] | None = None
    norm_type: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    hidden_act: str = "gelu_tanh"
    attention_bias: bool = True
    # Bias on the attention output projection; None = attention_bias (Qwen2: q/k/v only).
    attention_out_bias: bool | None = None
    # Per-head RMSNorm of queries and keys before rotary (Qwen3).
    qk_norm: bool = False
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    # Multiply token embeddings by sqrt(hidden_size), as the paper does.
    scale_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    initializer_range: float = 0.02
    # Free-form provenance (e.g. the Hugging Face model it was imported from); not used by the math.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        # Derive only from valid values, so that validate() names the bad field instead.
        sizes_ok = all(
            _is_pos_int(getattr(self, name)) and getattr(self, name) <= MAX_SIZES[name]
            for name in ("hidden_size", "num_attention_heads")
        )
        if self.head_dim is None and sizes_ok:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}), or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and sizes_ok:
            if self.hidden_act == "swiglu":
                self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
            else:
                self.intermediate_size = 4 * self.hidden_size
        self.validate()

    # -- checks ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for name, most in MAX_SIZES.items():
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > most:
                raise ConfigError(f"{name} must be at most {most:,}, got {value:,}")
        choices = {
            "position_encoding": POSITION_ENCODINGS,
            "norm_type": NORM_TYPES,
            "norm_position": NORM_POSITIONS,
            "hidden_act": ACTIVATIONS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary encoding, got {self.head_dim}")
        self._validate_rope_scaling()
        if self.position_encoding == "sinusoidal" and self.hidden_size % 2:
            raise ConfigError(
                f"hidden_size must be even for sinusoidal encoding, got {self.hidden_size}"
            )
        # Every float field: JSON lets a file say NaN and Infinity, and neither is a setting.
        for name in ("rope_theta", "norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not value > 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("embedding_dropout", "attention_dropout", "residual_dropout"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0 <= value < 1:
                raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
        for name in (
            "rope_traditional",
            "attention_bias",
            "attention_out_bias",
            "qk_norm",
            "mlp_bias",
            "tie_word_embeddings",
            "scale_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a JSON object, got {self.extra!r}")
        self._validate_window()

    def _validate_window(self) -> None:
        W = self.sliding_window
        if W is not None and not (_is_pos_int(W) and W <= MAX_SIZES["max_position_embeddings"]):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {W!r}")
        types = self.layer_types
        if types is not None:
            if not isinstance(types, list) or len(types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types must be a list of {self.num_hidden_layers} entries (one per "
                    f"layer) or null, got {types!r}"
                )
            bad = [t for t in types if t not in LAYER_TYPES]
            if bad:
                raise ConfigError(
                    f"layer_types entries must be one of {', '.join(LAYER_TYPES)}; got {bad[0]!r}"
                )
            if W is None and "sliding_attention" in types:
                raise ConfigError("layer_types has sliding_attention layers: set sliding_window")
        sinks = self.attention_sinks
        if not (isinstance(sinks, int) and not isinstance(sinks, bool) and sinks >= 0):
            raise ConfigError(f"attention_sinks must be a non-negative integer, got {sinks!r}")
        if sinks and W is None:
            raise ConfigError("attention_sinks needs sliding_window (sinks are kept beside it)")

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if self.position_encoding != "rope":
            raise ConfigError("rope_scaling applies to position_encoding rope only; set it to null")
        kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
        if kind not in ROPE_SCALINGS:
            raise ConfigError(
                f"rope_scaling.rope_type must be one of {', '.join(ROPE_SCALINGS)}; got {kind!r}"
            )
        fields = ROPE_SCALINGS[kind]
        for name in fields:
            value = scaling.get(name)
            if not _is_finite_number(value) or not value > 0:
                raise ConfigError(
                    f"rope_scaling.{name} must be a positive finite number, got {value!r}"
                )
        unknown = sorted(set(scaling) - {"rope_type", *fields})
        if unknown:
            raise ConfigError(f"rope_scaling.{unknown[0]} is not a field of {kind} scaling")
        if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ConfigError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    # -- derived --------------------------------------------------------------------------------

    @property
    def final_norm(self) -> bool:
        """Pre-norm stacks end with a norm; post-norm blocks already end normalized (the paper)."""
        return self.norm_position == "pre"

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i, or None where it attends to everything before."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[i] == "full_attention":
            return None
        return self.sliding_window

    @property
    def windowed(self) -> bool:
        """True when at least one layer attends through a sliding window."""
        return any(self.layer_window(i) is not None for i in range(self.num_hidden_layers))

    @property
    def all_windowed(self) -> bool:
        """True when every layer slides: the KV cache can then be bounded (a rolling cache)."""
        return all(self.layer_window(i) is not None for i in range(self.num_hidden_layers))

    def rope_frequencies(self) -> list[float]:
        """The rotary angle per position of each feature pair, scaling included (head_dim / 2).

        model.py (as `mx.fast.rope`'s freqs, their inverses) and the ONNX builder both take them
        from here, so the two rotate by the same angles by construction. Plain: theta^(-2i/hd).
        "linear" divides every frequency by factor. "llama3" divides those whose wavelength
        2π/f exceeds original_max_position_embeddings / low_freq_factor, keeps those below
        original_max_position_embeddings / high_freq_factor, and blends linearly in between.
        """
        hd, scaling = self.head_dim, self.rope_scaling or {"rope_type": None}
        freqs = [self.rope_theta ** (-i / hd) for i in range(0, hd, 2)]
        if scaling["rope_type"] == "linear":
            return [f / scaling["factor"] for f in freqs]
        if scaling["rope_type"] != "llama3":
            return freqs
        factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = scaling["original_max_position_embeddings"]
        scaled = []
        for f in freqs:
            smooth = (context * f / (2 * math.pi) - low) / (high - low)  # 1: short, 0: long
            smooth = min(max(smooth, 0.0), 1.0)
            scaled.append((1 - smooth) * f / factor + smooth * f)
        return scaled

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint, by name, with its shape: the file format in one place."""
        return dict(self.iter_parameter_shapes())

    def iter_parameter_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in file order, one at a time: a reader that stops at
        the first tensor a file lacks does work bounded by the file, not by the config."""
        head, layer, tail = self._shapes()
        yield from head.items()
        for i in range(self.num_hidden_layers):
            for name, shape in layer.items():
                yield f"layers.{i}.{name}", shape
        yield from tail.items()

    def num_tensors(self) -> int:
        head, layer, tail = self._shapes()
        return len(head) + self.num_hidden_layers * len(layer) + len(tail)

    def num_parameters(self) -> int:
        head, layer, tail = self._shapes()
        size = [sum(math.prod(s) for s in shapes.values()) for shapes in (head, layer, tail)]
        return size[0] + self.num_hidden_layers * size[1] + size[2]

    def _shapes(self) -> tuple[dict, dict, dict]:
        """The tensors before the layers, those of one layer (names after `layers.{i}.`), and
        those after: every layer has the same, so sizes are known without listing them all."""
        D, V, F = self.hidden_size, self.vocab_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        head: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D)}
        layer: dict[str, tuple[int, ...]] = {}
        tail: dict[str, tuple[int, ...]] = {}
        if self.position_encoding == "learned":
            head["embed_positions.weight"] = (self.max_position_embeddings, D)

        def norm(shapes: dict, prefix: str) -> None:
            shapes[f"{prefix}.weight"] = (D,)
            if self.norm_type == "layernorm":
                shapes[f"{prefix}.bias"] = (D,)

        def linear(shapes: dict, prefix: str, out_dim: int, in_dim: int, bias: bool) -> None:
            shapes[f"{prefix}.weight"] = (out_dim, in_dim)
            if bias:
                shapes[f"{prefix}.bias"] = (out_dim,)

        norm(layer, "attn_norm")
        linear(layer, "attn.q_proj", q, D, self.attention_bias)
        linear(layer, "attn.k_proj", kv, D, self.attention_bias)
        linear(layer, "attn.v_proj", kv, D, self.attention_bias)
        linear(layer, "attn.o_proj", D, q, self.attention_out_bias)
        if self.qk_norm:
            layer["attn.q_norm.weight"] = (self.head_dim,)
            layer["attn.k_norm.weight"] = (self.head_dim,)
        norm(layer, "mlp_norm")
        if self.hidden_act == "swiglu":
            linear(layer, "mlp.gate_proj", F, D, self.mlp_bias)
        linear(layer, "mlp.up_proj", F, D, self.mlp_bias)
        linear(layer, "mlp.down_proj", D, F, self.mlp_bias)
        if self.final_norm:
            norm(tail, "norm")
        if not self.tie_word_embeddings:
            tail["lm_head.weight"] = (V, D)
        return head, layer, tail

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys (model_type, format_version, ...) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:  # e.g. a value of a type that breaks __post_init__ arithmetic
            raise ConfigError(str(e)) from None

    def save(self, path: str | Path) -> None:
        """Write config.json atomically."""
        d = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **self.to_dict()}
        atomic.write_text(path, json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read and validate a config.json; errors name the file and the field."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)  # bounded: the path may be /dev/zero
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a folder, not a JSON file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES:,} bytes; not a config.json")
        try:
            d = json.loads(data.decode("utf-8"))
        except ValueError as e:  # also bad UTF-8, and integers too long to convert
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
        if isinstance(d, dict):
            model_type = d.get("model_type", MODEL_TYPE)
            if model_type != MODEL_TYPE:
                raise ConfigError(
                    f"{path}: model_type is {model_type!r}, not {MODEL_TYPE!r}; "
                    "import Hugging Face checkpoints with `mlx-transformer convert`"
                )
            version = d.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ConfigError(
                    f"{path}: format_version {version} is not supported (this is "
                    f"{FORMAT_VERSION}); upgrade mlx-transformer"
                )
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # an int of any size is finite
