"""Looking inside a model: attention maps, logit lens, ablations and head scores as numbers
(`analysis`), and the `inspect` command's pictures, JSON and summary (`report`).

May import: errors, model, checkpoint, tokenizer.
"""
