/* cblas_sgemm with one output row or column sent to cblas_sgemv.

   MLX's CPU backend does every float32 matmul with cblas_sgemm, batch-1 decoding included:
   (1, K) x (K, N). OpenBLAS before 0.3.27 packs the whole weight matrix for such a product, so
   it reads the weights about twice and runs at a quarter of the speed of its own gemv. Preloaded
   before OpenBLAS (LD_PRELOAD="this.so libopenblas.so"), this cblas_sgemm takes the calls with
   M == 1 or N == 1 to OpenBLAS's sgemv and passes every other call through unchanged, as newer
   OpenBLAS builds do themselves (GEMM_GEMV_FORWARD). Row-major only: MLX uses nothing else. */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

/* Lets a process tell that the forwarding is in place (cpu/blas.py's report). */
int mlx_transformer_gemv_forward(void) { return 1; }

/* At load time, before any thread can call in: the BLAS preloaded after this library. */
__attribute__((constructor)) static void resolve(void) {
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
    if (!next_sgemm || !next_sgemv) {
        fprintf(stderr, "mlx-transformer gemv_forward: no BLAS after it in LD_PRELOAD\n");
        abort();
    }
    int ta = trans_a != NO_TRANS, tb = trans_b != NO_TRANS;
    if (order != ROW_MAJOR || K <= 0 || (M != 1 && N != 1)) {
        next_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    /* beta == 0 means C is not read, but gemv scales y by beta: clear it so NaNs in an
       uninitialised output cannot survive as 0 * NaN. */
    if (M == 1) {
        /* C[0, n] = sum_k op(A)[0, k] op(B)[k, n]: y (N) = op(B)^T x, x = the one row of op(A). */
        if (beta == 0.0f) memset(C, 0, sizeof(float) * (size_t)N);
        int incx = ta ? lda : 1;
        if (tb) /* B is N x K */
            next_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, incx, beta, C, 1);
        else /* B is K x N */
            next_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, A, incx, beta, C, 1);
        return;
    }
    /* N == 1: C[m, 0] = sum_k op(A)[m, k] op(B)[k, 0]: y (M, stride ldc) = op(A) x. */
    if (beta == 0.0f)
        for (int m = 0; m < M; m++) C[(size_t)m * ldc] = 0.0f;
    int incx = tb ? 1 : ldb;
    if (ta) /* A is K x M */
        next_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, incx, beta, C, ldc);
    else /* A is M x K */
        next_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, incx, beta, C, ldc);
}
