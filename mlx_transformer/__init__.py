"""mlx-transformer: a decoder Transformer language model on MLX, exportable to ONNX.

Importing the package imports no MLX; import `mlx_transformer.model` and friends directly.
"""

__version__ = "0.1.0"

# The modules that import no MLX, directly or through what they import: `export/` (which deploys
# without MLX) may import only these, `cpu.blas` must run before MLX loads, and the data stage
# and the commands that never run MLX stay light. tests/test_layout.py imports each of them with
# `import mlx` blocked and checks that they, and export/, import nothing outside this list.
FRAMEWORK_FREE = (
    "mlx_transformer",
    "mlx_transformer.errors",
    "mlx_transformer.config",
    "mlx_transformer.atomic",
    "mlx_transformer.tokenizer",
    "mlx_transformer.hf_tokenizers",
    "mlx_transformer.tokenizer_files",
    "mlx_transformer.chat",
    "mlx_transformer.cli",
    "mlx_transformer.checkpoint",
    "mlx_transformer.checkpoint.format",
    "mlx_transformer.checkpoint.hf_config",
    "mlx_transformer.checkpoint.hf_window",
    "mlx_transformer.checkpoint.hf_tokenizer",
    "mlx_transformer.generate",
    "mlx_transformer.generate.rules",
    "mlx_transformer.data",
    "mlx_transformer.data.dataset",
    "mlx_transformer.data.batches",
    "mlx_transformer.data.sources",
    "mlx_transformer.data.encode",
    "mlx_transformer.data.prepare",
    "mlx_transformer.data.tokenizer_training",
    "mlx_transformer.cpu",
    "mlx_transformer.cpu.blas",
    "mlx_transformer.cpu.blas_probe",
    "mlx_transformer.cpu.gemv",
)
