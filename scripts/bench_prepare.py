"""Benchmark `mlx-transformer prepare`: encoding throughput and peak memory.

1. Throughput, side by side on the same file (the first --throughput-mb of the generated
   corpus): a plain single-process sentencepiece loop (`sp.encode(line)` per line) against our
   prepare path (both passes, shards written, `--workers` processes), with the same tokenizer.
2. Peak memory (RSS) while preparing the whole generated corpus of --size-gb from scratch:
   tokenizer training on a sample, then encoding.

The corpus is Tiny Shakespeare repeated with small changes (line order rotated, some lines
upper-cased, copy numbers inserted) so that it is not one text over and over.

    python scripts/bench_prepare.py --size-gb 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from mlx_transformer.data.dataset import default_corpus_path

# Runs prepare in a child process: getrusage(RUSAGE_SELF) there is prepare's own peak RSS. The
# encoding workers' peaks are sampled from /proc: getrusage(RUSAGE_CHILDREN) would report the
# parent's RSS for them (Linux keeps the high-water mark of the forked image across exec).
CHILD = """
import json, os, resource, sys, threading, time
from mlx_transformer.data.prepare import prepare

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

peak = {"workers_mb": 0.0, "total_mb": 0.0}
def sample():  # worker RSS, polled: their getrusage counts the parent's pages before exec
    me = os.getpid()
    while True:
        workers = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        workers.append(rss_mb(pid))
            except (OSError, StopIteration, ValueError):
                pass
        peak["workers_mb"] = max([peak["workers_mb"], *workers])
        peak["total_mb"] = max(peak["total_mb"], rss_mb(me) + sum(workers))
        time.sleep(0.25)

threading.Thread(target=sample, daemon=True).start()
args = json.loads(sys.argv[1])
start = time.perf_counter()
m = prepare([args["data"]], args["out"], **args["options"])
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"],
    "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_rss_mb": peak["workers_mb"],
    "total_rss_mb": peak["total_mb"],
}))
"""


def generate_corpus(path: Path, size_bytes: int) -> None:
    """Write ~size_bytes of perturbed Tiny Shakespeare copies to `path`."""
    lines = default_corpus_path().read_text(encoding="utf-8").splitlines(keepends=True)
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            shift = (copy * 7919) % len(lines)
            block = lines[shift:] + lines[:shift]
            block = [
                line.upper() if (i + copy) % 11 == 0 else line.replace(":", f" {copy}:")
                for i, line in enumerate(block)
            ]
            text = "".join(block)
            f.write(text)
            written += len(text.encode("utf-8"))
            copy += 1


def head_file(src: Path, dst: Path, size_bytes: int) -> None:
    with open(src, "rb") as f:
        data = f.read(size_bytes)
    dst.write_bytes(data[: data.rfind(b"\n") + 1])


def plain_sentencepiece(path: Path, model: Path) -> tuple[float, int]:
    """The baseline: one process, encode line by line. Returns (seconds, tokens)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, tokens = time.perf_counter(), 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens += len(sp.encode(line))
    return time.perf_counter() - start, tokens


def run_child(data: Path, out: Path, **options) -> dict:
    arg = json.dumps({"data": str(data), "out": str(out), "options": options})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, arg], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="generated corpus size")
    parser.add_argument("--throughput-mb", type=float, default=64, help="file for part 1")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--tmp-dir", default=None, help="where to write the corpus and outputs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        start = time.perf_counter()
        generate_corpus(corpus, int(args.size_gb * 1e9))
        size = corpus.stat().st_size
        print(f"generated {size / 1e6:,.0f} MB in {time.perf_counter() - start:.1f} s")

        # Part 1: throughput with a tokenizer trained on Tiny Shakespeare (both sides use it).
        small = tmp / "small.txt"
        head_file(corpus, small, int(args.throughput_mb * 1e6))
        small_mb = small.stat().st_size / 1e6
        tok = run_child(default_corpus_path(), tmp / "tok_ds", vocab_size=args.vocab_size)
        model = tmp / "tok_ds" / "tokenizer.model"
        base_s, base_tokens = plain_sentencepiece(small, model)
        ours = run_child(small, tmp / "small_ds", tokenizer=str(model), workers=args.workers)
        print(
            f"\nthroughput on {small_mb:.0f} MB (vocab {args.vocab_size}, {tok['tokens']:,} "
            "tokens of Tiny Shakespeare for training):"
        )
        print(
            f"  plain sentencepiece, 1 process, per line: {small_mb / base_s:6.2f} MB/s "
            f"({base_tokens:,} tokens)"
        )
        print(
            f"  prepare, {args.workers} workers (2 passes, shards written): "
            f"{small_mb / ours['seconds']:6.2f} MB/s ({ours['tokens']:,} tokens incl. eos)"
        )
        print(f"  ratio prepare / plain: {base_s / ours['seconds']:.2f}x")

        # Part 2: peak memory preparing the whole corpus from scratch.
        full = run_child(corpus, tmp / "full_ds", vocab_size=args.vocab_size, workers=args.workers)
        print(f"\nprepare of {size / 1e6:,.0f} MB from scratch (tokenizer training + encoding):")
        print(
            f"  {full['seconds']:.0f} s, {size / 1e6 / full['seconds']:.2f} MB/s overall, "
            f"{full['tokens']:,} tokens"
        )
        print(
            f"  peak RSS: main process {full['main_rss_mb']:,.0f} MB, largest worker "
            f"{full['worker_rss_mb']:,.0f} MB, all together {full['total_rss_mb']:,.0f} MB"
        )


if __name__ == "__main__":
    main()
