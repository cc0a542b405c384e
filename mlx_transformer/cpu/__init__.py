"""What only MLX's Linux CPU backend needs: an optimized BLAS preloaded before MLX loads
(`blas`, `blas_probe`; no MLX, they run first) and polynomial kernels (`fastmath`).

Nothing here changes results beyond float32 rounding; on Metal and CUDA none of it is used.
May import: errors. Imported by: cli, ops seam, train.
"""
