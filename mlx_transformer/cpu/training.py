"""How training uses MLX's CPU backend: streams, BLAS threads and the buffer cache.

MLX runs a stream's ops on one thread, so training splits each micro-batch across one stream
per core (`default_streams`); the streams share the cores for their GEMMs (`blas.gemm_bound`);
and MLX's CPU buffer cache is raised to hold a step's working set (`buffer_cache`).
`training_environment` is what the training loop enters. On Metal and CUDA nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlx.core as mx

from .blas import gemm_bound


def default_streams(cores: int, device: mx.Device | None = None) -> int:
    """Streams to split a micro-batch across: a core each (up to 4) on the CPU backend, where
    each stream's ops run on one thread; 1 on a GPU, whose queue is already saturated."""
    device = device or mx.default_device()
    return max(1, min(4, cores)) if device == mx.cpu else 1


@contextlib.contextmanager
def buffer_cache(limit: int = 1 << 30) -> Iterator[None]:
    """On the CPU backend, let MLX keep up to `limit` bytes of freed buffers for reuse.

    Its CPU default, 32 MB, is below a small model's training working set (79 MB cached at 4
    layers, width 128, batch 12), and every miss is a malloc of fresh pages: 5% of the step.
    Metal's default (the memory limit) is left alone.
    """
    if mx.default_device() != mx.cpu:
        yield
        return
    previous = mx.set_cache_limit(limit)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


@contextlib.contextmanager
def training_environment(streams: int) -> Iterator[None]:
    """Training's GEMMs gain from every core (decoding's do not), shared by the step's streams;
    and a buffer cache that holds the step's working set."""
    with gemm_bound(callers=streams), buffer_cache():
        yield
