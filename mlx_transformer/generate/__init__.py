"""Generation: the decode loop over a KV cache (`decode`), samplers and logits processors
(`sample`), the token and text layers and the `generate` command (`api`), and the rules MLX and
ONNX generation share (`rules`: no MLX, export/ imports it).

May import: errors, model, checkpoint, tokenizer (and tokenizer_files, hf_tokenizers, chat).
"""
