"""The checkpoint folder: the one interface between training and export.

Owns the folder's format (`format`: file names, config and safetensors checks; no MLX, export/
reads checkpoints through it), saving and loading it with MLX (`mlx_io`), the Hugging Face
import and export (`hf`, the `convert` command) and `info`.
May import: config, errors, tokenizer (and tokenizer_files, hf_tokenizers, chat), model.
"""
