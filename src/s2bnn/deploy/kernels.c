/* s2bnn.deploy compiled kernels: bit-packing and XNOR/popcount binary convolutions.
 *
 * Plain C (no torch headers), built once into a shared library and called through ctypes on the
 * data pointers of contiguous tensors. Layouts (channels-last):
 *   float activations  [N, H, W, C]             float32
 *   bit activations    [N, H, W, WD]            uint64, WD = ceil(C / 64); bit c%64 of word c/64
 *                                                is 1 where the value is negative (sign -1); bits
 *                                                past C are 0
 *   binary weights     [Cout, LP]               uint64, row = KH*KW taps of WD words, zero padded
 *                                                to LP words (a multiple of the level's alignment)
 *   with tap2 (Cin <= 32, more than one tap): two taps per word instead, tap t in bits
 *   32 * (t % 2) of word t / 2 (a row of ceil(KH*KW / 2) words, the gathered patch likewise)
 * A binary dot product over the in-bounds taps is  n_valid * Cin - 2 * popcount(x XOR w).  The
 * trained model zero-pads its +-1 input; bits cannot hold 0, so out-of-bounds taps are gathered as
 * zero words and their popcount(0 XOR w) = popcount(w_tap) (precomputed per output channel and
 * tap) is subtracted again: the integer result equals the float model's exactly.
 *
 * ISA levels (chosen at run time): 0 portable C, 1 scalar POPCNT, 2 AVX2 (pshufb nibble table),
 * 3 AVX-512 VPOPCNTDQ. Every level computes the same integers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define S2D_X86 1
#endif

#define S2D_ABI_VERSION 6
#define PT 4 /* output pixels per tile */

int s2d_abi_version(void) { return S2D_ABI_VERSION; }

/* Bit 0: POPCNT, bit 1: AVX2, bit 2: AVX-512 F+BW+VPOPCNTDQ. */
int s2d_cpu_features(void) {
    int f = 0;
#ifdef S2D_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt")) f |= 1;
    if (__builtin_cpu_supports("avx2")) f |= 2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
        f |= 4;
#endif
    return f;
}

static inline int popc_portable(uint64_t v) {
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (int)((v * 0x0101010101010101ULL) >> 56);
}

/* ------------------------------------------------------------------ GEMM micro-kernels
 * acc[i * cout + co] = sum_j popcount(r[i][j] ^ w[co * lp + j]) for the PT pixel rows r[i] (lp
 * words each: a gathered patch, or for a 1x1 convolution the input pixel itself) and all co. */
#define S2D_INLINE static inline __attribute__((always_inline))
#ifndef S2D_GEMM2
#define S2D_GEMM2 gemm_hybrid
#endif
typedef const uint64_t *const rows_t[PT];

static void gemm_portable(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const uint64_t *p0 = r[0], *p1 = r[1], *p2 = r[2], *p3 = r[3];
    for (int co = 0; co < cout; co++) {
        const uint64_t *wr = w + (size_t)co * lp;
        int s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t wj = wr[j];
            s0 += popc_portable(p0[j] ^ wj);
            s1 += popc_portable(p1[j] ^ wj);
            s2 += popc_portable(p2[j] ^ wj);
            s3 += popc_portable(p3[j] ^ wj);
        }
        acc[co] = s0; acc[cout + co] = s1; acc[2 * cout + co] = s2; acc[3 * cout + co] = s3;
    }
}

#ifdef S2D_X86
/* Scalar POPCNT, 4 pixels x 2 output channels per inner step (8 accumulators). */
__attribute__((target("popcnt")))
static inline void gemm_popcnt42(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const uint64_t *p0 = r[0], *p1 = r[1], *p2 = r[2], *p3 = r[3];
    int co = 0;
    for (; co + 1 < cout; co += 2) {
        const uint64_t *wa = w + (size_t)co * lp, *wb = wa + lp;
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t x0 = p0[j], x1 = p1[j], x2 = p2[j], x3 = p3[j];
            uint64_t u = wa[j], v = wb[j];
            a0 += __builtin_popcountll(x0 ^ u); a1 += __builtin_popcountll(x1 ^ u);
            a2 += __builtin_popcountll(x2 ^ u); a3 += __builtin_popcountll(x3 ^ u);
            b0 += __builtin_popcountll(x0 ^ v); b1 += __builtin_popcountll(x1 ^ v);
            b2 += __builtin_popcountll(x2 ^ v); b3 += __builtin_popcountll(x3 ^ v);
        }
        acc[co] = (int32_t)a0; acc[cout + co] = (int32_t)a1;
        acc[2 * cout + co] = (int32_t)a2; acc[3 * cout + co] = (int32_t)a3;
        acc[co + 1] = (int32_t)b0; acc[cout + co + 1] = (int32_t)b1;
        acc[2 * cout + co + 1] = (int32_t)b2; acc[3 * cout + co + 1] = (int32_t)b3;
    }
    for (; co < cout; co++) {
        const uint64_t *wr = w + (size_t)co * lp;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t wj = wr[j];
            s0 += __builtin_popcountll(p0[j] ^ wj); s1 += __builtin_popcountll(p1[j] ^ wj);
            s2 += __builtin_popcountll(p2[j] ^ wj); s3 += __builtin_popcountll(p3[j] ^ wj);
        }
        acc[co] = (int32_t)s0; acc[cout + co] = (int32_t)s1;
        acc[2 * cout + co] = (int32_t)s2; acc[3 * cout + co] = (int32_t)s3;
    }
}

/* Scalar POPCNT, 4 pixels x 4 output channels per inner step (16 accumulators; the compiler
 * keeps some of them on the stack, which costs loads and stores but no ALU slot: on this Zen 1
 * the integer ALUs are the limit, and 16 pairs per step share 8 loads and the loop overhead
 * where 4 x 2 shares 6 for 8). Channels past the last multiple of 4 go through the 4 x 2 loop. */
#ifndef S2D_TILE44
#define S2D_TILE44 1
#endif
__attribute__((target("popcnt")))
static inline void gemm_popcnt(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
#if S2D_TILE44
    const uint64_t *p[PT] = {r[0], r[1], r[2], r[3]};
    int co = 0;
    for (; co + 3 < cout; co += 4) {
        const uint64_t *wc = w + (size_t)co * lp;
        uint64_t s[PT][4] = {{0}};
        for (int j = 0; j < lp; j++) {
            uint64_t u[4];
            for (int c = 0; c < 4; c++) u[c] = wc[(size_t)c * lp + j];
            for (int i = 0; i < PT; i++) {
                const uint64_t xi = p[i][j];
                for (int c = 0; c < 4; c++) s[i][c] += __builtin_popcountll(xi ^ u[c]);
            }
        }
        for (int i = 0; i < PT; i++)
            for (int c = 0; c < 4; c++) acc[(size_t)i * cout + co + c] = (int32_t)s[i][c];
    }
    if (co == cout) return;
    /* the last 1-3 channels: the 4 x 2 loop on a shifted view (acc rows keep stride cout) */
    int32_t tail[PT * 3];
    const int nt = cout - co;
    gemm_popcnt42(r, w + (size_t)co * lp, lp, nt, tail);
    for (int i = 0; i < PT; i++)
        for (int c = 0; c < nt; c++) acc[(size_t)i * cout + co + c] = tail[i * nt + c];
#else
    gemm_popcnt42(r, w, lp, cout, acc);
#endif
}

__attribute__((target("avx2")))
static inline __m256i popc8_avx2(__m256i v, __m256i lut, __m256i low) {
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

__attribute__((target("avx2")))
static inline int64_t hsum4_avx2(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* pshufb nibble table over whole 256-bit chunks of the row; a tail of lp % 4 words with scalar
 * POPCNT. Byte counters take at most 31 chunks (8 per byte each) before psadbw widens them. */
__attribute__((target("avx2,popcnt")))
static inline void gemm_avx2(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const uint64_t *p0 = r[0], *p1 = r[1], *p2 = r[2], *p3 = r[3];
    const int nch = lp / 4;
    for (int co = 0; co < cout; co++) {
        const uint64_t *wr = w + (size_t)co * lp;
        __m256i t0 = zero, t1 = zero, t2 = zero, t3 = zero;
        for (int c0 = 0; c0 < nch; c0 += 31) {
            int c1 = c0 + 31 < nch ? c0 + 31 : nch;
            __m256i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
            for (int c = c0; c < c1; c++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + 4 * c));
                b0 = _mm256_add_epi8(b0, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p0 + 4 * c)), wv), lut, low));
                b1 = _mm256_add_epi8(b1, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p1 + 4 * c)), wv), lut, low));
                b2 = _mm256_add_epi8(b2, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p2 + 4 * c)), wv), lut, low));
                b3 = _mm256_add_epi8(b3, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p3 + 4 * c)), wv), lut, low));
            }
            t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(b0, zero));
            t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(b1, zero));
            t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(b2, zero));
            t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(b3, zero));
        }
        int64_t s0 = hsum4_avx2(t0), s1 = hsum4_avx2(t1), s2 = hsum4_avx2(t2),
                s3 = hsum4_avx2(t3);
        for (int j = 4 * nch; j < lp; j++) {
            uint64_t wj = wr[j];
            s0 += __builtin_popcountll(p0[j] ^ wj); s1 += __builtin_popcountll(p1[j] ^ wj);
            s2 += __builtin_popcountll(p2[j] ^ wj); s3 += __builtin_popcountll(p3[j] ^ wj);
        }
        acc[co] = (int32_t)s0; acc[cout + co] = (int32_t)s1;
        acc[2 * cout + co] = (int32_t)s2; acc[3 * cout + co] = (int32_t)s3;
    }
}

/* Two output channels at once on both kinds of execution unit: channel co with the pshufb
 * nibble table on the vector pipes, channel co + 1 with scalar POPCNT on the integer pipes, in one
 * loop over the same 256-bit chunks (the out-of-order core runs both streams side by side). */
__attribute__((target("avx2,popcnt")))
static inline void gemm_hybrid(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const uint64_t *p0 = r[0], *p1 = r[1], *p2 = r[2], *p3 = r[3];
    const int nch = lp / 4;
    int co = 0;
    for (; co + 1 < cout; co += 2) {
        const uint64_t *wr = w + (size_t)co * lp, *ws = wr + lp;
        __m256i t0 = zero, t1 = zero, t2 = zero, t3 = zero;
        uint64_t q0 = 0, q1 = 0, q2 = 0, q3 = 0;
        for (int c0 = 0; c0 < nch; c0 += 31) {
            int c1 = c0 + 31 < nch ? c0 + 31 : nch;
            __m256i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
            for (int c = c0; c < c1; c++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + 4 * c));
                b0 = _mm256_add_epi8(b0, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p0 + 4 * c)), wv), lut, low));
                b1 = _mm256_add_epi8(b1, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p1 + 4 * c)), wv), lut, low));
                b2 = _mm256_add_epi8(b2, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p2 + 4 * c)), wv), lut, low));
                b3 = _mm256_add_epi8(b3, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p3 + 4 * c)), wv), lut, low));
                for (int j = 4 * c; j < 4 * c + 4; j++) {
                    uint64_t u = ws[j];
                    q0 += __builtin_popcountll(p0[j] ^ u); q1 += __builtin_popcountll(p1[j] ^ u);
                    q2 += __builtin_popcountll(p2[j] ^ u); q3 += __builtin_popcountll(p3[j] ^ u);
                }
            }
            t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(b0, zero));
            t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(b1, zero));
            t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(b2, zero));
            t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(b3, zero));
        }
        int64_t s0 = hsum4_avx2(t0), s1 = hsum4_avx2(t1), s2 = hsum4_avx2(t2),
                s3 = hsum4_avx2(t3);
        for (int j = 4 * nch; j < lp; j++) {
            uint64_t u = wr[j], v = ws[j];
            s0 += __builtin_popcountll(p0[j] ^ u); s1 += __builtin_popcountll(p1[j] ^ u);
            s2 += __builtin_popcountll(p2[j] ^ u); s3 += __builtin_popcountll(p3[j] ^ u);
            q0 += __builtin_popcountll(p0[j] ^ v); q1 += __builtin_popcountll(p1[j] ^ v);
            q2 += __builtin_popcountll(p2[j] ^ v); q3 += __builtin_popcountll(p3[j] ^ v);
        }
        acc[co] = (int32_t)s0; acc[cout + co] = (int32_t)s1;
        acc[2 * cout + co] = (int32_t)s2; acc[3 * cout + co] = (int32_t)s3;
        acc[co + 1] = (int32_t)q0; acc[cout + co + 1] = (int32_t)q1;
        acc[2 * cout + co + 1] = (int32_t)q2; acc[3 * cout + co + 1] = (int32_t)q3;
    }
    if (co < cout) { /* odd last channel: scalar POPCNT */
        const uint64_t *wr = w + (size_t)co * lp;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t u = wr[j];
            s0 += __builtin_popcountll(p0[j] ^ u); s1 += __builtin_popcountll(p1[j] ^ u);
            s2 += __builtin_popcountll(p2[j] ^ u); s3 += __builtin_popcountll(p3[j] ^ u);
        }
        acc[co] = (int32_t)s0; acc[cout + co] = (int32_t)s1;
        acc[2 * cout + co] = (int32_t)s2; acc[3 * cout + co] = (int32_t)s3;
    }
}

#ifndef S2D_CSPLIT_TILES
#define S2D_CSPLIT_TILES 32
#endif
/* The AVX2 level runs the vector + integer hybrid only on rows of at least this many words. Since
 * the 4 x 4 POPCNT tile it is never chosen by default: on this Zen 1 the POPCNT kernel was
 * faster at every row length measured, 144 words included (see docs/DEPLOY.md); -DS2D_HYB_MIN=73
 * brings back the previous choice (the hybrid above 72 words) for comparison. */
#ifndef S2D_HYB_MIN
#define S2D_HYB_MIN 0x7fffffff
#endif
/* Rows of 1, 2, 4 or 8 words (1x1 convolutions of up to 512 channels): the 4 x 2 POPCNT kernel
 * compiled for that constant length (fully unrolled, no loop per channel pair; the 4 x 4 tile
 * measured slower on them). Longer rows: the 4 x 4 kernel, with S2D_LPCONST compiled for the
 * row lengths of 3x3 convolutions (5: <= 32 channels, two taps per word; 9, 18, 36, 72, 144: 64
 * to 1024 channels). */
#ifndef S2D_LPCONST
#define S2D_LPCONST 1
#endif
#ifndef S2D_SHORT44
#define S2D_SHORT44 0
#endif
__attribute__((target("popcnt")))
static inline void gemm_popcnt_k(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    switch (lp) {
    case 1: gemm_popcnt42(r, w, 1, cout, acc); break;
    case 2: gemm_popcnt42(r, w, 2, cout, acc); break;
#if S2D_SHORT44
    case 4: gemm_popcnt(r, w, 4, cout, acc); break;
    case 8: gemm_popcnt(r, w, 8, cout, acc); break;
    case 16: gemm_popcnt(r, w, 16, cout, acc); break;
#else
    case 4: gemm_popcnt42(r, w, 4, cout, acc); break;
    case 8: gemm_popcnt42(r, w, 8, cout, acc); break;
#endif
#if S2D_LPCONST
    case 5: gemm_popcnt(r, w, 5, cout, acc); break;
    case 9: gemm_popcnt(r, w, 9, cout, acc); break;
    case 18: gemm_popcnt(r, w, 18, cout, acc); break;
    case 36: gemm_popcnt(r, w, 36, cout, acc); break;
    case 72: gemm_popcnt(r, w, 72, cout, acc); break;
    case 144: gemm_popcnt(r, w, 144, cout, acc); break;
#endif
    default: gemm_popcnt(r, w, lp, cout, acc); break;
    }
}
#ifndef S2D_GEMM_SMALL
#define S2D_GEMM_SMALL gemm_popcnt_k
#endif

/* lp is a multiple of 8 words: whole 512-bit chunks. Two output channels x four pixels. */
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
static inline void gemm_avx512(rows_t r, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const uint64_t *p0 = r[0], *p1 = r[1], *p2 = r[2], *p3 = r[3];
    int co = 0;
    for (; co + 1 < cout; co += 2) {
        const uint64_t *wa = w + (size_t)co * lp, *wb = wa + lp;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        __m512i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int j = 0; j < lp; j += 8) {
            __m512i u = _mm512_loadu_si512(wa + j), v = _mm512_loadu_si512(wb + j);
            __m512i x0 = _mm512_loadu_si512(p0 + j), x1 = _mm512_loadu_si512(p1 + j);
            __m512i x2 = _mm512_loadu_si512(p2 + j), x3 = _mm512_loadu_si512(p3 + j);
            a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_xor_si512(x0, u)));
            a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_xor_si512(x1, u)));
            a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_xor_si512(x2, u)));
            a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_xor_si512(x3, u)));
            b0 = _mm512_add_epi64(b0, _mm512_popcnt_epi64(_mm512_xor_si512(x0, v)));
            b1 = _mm512_add_epi64(b1, _mm512_popcnt_epi64(_mm512_xor_si512(x1, v)));
            b2 = _mm512_add_epi64(b2, _mm512_popcnt_epi64(_mm512_xor_si512(x2, v)));
            b3 = _mm512_add_epi64(b3, _mm512_popcnt_epi64(_mm512_xor_si512(x3, v)));
        }
        acc[co] = (int32_t)_mm512_reduce_add_epi64(a0);
        acc[cout + co] = (int32_t)_mm512_reduce_add_epi64(a1);
        acc[2 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a2);
        acc[3 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a3);
        acc[co + 1] = (int32_t)_mm512_reduce_add_epi64(b0);
        acc[cout + co + 1] = (int32_t)_mm512_reduce_add_epi64(b1);
        acc[2 * cout + co + 1] = (int32_t)_mm512_reduce_add_epi64(b2);
        acc[3 * cout + co + 1] = (int32_t)_mm512_reduce_add_epi64(b3);
    }
    for (; co < cout; co++) {
        const uint64_t *wr = w + (size_t)co * lp;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < lp; j += 8) {
            __m512i u = _mm512_loadu_si512(wr + j);
            a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p0 + j), u)));
            a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p1 + j), u)));
            a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p2 + j), u)));
            a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p3 + j), u)));
        }
        acc[co] = (int32_t)_mm512_reduce_add_epi64(a0);
        acc[cout + co] = (int32_t)_mm512_reduce_add_epi64(a1);
        acc[2 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a2);
        acc[3 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a3);
    }
}
#endif

/* Highest level this build and CPU can run (the value s2d_bconv accepts for `isa`). */
int s2d_max_isa(void) {
#ifdef S2D_X86
    int f = s2d_cpu_features();
    if (f & 4) return 3;
    if ((f & 2) && (f & 1)) return 2;
    if (f & 1) return 1;
#endif
    return 0;
}

/* The level actually run for a requested one (a level the CPU lacks falls back). */
static int eff_isa(int isa) {
    int top = s2d_max_isa();
    if (isa > top) isa = top;
    if (isa == 2 && !((s2d_cpu_features() & 3) == 3)) isa = (s2d_cpu_features() & 1) ? 1 : 0;
    return isa < 0 ? 0 : isa;
}

/* Weight rows must be padded to a multiple of this many words for level `isa`. */
int s2d_lp_align(int isa) { return eff_isa(isa) == 3 ? 8 : 1; }

/* ------------------------------------------------------------------ sign + bit-pack */
static inline void pack_row(const float *v, const float *thr, int c, int wd, uint64_t *out) {
    for (int k = 0; k < wd; k++) {
        uint64_t word = 0;
        int c0 = k * 64, c1 = c0 + 64 < c ? c0 + 64 : c;
        for (int ch = c0; ch < c1; ch++) {
            float t = thr ? v[ch] + thr[ch] : v[ch];
            word |= (uint64_t)(t < 0.0f) << (ch - c0);
        }
        out[k] = word;
    }
}

#ifdef S2D_X86
/* Same bits as pack_row: 8 channels per compare + movemask (NaN compares false -> bit 0). */
__attribute__((target("avx2")))
static void pack_row_avx2(const float *v, const float *thr, int c, int wd, uint64_t *out) {
    const __m256 zero = _mm256_setzero_ps();
    for (int k = 0; k < wd; k++) {
        uint64_t word = 0;
        int c0 = k * 64, c1 = c0 + 64 < c ? c0 + 64 : c, ch = c0;
        for (; ch + 8 <= c1; ch += 8) {
            __m256 t = _mm256_loadu_ps(v + ch);
            if (thr) t = _mm256_add_ps(t, _mm256_loadu_ps(thr + ch));
            uint64_t m = (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(t, zero, _CMP_LT_OQ));
            word |= m << (ch - c0);
        }
        for (; ch < c1; ch++) {
            float t = thr ? v[ch] + thr[ch] : v[ch];
            word |= (uint64_t)(t < 0.0f) << (ch - c0);
        }
        out[k] = word;
    }
}
#endif

typedef void (*pack_fn)(const float *, const float *, int, int, uint64_t *);

static pack_fn pick_pack(int isa) {
#ifdef S2D_X86
    if (isa >= 2 && (s2d_cpu_features() & 2)) return pack_row_avx2;
#endif
    (void)isa;
    return pack_row;
}

/* out[p, :] = bits of sign(x[p, :] + thr) for npix channels-last pixels (thr may be NULL). */
void s2d_sign_pack(const float *x, int64_t npix, int c, const float *thr, uint64_t *out,
                   int isa, int nthreads) {
    int wd = (c + 63) / 64;
    pack_fn pk = pick_pack(isa);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (npix * c > 32768)
    for (int64_t p = 0; p < npix; p++) pk(x + p * c, thr, c, wd, out + p * wd);
}


/* ------------------------------------------------------------------ binary convolution */
typedef struct {
    const uint64_t *x;   /* [N, H, W, wd] */
    const uint64_t *w;   /* [cout, lp] */
    const int32_t *wpc;  /* [kh*kw, cout] popcount of each tap's weight words */
    int n, h, w_, wd, cin, cout, kh, kw, stride, pad, oh, ow, lp;
    const float *scale, *bias;       /* [cout]: y = dot * scale + bias */
    const float *res; int res_c;      /* optional residual [N, oh, ow, res_c], channel co % res_c */
    const float *si, *slope, *so;     /* optional RPReLU: prelu(y - si, slope) + so */
    float *out;                       /* optional float output [N, oh, ow, cout] */
    const float *thr;                 /* optional threshold of the bit output */
    uint64_t *out_bits;               /* optional bit output [N, oh, ow, ceil(cout/64)] */
    int32_t *dot_out;                 /* optional raw integer dot products [N, oh, ow, cout] */
    int isa, nthreads;
    int tap2;                         /* Cin <= 32: two taps per 64-bit word (see the top) */
    int res_pool;                     /* res is [N, 2 oh, 2 ow, res_c]: its 2x2 average is added */
    int out_pool;                     /* out is [N, oh / 2, ow / 2, cout]: the 2x2 average of the
                                         float output (oh, ow even), summed in place */
} s2d_bconv_args;

/* The residual's pixel for output pixel pix: itself, or with res_pool the top-left pixel of its
 * 2x2 window (the window's other pixels are + rc, + 2 ow rc and + 2 ow rc + rc). */
static inline const float *res_px(const s2d_bconv_args *a, int64_t pix) {
    if (!a->res_pool) return a->res + pix * a->res_c;
    const int64_t ohw = (int64_t)a->oh * a->ow, b = pix / ohw, q = pix % ohw;
    const int64_t oy = q / a->ow, ox = q % a->ow;
    return a->res + ((b * 2 * a->oh + 2 * oy) * 2 * a->ow + 2 * ox) * a->res_c;
}

/* With out_pool: the pooled output pixel of output pixel pix and which of its window's four
 * pixels pix is (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). The window is summed in
 * torch's avg_pool2d order, ((((0 + q0) + q1) + q2) + q3) / 4: q0 writes 0 + v, q1 and q2 add,
 * q3 adds and divides. Pixels are visited in order within a thread, and threads own whole pairs
 * of rows (bconv_part), so each window's four come in that order. */
static inline float *pool_dst(const s2d_bconv_args *a, int64_t pix, int *quad) {
    const int64_t ohw = (int64_t)a->oh * a->ow, b = pix / ohw, q = pix % ohw;
    const int64_t oy = q / a->ow, ox = q % a->ow;
    *quad = (int)(((oy & 1) << 1) | (ox & 1));
    return a->out + ((b * (a->oh / 2) + oy / 2) * (a->ow / 2) + ox / 2) * a->cout;
}

/* Per-thread scratch: PT gathered patches, PT x cout accumulators, one float row. */
typedef struct { uint64_t *patch; int32_t *acc; float *vals; } scratch_t;

/* Output transform of one pixel, while its accumulators are hot: border correction, integer dot,
 * scale/bias, residual, RPReLU, sign + bit-pack. Plain loops over channels that the compiler
 * vectorises for the level's target (element-wise IEEE operations: every level rounds the same). */
S2D_INLINE void epilogue_px(const s2d_bconv_args *a, int32_t *restrict ac, int nb, uint64_t inv,
                            int64_t pix, float *restrict vals, int level) {
    const int cout = a->cout;
    while (inv) { /* take back popcount(0 XOR w) of each padded tap */
        int tap = __builtin_ctzll(inv);
        inv &= inv - 1;
        const int32_t *restrict wp = a->wpc + (size_t)tap * cout;
        for (int co = 0; co < cout; co++) ac[co] -= wp[co];
    }
    if (a->dot_out) {
        int32_t *restrict d = a->dot_out + pix * cout;
        for (int co = 0; co < cout; co++) d[co] = nb - 2 * ac[co];
    }
    float *restrict v = a->out && !a->out_pool ? a->out + pix * cout : vals;
    const float *restrict sc = a->scale, *restrict bi = a->bias;
    for (int co = 0; co < cout; co++) {
        float d = (float)(nb - 2 * ac[co]) * sc[co];
        v[co] = d + bi[co];
    }
    if (a->res && a->res_pool) {
        /* torch's avg_pool2d(2, 2), channels-last: ((((0 + a) + b) + c) + d) / 4 */
        const int rc = a->res_c;
        const float *restrict r0 = res_px(a, pix), *restrict r1 = r0 + rc;
        const float *restrict r2 = r0 + (size_t)2 * a->ow * rc, *restrict r3 = r2 + rc;
        for (int co = 0; co < cout; co++) {
            const int c = rc == cout ? co : co % rc;
            float m = 0.0f;
            m = m + r0[c]; m = m + r1[c]; m = m + r2[c]; m = m + r3[c];
            v[co] = v[co] + m / 4.0f;
        }
    } else if (a->res) {
        const float *restrict r = a->res + pix * a->res_c;
        const int rc = a->res_c;
        if (rc == cout) {
            for (int co = 0; co < cout; co++) v[co] = v[co] + r[co];
        } else {
            for (int r0 = 0; r0 < cout; r0 += rc)
                for (int c = 0; c < rc; c++) v[r0 + c] = v[r0 + c] + r[c];
        }
    }
    if (a->slope) {
        const float *restrict si = a->si, *restrict sl = a->slope, *restrict so = a->so;
        for (int co = 0; co < cout; co++) {
            /* u * 1 == u exactly: the same value as (u > 0 ? u : u * slope), without a branch */
            float u = v[co] - si[co], k = sl[co];
            v[co] = u * (u > 0.0f ? 1.0f : k) + so[co];
        }
    }
    if (a->out && a->out_pool) {
        int quad;
        float *restrict d = pool_dst(a, pix, &quad);
        if (quad == 0) for (int co = 0; co < cout; co++) d[co] = 0.0f + v[co];
        else if (quad < 3) for (int co = 0; co < cout; co++) d[co] = d[co] + v[co];
        else for (int co = 0; co < cout; co++) d[co] = (d[co] + v[co]) / 4.0f;
    }
    if (a->out_bits) {
        const int owd = (cout + 63) / 64;
#ifdef S2D_X86
        if (level >= 2) pack_row_avx2(v, a->thr, cout, owd, a->out_bits + pix * owd);
        else
#endif
            pack_row(v, a->thr, cout, owd, a->out_bits + pix * owd);
    }
}

#ifdef S2D_X86
/* The same output transform with AVX2, fused in one pass of 8 channels: each step's floats are
 * computed with the same IEEE operations in the same order as epilogue_px (so the same bits), the
 * sign bits go straight from the registers into the packed words. The caller has applied the
 * border correction; needs res_c == cout or res_c % 8 == 0 (else epilogue_px runs). */
__attribute__((target("avx2")))
static inline void epilogue_avx2(const s2d_bconv_args *a, const int32_t *restrict ac, int nb,
                                 int64_t pix, int c0, int c1) {
    /* channels [c0, c1) (c0 a multiple of 64; c1 too unless it is cout); ac[co - c0] */
    const int cout = a->cout, rc = a->res_c;
    ac -= c0;
    float *restrict v = a->out ? a->out + pix * cout : NULL;
    int quad = -1;
    if (a->out && a->out_pool) v = pool_dst(a, pix, &quad);
    const float *restrict r = a->res ? res_px(a, pix) : NULL;
    const int pool = a->res_pool;
    const size_t rrow = (size_t)2 * a->ow * rc;
    const __m256 four = _mm256_set1_ps(4.0f);
    const float *restrict thr = a->thr;
    uint64_t *restrict ob = a->out_bits ? a->out_bits + pix * ((cout + 63) / 64) : NULL;
    const int rp = a->slope != NULL;
    const __m256i nbv = _mm256_set1_epi32(nb);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    uint64_t word = 0;
    int co = c0;
    for (; co + 8 <= c1; co += 8) {
        __m256i iv = _mm256_loadu_si256((const __m256i *)(ac + co));
        iv = _mm256_sub_epi32(nbv, _mm256_add_epi32(iv, iv));
        __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(iv), _mm256_loadu_ps(a->scale + co));
        y = _mm256_add_ps(y, _mm256_loadu_ps(a->bias + co));
        if (r) {
            const float *rr = r + (rc == cout ? co : co % rc);
            __m256 rv = _mm256_loadu_ps(rr);
            if (pool) { /* the 2x2 average, in epilogue_px's order */
                rv = _mm256_add_ps(_mm256_setzero_ps(), rv);
                rv = _mm256_add_ps(rv, _mm256_loadu_ps(rr + rc));
                rv = _mm256_add_ps(rv, _mm256_loadu_ps(rr + rrow));
                rv = _mm256_add_ps(rv, _mm256_loadu_ps(rr + rrow + rc));
                rv = _mm256_div_ps(rv, four);
            }
            y = _mm256_add_ps(y, rv);
        }
        if (rp) {
            __m256 u = _mm256_sub_ps(y, _mm256_loadu_ps(a->si + co));
            __m256 k = _mm256_blendv_ps(_mm256_loadu_ps(a->slope + co), one,
                                        _mm256_cmp_ps(u, zero, _CMP_GT_OQ));
            y = _mm256_add_ps(_mm256_mul_ps(u, k), _mm256_loadu_ps(a->so + co));
        }
        if (quad == 0) {
            _mm256_storeu_ps(v + co, _mm256_add_ps(zero, y));
        } else if (quad > 0) {
            __m256 d = _mm256_add_ps(_mm256_loadu_ps(v + co), y);
            _mm256_storeu_ps(v + co, quad == 3 ? _mm256_div_ps(d, four) : d);
        } else if (v) {
            _mm256_storeu_ps(v + co, y);
        }
        if (ob) {
            __m256 t = thr ? _mm256_add_ps(y, _mm256_loadu_ps(thr + co)) : y;
            word |= (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(t, zero, _CMP_LT_OQ))
                    << (co & 63);
            if ((co & 63) == 56) { ob[co >> 6] = word; word = 0; }
        }
    }
    for (; co < c1; co++) { /* channel tail, scalar: the formulas of epilogue_px */
        float y = (float)(nb - 2 * ac[co]) * a->scale[co];
        y = y + a->bias[co];
        if (r) {
            const int c = co % rc;
            float m = r[c];
            if (pool) {
                m = 0.0f;
                m = m + r[c]; m = m + r[c + rc]; m = m + r[c + rrow]; m = m + r[c + rrow + rc];
                m = m / 4.0f;
            }
            y = y + m;
        }
        if (rp) {
            float u = y - a->si[co], k = a->slope[co];
            y = u * (u > 0.0f ? 1.0f : k) + a->so[co];
        }
        if (quad == 0) v[co] = 0.0f + y;
        else if (quad > 0) v[co] = quad == 3 ? (v[co] + y) / 4.0f : v[co] + y;
        else if (v) v[co] = y;
        if (ob) {
            float t = thr ? y + thr[co] : y;
            word |= (uint64_t)(t < 0.0f) << (co & 63);
            if ((co & 63) == 63) { ob[co >> 6] = word; word = 0; }
        }
    }
    if (ob && (c1 & 63)) ob[c1 >> 6] = word;
}
#endif

/* Tiles [t0, t1) of PT output pixels: gather, GEMM, epilogue. `level` is a constant in each
 * instantiation below, so the kernel, the gather and the epilogue are compiled for its target. */
S2D_INLINE void bconv_tiles(const s2d_bconv_args *a, int64_t t0, int64_t t1, int c0, int c1,
                            scratch_t *s, int level) {
    /* output channels [c0, c1) only (all of them unless s2d_bconv splits them over threads; a
     * split is only made where the AVX2 epilogue runs) */
    const int taps = a->kh * a->kw, lp = a->lp, wd = a->wd, cout = c1 - c0;
    const uint64_t *const wts = a->w + (size_t)c0 * lp;
    const int kh = a->kh, kw = a->kw, st = a->stride, pad = a->pad, h = a->h, wi = a->w_;
    const int oh = a->oh, ow = a->ow;
    const int64_t total = (int64_t)a->n * oh * ow;
    /* A 1x1 convolution whose rows need no padding reads the input pixels in place. */
    const int direct = kh == 1 && kw == 1 && pad == 0 && lp == wd && !a->tap2;
    const int tap2 = a->tap2;
    const uint64_t *x = a->x;
    int64_t p0 = t0 * PT;
    int ox = (int)(p0 % ow), oy = (int)((p0 / ow) % oh);
    int64_t b = p0 / ((int64_t)ow * oh);
    for (int64_t t = t0; t < t1; t++, p0 += PT) {
        const int np = total - p0 < PT ? (int)(total - p0) : PT;
        const uint64_t *rows[PT] = {0};
        uint64_t invalid[PT] = {0};
        int nvalid[PT];
        for (int i = 0; i < np; i++) {
            const int iy0 = oy * st - pad, ix0 = ox * st - pad;
            if (direct) {
                rows[i] = x + (((b * h + iy0) * wi) + ix0) * wd;
                nvalid[i] = 1;
            } else if (tap2) { /* wd == 1: tap t goes to bits 32 * (t % 2) of word t / 2 */
                uint64_t *dst = s->patch + (size_t)i * lp;
                rows[i] = dst;
                for (int j = 0; j < (taps + 1) / 2; j++) dst[j] = 0;
                int nv = 0;
                uint64_t inv = 0;
                for (int ky = 0; ky < kh; ky++) {
                    const int iy = iy0 + ky;
                    for (int kx = 0; kx < kw; kx++) {
                        const int ix = ix0 + kx, tap = ky * kw + kx;
                        if (iy < 0 || iy >= h || ix < 0 || ix >= wi) {
                            inv |= 1ULL << tap;
                        } else {
                            dst[tap >> 1] |= x[(b * h + iy) * wi + ix] << (32 * (tap & 1));
                            nv++;
                        }
                    }
                }
                invalid[i] = inv;
                nvalid[i] = nv;
            } else {
                uint64_t *dst = s->patch + (size_t)i * lp;
                rows[i] = dst;
                if (iy0 >= 0 && iy0 + kh <= h && ix0 >= 0 && ix0 + kw <= wi) {
                    const int n = kw * wd;
                    for (int ky = 0; ky < kh; ky++) {
                        const uint64_t *src = x + (((b * h + iy0 + ky) * wi) + ix0) * wd;
                        uint64_t *d = dst + (size_t)ky * n;
                        for (int j = 0; j < n; j++) d[j] = src[j];
                    }
                    nvalid[i] = taps;
                } else {
                    int nv = 0;
                    uint64_t inv = 0;
                    for (int ky = 0; ky < kh; ky++) {
                        const int iy = iy0 + ky;
                        for (int kx = 0; kx < kw; kx++) {
                            const int ix = ix0 + kx, tap = ky * kw + kx;
                            uint64_t *d = dst + (size_t)tap * wd;
                            if (iy < 0 || iy >= h || ix < 0 || ix >= wi) {
                                for (int j = 0; j < wd; j++) d[j] = 0;
                                inv |= 1ULL << tap;
                            } else {
                                const uint64_t *src = x + (((b * h + iy) * wi) + ix) * wd;
                                for (int j = 0; j < wd; j++) d[j] = src[j];
                                nv++;
                            }
                        }
                    }
                    invalid[i] = inv;
                    nvalid[i] = nv;
                }
            }
            if (++ox == ow) { ox = 0; if (++oy == oh) { oy = 0; b++; } }
        }
        for (int i = np; i < PT; i++) rows[i] = rows[0];
        int32_t *acc = s->acc;
        switch (level) {
#ifdef S2D_X86
        case 3: gemm_avx512(rows, wts, lp, cout, acc); break;
        case 2:
            if (lp >= S2D_HYB_MIN) S2D_GEMM2(rows, wts, lp, cout, acc);
            else S2D_GEMM_SMALL(rows, wts, lp, cout, acc);
            break;
        case 1: S2D_GEMM_SMALL(rows, wts, lp, cout, acc); break;
#endif
        default: gemm_portable(rows, wts, lp, cout, acc); break;
        }
#ifdef S2D_X86
        if (level >= 2 && !a->dot_out && (a->res_c == a->cout || a->res_c % 8 == 0)) {
            for (int i = 0; i < np; i++) {
                int32_t *ac = acc + (size_t)i * cout;
                for (uint64_t inv = invalid[i]; inv; inv &= inv - 1) {
                    const int32_t *restrict wp =
                        a->wpc + (size_t)__builtin_ctzll(inv) * a->cout + c0;
                    for (int co = 0; co < cout; co++) ac[co] -= wp[co];
                }
                epilogue_avx2(a, ac, nvalid[i] * a->cin, p0 + i, c0, c1);
            }
            continue;
        }
#endif
        for (int i = 0; i < np; i++)
            epilogue_px(a, acc + (size_t)i * cout, nvalid[i] * a->cin, invalid[i], p0 + i,
                        s->vals, level);
    }
}

static void bconv_tiles_portable(const s2d_bconv_args *a, int64_t t0, int64_t t1, int c0, int c1,
                                 scratch_t *s) {
    bconv_tiles(a, t0, t1, c0, c1, s, 0);
}
#ifdef S2D_X86
__attribute__((target("popcnt")))
static void bconv_tiles_popcnt(const s2d_bconv_args *a, int64_t t0, int64_t t1, int c0, int c1,
                               scratch_t *s) {
    bconv_tiles(a, t0, t1, c0, c1, s, 1);
}
__attribute__((target("avx2,popcnt")))
static void bconv_tiles_avx2(const s2d_bconv_args *a, int64_t t0, int64_t t1, int c0, int c1,
                             scratch_t *s) {
    bconv_tiles(a, t0, t1, c0, c1, s, 2);
}
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx2,popcnt")))
static void bconv_tiles_avx512(const s2d_bconv_args *a, int64_t t0, int64_t t1, int c0, int c1,
                               scratch_t *s) {
    bconv_tiles(a, t0, t1, c0, c1, s, 3);
}
#endif

typedef void (*tiles_fn)(const s2d_bconv_args *, int64_t, int64_t, int, int, scratch_t *);

static tiles_fn pick_tiles(int level) {
#ifdef S2D_X86
    if (level == 3) return bconv_tiles_avx512;
    if (level == 2) return bconv_tiles_avx2;
    if (level == 1) return bconv_tiles_popcnt;
#endif
    return bconv_tiles_portable;
}

/* How one convolution is split over threads (see s2d_bconv). */
typedef struct {
    tiles_fn run;
    int64_t ntiles;
    int nth, csplit;
} plan_t;

static int bconv_plan(const s2d_bconv_args *a, plan_t *pl) {
    const int taps = a->kh * a->kw, lp = a->lp, level = eff_isa(a->isa);
    if (taps > 64 || lp % s2d_lp_align(level)) return -1;
    if (a->tap2 ? (a->wd != 1 || a->cin > 32 || lp < (taps + 1) / 2) : lp < taps * a->wd)
        return -1;
    if (a->out_pool && a->out && (a->oh % 2 || a->ow % 2 || (2 * a->ow) % PT)) return -1;
    const int64_t total = (int64_t)a->n * a->oh * a->ow;
    const int64_t ntiles = (total + PT - 1) / PT;
    pl->run = pick_tiles(level);
    pl->ntiles = ntiles;
    /* One thread where the work is too small to pay for waking another. */
    const double work = (double)total * a->cout * (lp + 8);
    int nth = a->nthreads < 1 ? 1 : a->nthreads;
    if (nth > ntiles) nth = (int)ntiles;
    if (work < 65536.0) nth = 1;
    pl->nth = nth;
    /* Few pixel tiles (batch 1, 14x14 and 7x7 maps): split the output channels over the threads
     * instead, in blocks of 64 (whole bit words), so that every thread does the same work and
     * reads only its part of the weights. Only where the AVX2 epilogue runs (it takes a
     * channel range). */
    pl->csplit = nth > 1 && level >= 2 && !a->dot_out && a->cout >= 64 * nth &&
                 (a->res_c == a->cout || a->res_c % 8 == 0) &&
                 ntiles < (int64_t)S2D_CSPLIT_TILES * nth;
    return 0;
}

static int scratch_alloc(scratch_t *s, int lp, int cout) {
    s->patch = aligned_alloc(64, sizeof(uint64_t) * PT * (size_t)(lp + 8));
    s->acc = aligned_alloc(64, sizeof(int32_t) * PT * (size_t)(cout + 16));
    s->vals = aligned_alloc(64, sizeof(float) * (size_t)(cout + 16));
    return s->patch && s->acc && s->vals;
}

static void scratch_free(scratch_t *s) { free(s->patch); free(s->acc); free(s->vals); }

/* Thread tid's share (of nt) of one convolution. */
static void bconv_part(const s2d_bconv_args *a, const plan_t *pl, int tid, int nt, scratch_t *s) {
    /* words past the taps stay zero (the weights are zero there too) */
    memset(s->patch, 0, sizeof(uint64_t) * PT * (size_t)a->lp);
    if (pl->csplit) {
        const int nb = a->cout / 64;
        const int c0 = nb * tid / nt * 64, c1 = tid + 1 == nt ? a->cout : nb * (tid + 1) / nt * 64;
        if (c1 > c0) pl->run(a, 0, pl->ntiles, c0, c1, s);
    } else if (a->out_pool && a->out && nt > 1) {
        /* whole pairs of output rows per thread (2 ow is a multiple of PT: see bconv_plan) */
        const int64_t pairs = (int64_t)a->n * (a->oh / 2), tpp = 2 * (int64_t)a->ow / PT;
        int64_t t0 = pairs * tid / nt * tpp, t1 = pairs * (tid + 1) / nt * tpp;
        if (t1 > pl->ntiles) t1 = pl->ntiles;
        if (t1 > t0) pl->run(a, t0, t1, 0, a->cout, s);
    } else {
        int64_t t0 = pl->ntiles * tid / nt, t1 = pl->ntiles * (tid + 1) / nt;
        if (t1 > t0) pl->run(a, t0, t1, 0, a->cout, s);
    }
}

/* This thread's index in the running team and the team's size (0 of 1 without OpenMP). */
static inline void team_slot(int *tid, int *nt) {
#ifdef _OPENMP
    *tid = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *tid = 0;
    *nt = 1;
#endif
}

int s2d_bconv(const s2d_bconv_args *a) {
    plan_t pl;
    if (bconv_plan(a, &pl)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(pl.nth) if (pl.nth > 1)
    {
        int tid, nt;
        team_slot(&tid, &nt);
        scratch_t s;
        if (!scratch_alloc(&s, a->lp, a->cout)) {
#pragma omp atomic write
            failed = 1;
        } else {
            bconv_part(a, &pl, tid, nt, &s);
        }
        scratch_free(&s);
    }
    return failed ? -2 : 0;
}

/* Prefetch the weights thread tid of nt will read first in convolution a (its channel block
 * where the channels are split, else the start of the whole matrix), while the other threads
 * finish the layer before. S2D_CHAIN_PREFETCH caps the bytes per thread (0: off). */
#ifndef S2D_CHAIN_PREFETCH
#define S2D_CHAIN_PREFETCH 0
#endif
static void prefetch_weights(const s2d_bconv_args *a, const plan_t *pl, int tid, int nt) {
#if S2D_CHAIN_PREFETCH
    size_t c0 = 0, c1 = (size_t)a->cout;
    if (pl->csplit) {
        const int nb = a->cout / 64;
        c0 = (size_t)(nb * tid / nt * 64);
        c1 = tid + 1 == nt ? (size_t)a->cout : (size_t)(nb * (tid + 1) / nt * 64);
    }
    const char *p = (const char *)(a->w + c0 * a->lp);
    size_t bytes = (c1 - c0) * a->lp * sizeof(uint64_t);
    if (bytes > S2D_CHAIN_PREFETCH) bytes = S2D_CHAIN_PREFETCH;
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
#else
    (void)a; (void)pl; (void)tid; (void)nt;
#endif
}

/* A chain of convolutions in one call and one thread team: as[k] may read what as[j < k]
 * wrote (each layer ends at a barrier). The same results as s2d_bconv on each in turn; saves
 * the per-layer call, thread wake-up and scratch allocation. */
int s2d_bconv_chain(const s2d_bconv_args *const *as, int n) {
    if (n <= 0) return 0;
    plan_t *pl = malloc(sizeof(plan_t) * (size_t)n);
    if (!pl) return -2;
    int team = 1, maxlp = 0, maxc = 0;
    for (int k = 0; k < n; k++) {
        if (bconv_plan(as[k], &pl[k])) { free(pl); return -1; }
        if (pl[k].nth > team) team = pl[k].nth;
        if (as[k]->lp > maxlp) maxlp = as[k]->lp;
        if (as[k]->cout > maxc) maxc = as[k]->cout;
    }
    int failed = 0;
#pragma omp parallel num_threads(team) if (team > 1)
    {
        int tid, nt;
        team_slot(&tid, &nt);
        scratch_t s;
        int ok = scratch_alloc(&s, maxlp, maxc);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            for (int k = 0; k < n; k++) {
                const int lt = pl[k].nth < nt ? pl[k].nth : nt;
                if (tid < lt) bconv_part(as[k], &pl[k], tid, lt, &s);
                if (k + 1 < n) {
                    const int ln = pl[k + 1].nth < nt ? pl[k + 1].nth : nt;
                    if (tid < ln) prefetch_weights(as[k + 1], &pl[k + 1], tid, ln);
#pragma omp barrier
                }
            }
        }
        scratch_free(&s);
    }
    free(pl);
    return failed ? -2 : 0;
}

/* Peak probe for the benchmark: the level's GEMM micro-kernel on L1-resident data (4 pixels x
 * 32 output channels x 64 words), `reps` times in each of `nthreads` threads. Returns a checksum
 * so the work cannot be optimised away; binary MACs done = nthreads * reps * 4 * 32 * 64 * 64. */
S2D_INLINE int64_t gemm_l1_reps(int64_t reps, int level) {
    uint64_t p[4 * 64] __attribute__((aligned(64)));
    uint64_t w[32 * 64] __attribute__((aligned(64)));
    int32_t acc[4 * 32];
    int64_t total = 0;
    uint64_t s = 0x9e3779b97f4a7c15ULL;
    for (int i = 0; i < 4 * 64; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; p[i] = s; }
    for (int i = 0; i < 32 * 64; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; w[i] = s; }
    const uint64_t *rows[PT] = {p, p + 64, p + 128, p + 192};
    for (int64_t r = 0; r < reps; r++) {
        switch (level) {
#ifdef S2D_X86
        case 3: gemm_avx512(rows, w, 64, 32, acc); break;
        case 2: /* what the level runs on rows of 64 words */
            if (64 >= S2D_HYB_MIN) S2D_GEMM2(rows, w, 64, 32, acc);
            else gemm_popcnt(rows, w, 64, 32, acc);
            break;
        case 1: gemm_popcnt(rows, w, 64, 32, acc); break;
#endif
        default: gemm_portable(rows, w, 64, 32, acc); break;
        }
        p[r & 255] ^= (uint64_t)acc[r & 127];
        total += acc[0];
    }
    return total;
}
static int64_t gemm_l1_portable(int64_t reps) { return gemm_l1_reps(reps, 0); }
#ifdef S2D_X86
__attribute__((target("popcnt"))) static int64_t gemm_l1_popcnt(int64_t reps) {
    return gemm_l1_reps(reps, 1);
}
__attribute__((target("avx2,popcnt"))) static int64_t gemm_l1_avx2(int64_t reps) {
    return gemm_l1_reps(reps, 2);
}
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq,avx2,popcnt")))
static int64_t gemm_l1_avx512(int64_t reps) { return gemm_l1_reps(reps, 3); }
#endif

int64_t s2d_gemm_l1(int isa, int64_t reps, int nthreads) {
    int64_t total = 0;
    const int level = eff_isa(isa);
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        switch (level) {
#ifdef S2D_X86
        case 3: total += gemm_l1_avx512(reps); break;
        case 2: total += gemm_l1_avx2(reps); break;
        case 1: total += gemm_l1_popcnt(reps); break;
#endif
        default: total += gemm_l1_portable(reps); break;
        }
    }
    return total;
}
