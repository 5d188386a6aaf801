/* s2bnn.deploy compiled kernels: bit-packing and XNOR/popcount binary convolutions.
 *
 * Plain C (no torch headers), built once into a shared library and called through ctypes on the
 * data pointers of contiguous tensors. Layouts (channels-last):
 *   float activations  [N, H, W, C]             float32
 *   bit activations    [N, H, W, WD]            uint64, WD = ceil(C / 64); bit c%64 of word c/64
 *                                                is 1 where the value is negative (sign -1); bits
 *                                                past C are 0
 *   binary weights     [Cout, LP]               uint64, row = KH*KW taps of WD words, zero padded
 *                                                to LP (a multiple of 8) words
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

#define S2D_ABI_VERSION 1
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
 * acc[i * cout + co] = sum_j popcount(p[i * lp + j] ^ w[co * lp + j]), i < PT, for all co. */
static void gemm_portable(const uint64_t *p, const uint64_t *w, int lp, int cout, int32_t *acc) {
    for (int co = 0; co < cout; co++) {
        const uint64_t *wr = w + (size_t)co * lp;
        int s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t wj = wr[j];
            s0 += popc_portable(p[j] ^ wj);
            s1 += popc_portable(p[lp + j] ^ wj);
            s2 += popc_portable(p[2 * lp + j] ^ wj);
            s3 += popc_portable(p[3 * lp + j] ^ wj);
        }
        acc[co] = s0; acc[cout + co] = s1; acc[2 * cout + co] = s2; acc[3 * cout + co] = s3;
    }
}

#ifdef S2D_X86
__attribute__((target("popcnt")))
static void gemm_popcnt(const uint64_t *p, const uint64_t *w, int lp, int cout, int32_t *acc) {
    int co = 0;
    for (; co + 1 < cout; co += 2) {
        const uint64_t *wa = w + (size_t)co * lp, *wb = wa + lp;
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        for (int j = 0; j < lp; j++) {
            uint64_t x0 = p[j], x1 = p[lp + j], x2 = p[2 * lp + j], x3 = p[3 * lp + j];
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
            s0 += __builtin_popcountll(p[j] ^ wj); s1 += __builtin_popcountll(p[lp + j] ^ wj);
            s2 += __builtin_popcountll(p[2 * lp + j] ^ wj);
            s3 += __builtin_popcountll(p[3 * lp + j] ^ wj);
        }
        acc[co] = (int32_t)s0; acc[cout + co] = (int32_t)s1;
        acc[2 * cout + co] = (int32_t)s2; acc[3 * cout + co] = (int32_t)s3;
    }
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

/* lp is a multiple of 4 words (one 256-bit chunk). Byte counters take at most 31 chunks
 * (8 per byte each) before they are widened with psadbw. */
__attribute__((target("avx2")))
static void gemm_avx2(const uint64_t *p, const uint64_t *w, int lp, int cout, int32_t *acc) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
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
                    _mm256_loadu_si256((const __m256i *)(p + 4 * c)), wv), lut, low));
                b1 = _mm256_add_epi8(b1, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p + lp + 4 * c)), wv), lut, low));
                b2 = _mm256_add_epi8(b2, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p + 2 * lp + 4 * c)), wv), lut, low));
                b3 = _mm256_add_epi8(b3, popc8_avx2(_mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(p + 3 * lp + 4 * c)), wv), lut, low));
            }
            t0 = _mm256_add_epi64(t0, _mm256_sad_epu8(b0, zero));
            t1 = _mm256_add_epi64(t1, _mm256_sad_epu8(b1, zero));
            t2 = _mm256_add_epi64(t2, _mm256_sad_epu8(b2, zero));
            t3 = _mm256_add_epi64(t3, _mm256_sad_epu8(b3, zero));
        }
        acc[co] = (int32_t)hsum4_avx2(t0); acc[cout + co] = (int32_t)hsum4_avx2(t1);
        acc[2 * cout + co] = (int32_t)hsum4_avx2(t2); acc[3 * cout + co] = (int32_t)hsum4_avx2(t3);
    }
}

/* lp is a multiple of 8 words: whole 512-bit chunks. Two output channels x four pixels. */
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
static void gemm_avx512(const uint64_t *p, const uint64_t *w, int lp, int cout, int32_t *acc) {
    int co = 0;
    for (; co + 1 < cout; co += 2) {
        const uint64_t *wa = w + (size_t)co * lp, *wb = wa + lp;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        __m512i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int j = 0; j < lp; j += 8) {
            __m512i u = _mm512_loadu_si512(wa + j), v = _mm512_loadu_si512(wb + j);
            __m512i x0 = _mm512_loadu_si512(p + j), x1 = _mm512_loadu_si512(p + lp + j);
            __m512i x2 = _mm512_loadu_si512(p + 2 * lp + j);
            __m512i x3 = _mm512_loadu_si512(p + 3 * lp + j);
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
                _mm512_xor_si512(_mm512_loadu_si512(p + j), u)));
            a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p + lp + j), u)));
            a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p + 2 * lp + j), u)));
            a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(
                _mm512_xor_si512(_mm512_loadu_si512(p + 3 * lp + j), u)));
        }
        acc[co] = (int32_t)_mm512_reduce_add_epi64(a0);
        acc[cout + co] = (int32_t)_mm512_reduce_add_epi64(a1);
        acc[2 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a2);
        acc[3 * cout + co] = (int32_t)_mm512_reduce_add_epi64(a3);
    }
}
#endif

typedef void (*gemm_fn)(const uint64_t *, const uint64_t *, int, int, int32_t *);

static gemm_fn pick_gemm(int isa) {
#ifdef S2D_X86
    int f = s2d_cpu_features();
    if (isa >= 3 && (f & 4)) return gemm_avx512;
    if (isa == 2 && (f & 2)) return gemm_avx2;
    if (isa >= 1 && (f & 1)) return gemm_popcnt;
#endif
    (void)isa;
    return gemm_portable;
}

/* Highest level this build and CPU can run (the value s2d_bconv accepts for `isa`). */
int s2d_max_isa(void) {
#ifdef S2D_X86
    int f = s2d_cpu_features();
    if (f & 4) return 3;
    if (f & 2) return 2;
    if (f & 1) return 1;
#endif
    return 0;
}

/* Weight rows must be padded to a multiple of this many words for level `isa`. */
int s2d_lp_align(int isa) {
    int f = s2d_cpu_features();
    if (isa >= 3 && (f & 4)) return 8;
    if (isa == 2 && (f & 2)) return 4;
    return 1;
}

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
    const int32_t *wpc;  /* [cout, kh*kw] popcount of each tap's weight words */
    int n, h, w_, wd, cin, cout, kh, kw, stride, pad, oh, ow, lp;
    const float *scale, *bias;       /* [cout]: y = dot * scale + bias */
    const float *res; int res_c;      /* optional residual [N, oh, ow, res_c], channel co % res_c */
    const float *si, *slope, *so;     /* optional RPReLU: prelu(y - si, slope) + so */
    float *out;                       /* optional float output [N, oh, ow, cout] */
    const float *thr;                 /* optional threshold of the bit output */
    uint64_t *out_bits;               /* optional bit output [N, oh, ow, ceil(cout/64)] */
    int32_t *dot_out;                 /* optional raw integer dot products [N, oh, ow, cout] */
    int isa, nthreads;
} s2d_bconv_args;

int s2d_bconv(const s2d_bconv_args *a) {
    const int taps = a->kh * a->kw, lp = a->lp, cout = a->cout, owd = (cout + 63) / 64;
    if (taps > 64 || lp < taps * a->wd || lp % s2d_lp_align(a->isa)) return -1;
    const int64_t total = (int64_t)a->n * a->oh * a->ow;
    const int64_t ntiles = (total + PT - 1) / PT;
    gemm_fn gemm = pick_gemm(a->isa);
    pack_fn pack = pick_pack(a->isa);
    int failed = 0;
#pragma omp parallel num_threads(a->nthreads)
    {
        uint64_t *patch = aligned_alloc(64, sizeof(uint64_t) * PT * (size_t)lp);
        int32_t *acc = malloc(sizeof(int32_t) * PT * (size_t)cout);
        float *vals = malloc(sizeof(float) * (size_t)cout);
        if (!patch || !acc || !vals) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(patch, 0, sizeof(uint64_t) * PT * (size_t)lp);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ntiles; t++) {
                int64_t p0 = t * PT;
                int np = total - p0 < PT ? (int)(total - p0) : PT;
                uint64_t invalid[PT] = {0};
                int nvalid[PT] = {0};
                for (int i = 0; i < PT; i++) {
                    uint64_t *dst = patch + (size_t)i * lp;
                    if (i >= np) { memset(dst, 0, sizeof(uint64_t) * taps * a->wd); continue; }
                    int64_t pix = p0 + i;
                    int ox = (int)(pix % a->ow), oy = (int)((pix / a->ow) % a->oh);
                    int64_t b = pix / ((int64_t)a->ow * a->oh);
                    for (int ky = 0; ky < a->kh; ky++) {
                        int iy = oy * a->stride - a->pad + ky;
                        for (int kx = 0; kx < a->kw; kx++) {
                            int ix = ox * a->stride - a->pad + kx, tap = ky * a->kw + kx;
                            uint64_t *d = dst + (size_t)tap * a->wd;
                            if (iy < 0 || iy >= a->h || ix < 0 || ix >= a->w_) {
                                memset(d, 0, sizeof(uint64_t) * a->wd);
                                invalid[i] |= 1ULL << tap;
                            } else {
                                memcpy(d, a->x + (((b * a->h + iy) * a->w_) + ix) * a->wd,
                                       sizeof(uint64_t) * a->wd);
                                nvalid[i]++;
                            }
                        }
                    }
                }
                gemm(patch, a->w, lp, cout, acc);
                for (int i = 0; i < np; i++) {
                    int64_t pix = p0 + i;
                    int32_t *ac = acc + (size_t)i * cout;
                    const int nb = nvalid[i] * a->cin;
                    if (invalid[i]) { /* take back popcount(0 XOR w) of the padded taps */
                        for (int co = 0; co < cout; co++) {
                            const int32_t *wp = a->wpc + (size_t)co * taps;
                            int32_t c = 0;
                            for (int tap = 0; tap < taps; tap++)
                                if (invalid[i] >> tap & 1) c += wp[tap];
                            ac[co] -= c;
                        }
                    }
                    if (a->dot_out)
                        for (int co = 0; co < cout; co++) a->dot_out[pix * cout + co] = nb - 2 * ac[co];
                    float *v = a->out ? a->out + pix * cout : vals;
                    for (int co = 0; co < cout; co++) {
                        float d = (float)(nb - 2 * ac[co]) * a->scale[co];
                        v[co] = d + a->bias[co];
                    }
                    if (a->res) {
                        const float *r = a->res + pix * a->res_c;
                        for (int r0 = 0; r0 < cout; r0 += a->res_c)
                            for (int c = 0; c < a->res_c; c++) v[r0 + c] = v[r0 + c] + r[c];
                    }
                    if (a->slope) {
                        for (int co = 0; co < cout; co++) {
                            float u = v[co] - a->si[co];
                            v[co] = (u > 0.0f ? u : u * a->slope[co]) + a->so[co];
                        }
                    }
                    if (a->out_bits) pack(v, a->thr, cout, owd, a->out_bits + pix * owd);
                }
            }
        }
        free(patch); free(acc); free(vals);
    }
    return failed ? -2 : 0;
}

/* Peak probe for the benchmark: the level's GEMM micro-kernel on L1-resident data (4 pixels x
 * 32 output channels x 64 words), `reps` times in each of `nthreads` threads. Returns a checksum
 * so the work cannot be optimised away; binary MACs done = nthreads * reps * 4 * 32 * 64 * 64. */
int64_t s2d_gemm_l1(int isa, int64_t reps, int nthreads) {
    int64_t total = 0;
    gemm_fn gemm = pick_gemm(isa);
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        uint64_t p[4 * 64] __attribute__((aligned(64)));
        uint64_t w[32 * 64] __attribute__((aligned(64)));
        int32_t acc[4 * 32];
        uint64_t s = 0x9e3779b97f4a7c15ULL;
        for (int i = 0; i < 4 * 64; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; p[i] = s; }
        for (int i = 0; i < 32 * 64; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; w[i] = s; }
        for (int64_t r = 0; r < reps; r++) {
            gemm(p, w, 64, 32, acc);
            p[r & 255] ^= (uint64_t)acc[r & 127];
            total += acc[0];
        }
    }
    return total;
}
