/* Float32 CPU kernels for decode steps: products of a few rows by weights stored [in, out], and one Llama
 * decoder layer for a single new token.
 *
 * A decode step multiplies one row (or a few) by each weight matrix, so its speed is how fast the weights stream
 * from memory. BLAS libraries walk several rows of W at once; on the 2-core VMs we measured, hardware prefetch
 * kept up with one sequential stream far better (one row by tiny's blocks: 4.3 ms here vs 5.8 ms through
 * OpenBLAS). So this kernel reads W exactly once, row k after row k, and adds x[r, k] * W[k, :] into each output
 * row, which stays in the L1/L2 cache.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* y[0:n] += a * w[0:n] */
static void axpy(float a, const float *restrict w, float *restrict y, long n) {
    long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 scale = _mm256_set1_ps(a);
    for (; i + 32 <= n; i += 32) {  /* four independent vectors per pass keep the loads in flight */
        /* weights 4 KB ahead, fetched "non-temporal": they pass by without evicting the interpreter's code and data
         * from the caches, so the Python work after a step runs warmer (measured: step 2.37 vs 2.70 ms through 4
         * tiny blocks, and the work after it 344 vs 386 us) */
        _mm_prefetch((const char *)(w + i + 1024), _MM_HINT_NTA);
        _mm_prefetch((const char *)(w + i + 1040), _MM_HINT_NTA);
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

/* y[rows, n_out] (+)= x[rows, n_in] @ w[n_in, n_out] (+ bias[n_out] when bias is not NULL); all contiguous.
 * With accumulate, the product and bias are added to y (a residual) instead of replacing it. */
static void matmul(const float *restrict x, const float *restrict w, const float *restrict bias,
                   float *restrict y, long rows, long n_in, long n_out, int accumulate) {
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < n_out; j++)
            y[r * n_out + j] = (accumulate ? y[r * n_out + j] : 0.0f) + (bias ? bias[j] : 0.0f);
    for (long k = 0; k < n_in; k++) {
        const float *row = w + k * n_out;
        for (long r = 0; r < rows; r++)
            axpy(x[r * n_in + k], row, y + r * n_out, n_out);
    }
}

void nectar_matmul_f32(const float *x, const float *w, const float *bias, float *y, long rows, long n_in, long n_out) {
    matmul(x, w, bias, y, rows, n_in, n_out, 0);
}

/* the pairwise sum of 8 accumulator lanes */
static float sum_lanes(const float lanes[8]) {
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

static float dot(const float *a, const float *b, long n) {
    float lanes[8] = {0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            lanes[l] += a[i + l] * b[i + l];
    float sum = sum_lanes(lanes);
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out = weight * (x / sqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm computes it in float32 */
static void rms_norm(const float *x, const float *weight, float eps, float *out, long n) {
    const float inverse = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (long i = 0; i < n; i++)
        out[i] = weight[i] * (x[i] * inverse);
}

/* x = x * cos + rotate_half(x) * sin, with signed_sin the first half of sin negated (rotate_half is a roll) */
static void rope(float *x, const float *cos, const float *signed_sin, float *tmp, long dim) {
    const long half = dim / 2;
    memcpy(tmp, x, dim * sizeof(float));
    for (long i = 0; i < dim; i++)
        x[i] = tmp[i] * cos[i] + tmp[(i + half) % dim] * signed_sin[i];
}

/* out[head_dim] = softmax(scale * query . keys[j]) @ values[j] over positions j < count (key and value j at
 * j * pos_stride); scores holds count floats */
static void attend(const float *query, const float *keys, const float *values, long pos_stride, long count,
                   long head_dim, float scale, float *scores, float *out) {
    float top = -INFINITY, total = 0.0f;
    for (long j = 0; j < count; j++) {
        scores[j] = dot(query, keys + j * pos_stride, head_dim) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    memset(out, 0, head_dim * sizeof(float));
    for (long j = 0; j < count; j++) {
        const float p = expf(scores[j] - top);
        total += p;
        axpy(p, values + j * pos_stride, out, head_dim);
    }
    const float inverse = 1.0f / total;
    for (long i = 0; i < head_dim; i++)
        out[i] *= inverse;
}

/* One Llama decoder layer for one new token of one sequence, in place on x[hidden]:
 *   x += o_proj(attention(rope(qkv(norm(x)))));  x += down(silu(gate) * up)(norm(x))
 * Weights are [in, out]; qkv's columns are the query heads, then the key heads, then the value heads; gate_up's
 * are gate, then up. The token's key and value go to position `length` of the cache (keys[kv_head * head_stride
 * + position * pos_stride + i]), and the query attends to positions 0..length. `scratch` holds at least
 * (2 * heads + 2 * kv_heads + 1) * head_dim + hidden + 2 * intermediate + length + 1 floats. */
void nectar_llama_decode_f32(
    float *x, long hidden, const float *input_norm, const float *post_norm, float eps,
    const float *qkv_w, const float *qkv_b, long heads, long kv_heads, long head_dim,
    const float *o_w, const float *o_b, const float *gate_up_w, const float *gate_up_b, long intermediate,
    const float *down_w, const float *down_b, const float *cos, const float *signed_sin,
    float *keys, float *values, long head_stride, long pos_stride, long length, float scale, float *scratch) {
    const long qkv_size = (heads + 2 * kv_heads) * head_dim;
    float *qkv = scratch, *attention = qkv + qkv_size, *normed = attention + heads * head_dim;
    float *gate_up = normed + hidden, *tmp = gate_up + 2 * intermediate, *scores = tmp + head_dim;

    rms_norm(x, input_norm, eps, normed, hidden);
    matmul(normed, qkv_w, qkv_b, qkv, 1, hidden, qkv_size, 0);
    for (long h = 0; h < heads + kv_heads; h++)
        rope(qkv + h * head_dim, cos, signed_sin, tmp, head_dim);
    for (long h = 0; h < kv_heads; h++) {
        memcpy(keys + h * head_stride + length * pos_stride, qkv + (heads + h) * head_dim, head_dim * sizeof(float));
        memcpy(values + h * head_stride + length * pos_stride, qkv + (heads + kv_heads + h) * head_dim,
               head_dim * sizeof(float));
    }
    const long group = heads / kv_heads;
    for (long h = 0; h < heads; h++)
        attend(qkv + h * head_dim, keys + (h / group) * head_stride, values + (h / group) * head_stride, pos_stride,
               length + 1, head_dim, scale, scores, attention + h * head_dim);
    matmul(attention, o_w, o_b, x, 1, heads * head_dim, hidden, 1);
    rms_norm(x, post_norm, eps, normed, hidden);
    matmul(normed, gate_up_w, gate_up_b, gate_up, 1, hidden, 2 * intermediate, 0);
    for (long i = 0; i < intermediate; i++) {
        const float g = gate_up[i];
        gate_up[i] = g / (1.0f + expf(-g)) * gate_up[intermediate + i];
    }
    matmul(gate_up, down_w, down_b, x, 1, intermediate, hidden, 1);
}

/* A decode round's attention: one new token for each of n sessions, each against its own cache, with no copy of the
 * caches into one padded batch (which cost a CPU node's rounds of 16 sessions a sixth of their time). Row s of qkv
 * (row stride qkv_stride) holds session s's query heads, then its key heads, then its value heads, roped. Its key
 * and value go to position lengths[s] of its cache, whose keys and values start at keys[s] and values[s]
 * ([kv_heads, max_length, head_dim]: head stride head_strides[s], position stride head_dim); its query attends to
 * positions 0..lengths[s]. out[n, heads * head_dim]; scratch holds max(lengths) + 1 floats. */
void nectar_decode_attention_f32(const float *qkv, long qkv_stride, long n, long heads, long kv_heads, long head_dim,
                                 float *const *keys, float *const *values, const long *head_strides,
                                 const long *lengths, float scale, float *out, float *scratch) {
    const long group = heads / kv_heads;
    for (long s = 0; s < n; s++) {
        const float *row = qkv + s * qkv_stride;
        const long stride = head_strides[s], length = lengths[s];
        for (long h = 0; h < kv_heads; h++) {
            memcpy(keys[s] + h * stride + length * head_dim, row + (heads + h) * head_dim, head_dim * sizeof(float));
            memcpy(values[s] + h * stride + length * head_dim, row + (heads + kv_heads + h) * head_dim,
                   head_dim * sizeof(float));
        }
        for (long h = 0; h < heads; h++)
            attend(row + h * head_dim, keys[s] + (h / group) * stride, values[s] + (h / group) * stride, head_dim,
                   length + 1, head_dim, scale, scratch, out + (s * heads + h) * head_dim);
    }
}

/* Approximate logits of one row from an int8 LM head with a bfloat16 scale per vocabulary row
 * (nectar.models.greedy_head): out[v] = (x . q[v]) * scale[v] (+ bias[v]), summed in float32. The head's error bound
 * covers this: int8 values are exact in float32, x is not rounded to bfloat16, and the one rounding of the scale
 * product is far inside the bound's output term. One sequential pass over q, two rows ahead fetched non-temporally
 * (further ahead ran slower: 1.1-1.5 vs 0.95-1.2 ms for 32000x512). */
void nectar_int8_logits(const float *restrict x, const signed char *restrict q, const unsigned short *restrict scales,
                        const float *restrict bias, float *restrict out, long vocab, long hidden) {
    for (long v = 0; v < vocab; v++) {
        const signed char *row = q + v * hidden;
        float sum = 0.0f;
        long i = 0;
#if defined(__AVX512F__)
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; i + 32 <= hidden; i += 32) {
            _mm_prefetch((const char *)(row + i + 1024), _MM_HINT_NTA);
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + i)))), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128((const __m128i *)(row + i + 16)))), acc1);
        }
        sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; i + 16 <= hidden; i += 16) {
            _mm_prefetch((const char *)(row + i + 1024), _MM_HINT_NTA);
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i *)(row + i)))), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64((const __m128i *)(row + i + 8)))), acc1);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(acc0, acc1));
        sum = sum_lanes(lanes);
#endif
        for (; i < hidden; i++)
            sum += x[i] * (float)row[i];
        union { unsigned int bits; float value; } scale = {.bits = (unsigned int)scales[v] << 16};  /* bfloat16 */
        out[v] = sum * scale.value + (bias ? bias[v] : 0.0f);
    }
}
