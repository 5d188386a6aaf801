/* s2bnn.nn training kernels: ReActNet's RSign and RPReLU, forward and backward, one pass each.
 *
 * Plain C (no torch headers), built once into a shared library and called through ctypes on the
 * data pointers of contiguous tensors (s2bnn/nn/_kernels.py). Why: on CPU under bf16 autocast
 * these element-wise layers meet a bf16 activation and float32 per-channel parameters, and
 * PyTorch's mixed-dtype element-wise path then costs several passes per layer
 * (benchmarks/bench_kernels.py). Here every element is read once, computed in float32 and
 * written once, whatever the dtypes, and the per-channel parameter gradients are reduced in the
 * same pass.
 *
 * Layout: element i of a tensor belongs to channel (i / inner) % C, for outer * C * inner
 * elements: channels-last [N, H, W, C] is (outer = N*H*W, inner = 1), NCHW is (N, H*W), and
 * [N, C] is (N, 1). Dtype codes: 0 float32, 1 bfloat16 (round to nearest even, NaN kept quiet).
 *
 * Work goes in runs: a channels-last run is R whole rows (R * C elements, R = ceil(RUN / C))
 * against the per-channel vectors tiled R times, so the vector loop is long whatever C is (a
 * loop over one row of C = 24 bf16 values is shorter than one AVX-512 vector and ran scalar, 10x
 * slower). An NCHW tensor is tiled the same way by whole samples (period C * H * W) up to
 * TILE_MAX elements a sample, else walked plane by plane (RUN elements at a time). Each run is
 * converted into float32 buffers that stay in L1, computed there, and converted back. Gradient
 * sums are float32 per tile slot over at most FLUSH_RUNS runs, then float64 per channel.
 *
 * Threads: OpenMP, on PyTorch's own runtime (torch ships libgomp.so.1, which this library's
 * libgomp.so.1 dependency resolves to once torch is loaded), as many as omp_get_max_threads()
 * (torch.set_num_threads) for tensors of at least PAR_MIN elements. Each thread takes a fixed,
 * contiguous share of the runs and keeps its own sums, added in thread order: for a given thread
 * count the results do not depend on timing.
 *
 * Run-time dispatch: on x86-64 with GCC the per-thread worker is compiled for x86-64-v4
 * (AVX-512), AVX2 and baseline x86-64 (target_clones) and the best one this CPU runs is picked
 * at load time. Every version computes the same values (no FMA contraction: -ffp-contract=off).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define S2T_ABI_VERSION 2
#define RUN 512
#define FLUSH_RUNS 64    /* runs summed in float32 (at most 64 values a slot) before a flush */
#define PAR_MIN (1 << 16) /* smaller tensors run on one thread */
#define TILE_MAX 8192     /* NCHW jobs with C * H * W up to this are tiled like channels-last */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(S2T_NO_CLONES)
#define S2T_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define S2T_CLONES
#endif
#define S2T_INLINE static inline __attribute__((always_inline))

int s2t_abi_version(void) { return S2T_ABI_VERSION; }

/* ------------------------------------------------------------------------- dtype conversion */

S2T_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

S2T_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

S2T_INLINE void to_f32(const void *restrict p, int dt, int64_t off, float *restrict buf,
                       int64_t n) {
    if (dt) {
        const uint16_t *restrict s = (const uint16_t *)p + off;
        for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_f32(s[j]);
    } else {
        memcpy(buf, (const float *)p + off, (size_t)n * sizeof(float));
    }
}

S2T_INLINE void from_f32(void *restrict p, int dt, int64_t off, const float *restrict buf,
                         int64_t n) {
    if (dt) {
        uint16_t *restrict d = (uint16_t *)p + off;
        for (int64_t j = 0; j < n; j++) d[j] = f32_to_bf16(buf[j]);
    } else {
        memcpy((float *)p + off, buf, (size_t)n * sizeof(float));
    }
}

/* ------------------------------------------------------------------------------ the four ops
 * Each works in float32 on one run of n elements: `a` is the input (x forward, the incoming
 * gradient backward) and is overwritten with the output (y, or the gradient of x); `b` is x in
 * the backward; p0..p2 are the per-channel parameters tiled over the run; s0..s2 the gradient
 * sums of the parameters, slot by slot. The pointers are parameters so that `restrict` reaches
 * the vectoriser (as locals carved from one allocation they left the loops scalar).
 *
 * RSign:  y = +1 where x + beta >= 0 (also for -0.0), else -1.
 *         ReActNet's polynomial STE at v = x + beta: gx = g * max(0, 2 - 2|v|); g_beta = sum gx.
 * RPReLU: t = x - shift_in;  y = (t > 0 ? t : slope * t) + shift_out.
 *         gx = g where t > 0, else slope * g;  g_shift_in = -sum gx;
 *         g_slope = sum over t <= 0 of g * t;  g_shift_out = sum g. */

enum { RSIGN_FWD = 0, RSIGN_BWD = 1, RPRELU_FWD = 2, RPRELU_BWD = 3 };
static const int N_PARAMS[4] = {1, 1, 3, 2};
static const int N_SUMS[4] = {0, 1, 0, 3};

S2T_INLINE void rsign_fwd_run(const float *restrict beta, float *restrict a, int64_t n) {
    for (int64_t j = 0; j < n; j++) a[j] = (a[j] + beta[j]) < 0.0f ? -1.0f : 1.0f;
}

S2T_INLINE void rsign_bwd_run(const float *restrict beta, float *restrict a,
                              const float *restrict b, float *restrict s0, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float v = b[j] + beta[j];
        float m = 2.0f - 2.0f * (v < 0.0f ? -v : v);
        float d = a[j] * (m > 0.0f ? m : 0.0f);
        a[j] = d;
        s0[j] += d;
    }
}

S2T_INLINE void rprelu_fwd_run(const float *restrict si, const float *restrict slope,
                               const float *restrict so, float *restrict a, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float t = a[j] - si[j];
        a[j] = (t > 0.0f ? t : slope[j] * t) + so[j];
    }
}

S2T_INLINE void rprelu_bwd_run(const float *restrict si, const float *restrict slope,
                               float *restrict a, const float *restrict b, float *restrict s0,
                               float *restrict s1, float *restrict s2, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float d = a[j], t = b[j] - si[j];
        int pos = t > 0.0f;
        float dx = pos ? d : slope[j] * d;
        a[j] = dx;
        s0[j] -= dx;
        s1[j] += pos ? 0.0f : d * t;
        s2[j] += d;
    }
}

/* ------------------------------------------------------------------------------ the driver */

typedef struct {
    int op;
    const void *a;        /* x (forward) or the incoming gradient (backward) */
    const void *b;        /* x (backward) */
    void *out;            /* y (forward) or the gradient of x (backward) */
    int adt, bdt, odt;
    int64_t outer, inner;
    int C;
    const float *param[3];
} Job;

/* Scratch of one thread: tiled parameters, slot sums and two run buffers, `len` floats each. */
typedef struct {
    int64_t len; /* floats per buffer: whole periods (tiled) or min(inner, RUN) (planes) */
    float *mem;
    float *p[3], *s[3], *a, *b;
} Scratch;

static int scratch_init(Scratch *w, int64_t len) {
    w->len = len;
    w->mem = calloc((size_t)8 * len, sizeof(float));
    if (!w->mem) return 0;
    for (int k = 0; k < 3; k++) {
        w->p[k] = w->mem + k * len;
        w->s[k] = w->mem + (3 + k) * len;
    }
    w->a = w->mem + 6 * len;
    w->b = w->mem + 7 * len;
    return 1;
}

S2T_INLINE void op_run(const Job *J, Scratch *w, int64_t off, int64_t n) {
    to_f32(J->a, J->adt, off, w->a, n);
    if (J->op == RSIGN_BWD || J->op == RPRELU_BWD) to_f32(J->b, J->bdt, off, w->b, n);
    switch (J->op) {
    case RSIGN_FWD: rsign_fwd_run(w->p[0], w->a, n); break;
    case RSIGN_BWD: rsign_bwd_run(w->p[0], w->a, w->b, w->s[0], n); break;
    case RPRELU_FWD: rprelu_fwd_run(w->p[0], w->p[1], w->p[2], w->a, n); break;
    default: rprelu_bwd_run(w->p[0], w->p[1], w->a, w->b, w->s[0], w->s[1], w->s[2], n); break;
    }
    from_f32(J->out, J->odt, off, w->a, n);
}

/* The period of a tiled job: the elements after which the channel pattern repeats (C * inner),
 * or 0 for a job walked plane by plane (NCHW maps whose planes are large enough to be runs). */
static int64_t tiled_period(const Job *J) {
    int64_t p = (int64_t)J->C * J->inner;
    return (J->inner == 1 || p <= TILE_MAX) ? p : 0;
}

/* The runs [begin, end) of a tiled job, or the planes [begin, end) of a plane-wise one; sums
 * into tot[k * C + c]. Returns 0, or -1 if its scratch could not be allocated. */
S2T_CLONES static int work(const Job *J, int64_t begin, int64_t end, double *tot) {
    const int C = J->C, np = N_PARAMS[J->op], ns = N_SUMS[J->op];
    const int64_t period = tiled_period(J), inner = J->inner;
    Scratch w;
    if (period) {
        const int64_t reps = (RUN + period - 1) / period, len = reps * period;
        const int64_t total = J->outer * period;
        if (!scratch_init(&w, len)) return -1;
        for (int k = 0; k < np; k++)
            for (int64_t j = 0; j < len; j++) w.p[k][j] = J->param[k][(j / inner) % C];
        for (int64_t run = begin; run < end; run++) {
            int64_t off = run * len, n = total - off < len ? total - off : len;
            op_run(J, &w, off, n);
            if (ns && ((run - begin + 1) % FLUSH_RUNS == 0 || run + 1 == end)) {
                for (int k = 0; k < ns; k++) {
                    for (int64_t j = 0; j < len; j++) tot[k * C + (j / inner) % C] += w.s[k][j];
                    memset(w.s[k], 0, (size_t)len * sizeof(float));
                }
            }
        }
    } else {
        /* min(inner, RUN) slots: a tiny map of very many channels sets up no more than it
         * computes. */
        const int64_t span = inner < RUN ? inner : RUN;
        if (!scratch_init(&w, span)) return -1;
        for (int64_t plane = begin; plane < end; plane++) {
            int c = (int)(plane % C);
            for (int k = 0; k < np; k++)
                for (int64_t j = 0; j < span; j++) w.p[k][j] = J->param[k][c];
            for (int64_t q = 0; q < inner; q += span) {
                int64_t n = inner - q < span ? inner - q : span;
                op_run(J, &w, plane * inner + q, n);
            }
            for (int k = 0; k < ns; k++) {
                double acc = 0.0;
                for (int64_t j = 0; j < span; j++) acc += w.s[k][j];
                tot[k * C + c] += acc;
                memset(w.s[k], 0, (size_t)span * sizeof(float));
            }
        }
    }
    free(w.mem);
    return 0;
}

static int run_job(const Job *J, float *const *sums) {
    const int C = J->C, ns = N_SUMS[J->op];
    const int64_t total = J->outer * C * J->inner, period = tiled_period(J);
    int64_t units;
    if (period) {
        int64_t len = (RUN + period - 1) / period * period;
        units = (total + len - 1) / len;
    } else {
        units = J->outer * C;
    }
    int nt = 1;
#ifdef _OPENMP
    if (total >= PAR_MIN) nt = omp_get_max_threads();
#endif
    if (nt > units) nt = (int)units;
    if (nt < 1) nt = 1;
    double *tot = calloc((size_t)nt * (ns ? ns : 1) * C, sizeof(double));
    if (!tot) return -1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(| : failed)
#endif
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        failed |= work(J, units * t / nt, units * (t + 1) / nt, tot + (int64_t)t * ns * C) != 0;
    }
    if (!failed) {
        for (int k = 0; k < ns; k++)
            for (int c = 0; c < C; c++) {
                double v = 0.0;
                for (int t = 0; t < nt; t++) v += tot[((int64_t)t * ns + k) * C + c];
                sums[k][c] = (float)v;
            }
    }
    free(tot);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------ exported entries
 * Return 0, or -1 when memory for the scratch buffers could not be allocated. The backward
 * entries take the incoming gradient in x's dtype and write the gradient of x in it. */

int s2t_rsign_fwd(const void *x, int xdt, void *y, int ydt, int64_t outer, int C, int64_t inner,
                  const float *beta) {
    Job J = {RSIGN_FWD, x, NULL, y, xdt, 0, ydt, outer, inner, C, {beta, NULL, NULL}};
    return run_job(&J, NULL);
}

int s2t_rsign_bwd(const void *g, const void *x, void *gx, int dt, int64_t outer, int C,
                  int64_t inner, const float *beta, float *g_beta) {
    Job J = {RSIGN_BWD, g, x, gx, dt, dt, dt, outer, inner, C, {beta, NULL, NULL}};
    float *sums[1] = {g_beta};
    return run_job(&J, sums);
}

int s2t_rprelu_fwd(const void *x, int xdt, void *y, int ydt, int64_t outer, int C,
                   int64_t inner, const float *si, const float *slope, const float *so) {
    Job J = {RPRELU_FWD, x, NULL, y, xdt, 0, ydt, outer, inner, C, {si, slope, so}};
    return run_job(&J, NULL);
}

int s2t_rprelu_bwd(const void *g, const void *x, void *gx, int dt, int64_t outer, int C,
                   int64_t inner, const float *si, const float *slope, float *g_si,
                   float *g_slope, float *g_so) {
    Job J = {RPRELU_BWD, g, x, gx, dt, dt, dt, outer, inner, C, {si, slope, NULL}};
    float *sums[3] = {g_si, g_slope, g_so};
    return run_job(&J, sums);
}
