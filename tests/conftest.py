"""Shared fixtures. Tests build tiny models and tokenizers from text in the repo; no network."""

import os
import sys
from pathlib import Path

# tests/reference.py (the float64 numpy model) is imported by several test files.
sys.path.insert(0, str(Path(__file__).parent))

# Nothing is downloaded at test time: transformers must never reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
