/* Float32 products of a few rows by a weight matrix stored [in, out], for CPU decode steps.
 *
 * A decode step multiplies one row (or a few) by each weight matrix, so its speed is how fast the weights stream
 * from memory. BLAS libraries walk several rows of W at once; on the 2-core VMs we measured, hardware prefetch
 * kept up with one sequential stream far better (one row by tiny's blocks: 4.3 ms here vs 5.8 ms through
 * OpenBLAS). So this kernel reads W exactly once, row k after row k, and adds x[r, k] * W[k, :] into each output
 * row, which stays in the L1/L2 cache.
 */
#include <stddef.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* y[0:n] += a * w[0:n] */
static void axpy(float a, const float *restrict w, float *restrict y, long n) {
    long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 scale = _mm256_set1_ps(a);
    for (; i + 32 <= n; i += 32) {  /* four independent vectors per pass keep the loads in flight */
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(scale, _mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(y + i + 8)));
        _mm256_storeu_ps(y + i + 16, _mm256_fmadd_ps(scale, _mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(y + i + 16)));
        _mm256_storeu_ps(y + i + 24, _mm256_fmadd_ps(scale, _mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(y + i + 24)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++)
        y[i] += a * w[i];
}

/* y[rows, n_out] = x[rows, n_in] @ w[n_in, n_out] (+ bias[n_out] when bias is not NULL); all contiguous. */
void nectar_matmul_f32(const float *restrict x, const float *restrict w, const float *restrict bias,
                       float *restrict y, long rows, long n_in, long n_out) {
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < n_out; j++)
            y[r * n_out + j] = bias ? bias[j] : 0.0f;
    for (long k = 0; k < n_in; k++) {
        const float *row = w + k * n_out;
        for (long r = 0; r < rows; r++)
            axpy(x[r * n_in + k], row, y + r * n_out, n_out);
    }
}
