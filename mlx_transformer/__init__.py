"""mlx-transformer: a decoder Transformer language model on MLX, exportable to ONNX.

Importing the package imports no MLX (so `export/` can share `config` and `tokenizer`);
import `mlx_transformer.model` and friends directly.
"""

__version__ = "0.1.0"
