"""Looking inside a model: attention maps, logit lens, ablations and head scores as numbers
(`analysis`); an activation cache and patching under TransformerLens's hook names (`hooks`);
causal tracing, direct logit attribution and per-head patching (`tracing`); and the `inspect`
command's pictures, JSON and summaries (`report`, `trace_report` for `--trace`).

May import: errors, atomic, model, checkpoint, tokenizer (and tokenizer_files).
"""
