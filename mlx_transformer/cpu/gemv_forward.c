/* cblas_sgemm with one output row or column sent to cblas_sgemv, and a few rows against a
   transposed weight computed by streaming the weight once.

   MLX's CPU backend does every float32 matmul with cblas_sgemm, batch-1 decoding included:
   (1, K) x (K, N). OpenBLAS before 0.3.27 packs the whole weight matrix for such a product, so
   it reads the weights about twice and runs at a quarter of the speed of its own gemv. Preloaded
   before OpenBLAS (LD_PRELOAD="this.so libopenblas.so"), this cblas_sgemm takes the calls with
   M == 1 or N == 1 to OpenBLAS's sgemv and passes every other call through unchanged, as newer
   OpenBLAS builds do themselves (GEMM_GEMV_FORWARD). Row-major only: MLX uses nothing else.

   Batched decoding multiplies 2-16 rows by each weight (x W^T, W stored N x K), which OpenBLAS
   0.3.21 also packs first: at 8 rows it moved under 2 GB/s of weights. `few_rows` reads each
   weight row once and takes its dot products with all rows of x while they sit in L1 (AVX2 and
   FMA when the CPU has them, x86-64 only, and only while OpenBLAS runs one thread; otherwise
   such calls go to OpenBLAS as before). */

#define _GNU_SOURCE
#include <dlfcn.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, MAX_ROWS = 16 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

/* Lets a process tell that the forwarding is in place (cpu/blas.py's report). */
int mlx_transformer_gemv_forward(void) { return 1; }

#if defined(__x86_64__)
static int have_avx2;
static int (*blas_threads)(void); /* OpenBLAS's openblas_get_num_threads, if it is OpenBLAS */
#endif

/* At load time, before any thread can call in: the BLAS preloaded after this library. */
__attribute__((constructor)) static void resolve(void) {
    next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
#if defined(__x86_64__)
    blas_threads = (int (*)(void))dlsym(RTLD_NEXT, "openblas_get_num_threads");
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline void store(float *c, float dot, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * dot : alpha * dot + beta * *c; /* beta 0: C is not read */
}

/* C (M x N) = alpha A B^T + beta C for M <= MAX_ROWS, A (M x K) and B (N x K) row-major:
   for each weight row, 4 rows of A at a time in registers (the weight row stays in L1). */
__attribute__((target("avx2,fma"))) static void few_rows(int M, int N, int K, float alpha,
                                                         const float *A, int lda,
                                                         const float *B, int ldb, float beta,
                                                         float *C, int ldc) {
    int K8 = K & ~7;
    for (int n = 0; n < N; n++) {
        const float *w = B + (size_t)n * ldb;
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            const float *a0 = A + (size_t)m * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int k = 0; k < K8; k += 8) {
                __m256 wk = _mm256_loadu_ps(w + k);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + k), wk, s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + k), wk, s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + k), wk, s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + k), wk, s3);
            }
            float d0 = hsum(s0), d1 = hsum(s1), d2 = hsum(s2), d3 = hsum(s3);
            for (int k = K8; k < K; k++) {
                d0 += a0[k] * w[k], d1 += a1[k] * w[k], d2 += a2[k] * w[k], d3 += a3[k] * w[k];
            }
            float *c = C + (size_t)m * ldc + n;
            store(c, d0, alpha, beta), store(c + ldc, d1, alpha, beta);
            store(c + 2 * (size_t)ldc, d2, alpha, beta), store(c + 3 * (size_t)ldc, d3, alpha, beta);
        }
        for (; m < M; m++) {
            const float *a = A + (size_t)m * lda;
            __m256 s = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8)
                s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(w + k), s);
            float d = hsum(s);
            for (int k = K8; k < K; k++) d += a[k] * w[k];
            store(C + (size_t)m * ldc + n, d, alpha, beta);
        }
    }
}
#endif

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
    if (!next_sgemm || !next_sgemv) {
        fprintf(stderr, "mlx-transformer gemv_forward: no BLAS after it in LD_PRELOAD\n");
        abort();
    }
    int ta = trans_a != NO_TRANS, tb = trans_b != NO_TRANS;
#if defined(__x86_64__)
    /* one thread: with more, OpenBLAS's own sgemm splits the work and can be the faster */
    int one_thread = !blas_threads || blas_threads() == 1;
    if (order == ROW_MAJOR && have_avx2 && one_thread && M > 1 && M <= MAX_ROWS && !ta && tb &&
        K >= 8) {
        few_rows(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#endif
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
