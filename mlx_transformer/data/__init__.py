"""Text to tokens: find and read sources, train the tokenizer, encode into shards (`prepare`), and
read a prepared dataset back (`dataset`) as batches (`batches`). numpy and sentencepiece, no MLX.

`corpus/` holds the embedded Tiny Shakespeare, the default text.
May import: errors, atomic, tokenizer (and tokenizer_files, hf_tokenizers, chat).
"""
