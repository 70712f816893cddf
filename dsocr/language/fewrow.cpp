// Few-row fp32 products for CPU decode: y[r, o] = sum_k x[r, k] * W[o, k], 1 <= R <= 8 rows.
//
// At decode a weight sees one to eight rows, so the product is bound by streaming W from memory.
// MKL's and oneDNN's kernels stream it at 6-20 GB/s of a 32 GB/s machine for these shapes
// (docs/benchmarks/expert_gemv.md); this one reads each W row once, for all R rows of x, with
// NO rows of W in flight per block and the next block prefetched, its output range split over
// OpenMP threads (below). Built by dsocr/language/fewrow.py with the
// host's compiler (-O3 -march=native); GCC/Clang vector extensions, no intrinsics, so it builds
// on any target (AVX-512 gets 16-lane vectors, anything else 8).
#include <cstring>

#if defined(__AVX512F__)
#define VL 16
#define NO(wide, narrow) wide
typedef float vec __attribute__((vector_size(64)));
typedef float half_vec __attribute__((vector_size(32)));
#else
#define VL 8
#define NO(wide, narrow) narrow
typedef float vec __attribute__((vector_size(32)));
#endif
typedef float v4 __attribute__((vector_size(16)));

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));  // unaligned load
  return v;
}

static inline float hsum(vec v) {
#if VL == 16
  half_vec a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  vec a = v;
#endif
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// R rows of x (row stride K), NO outputs per block.
template <int R, int NO>
static void gemm(const float* __restrict x, long K, const float* __restrict W, long o0, long o1,
                 float* __restrict y, long ldy) {
  long o = o0;
  for (; o + NO <= o1; o += NO) {
    vec acc[NO][R];
    for (int j = 0; j < NO; j++)
      for (int r = 0; r < R; r++) acc[j][r] = vec{};
    const float* w = W + o * K;
    long k = 0;
    for (; k + VL <= K; k += VL) {
      vec wv[NO];
      for (int j = 0; j < NO; j++) wv[j] = load(w + j * K + k);
      for (int j = 0; j < NO; j++) __builtin_prefetch(w + (NO + j) * K + k + 64);
      for (int r = 0; r < R; r++) {
        vec xv = load(x + r * K + k);
        asm("" : "+v"(xv));  // keep x in a register: a folded load would read it NO times
        for (int j = 0; j < NO; j++) acc[j][r] += wv[j] * xv;
      }
    }
    for (int j = 0; j < NO; j++)
      for (int r = 0; r < R; r++) {
        float s = hsum(acc[j][r]);
        for (long t = k; t < K; t++) s += x[r * K + t] * w[j * K + t];
        y[r * ldy + o + j] = s;
      }
  }
  for (; o < o1; o++) {  // the last o1 - o0 mod NO outputs
    const float* w = W + o * K;
    for (int r = 0; r < R; r++) {
      float s = 0.f;
      for (long t = 0; t < K; t++) s += x[r * K + t] * w[t];
      y[r * ldy + o] = s;
    }
  }
}

static int fewrow(const float* x, long R, long K, const float* W, long o0, long o1, float* y,
                  long ldy) {
  switch (R) {  // NO per R: R * NO accumulators + NO + 1 in the 32 (AVX-512) or 16 registers
    case 1: gemm<1, NO(8, 4)>(x, K, W, o0, o1, y, ldy); return 0;
    case 2: gemm<2, NO(8, 4)>(x, K, W, o0, o1, y, ldy); return 0;
    case 3: gemm<3, NO(6, 3)>(x, K, W, o0, o1, y, ldy); return 0;
    case 4: gemm<4, NO(4, 2)>(x, K, W, o0, o1, y, ldy); return 0;
    case 5: gemm<5, NO(4, 2)>(x, K, W, o0, o1, y, ldy); return 0;
    case 6: gemm<6, NO(4, 2)>(x, K, W, o0, o1, y, ldy); return 0;
    case 7: gemm<7, NO(3, 1)>(x, K, W, o0, o1, y, ldy); return 0;
    case 8: gemm<8, NO(3, 1)>(x, K, W, o0, o1, y, ldy); return 0;
  }
  return -1;
}

// Threads: an OpenMP parallel loop over parts of the output range. Built with -fopenmp the
// library needs libgomp.so.1, which torch has already loaded, so the parts run on torch's own
// intra-op threads: nothing competes with them for the cores, and their hand-off takes
// microseconds (a Python thread pool's costs ~300 us here; a second pool of spinning threads
// starves torch's). Without OpenMP the pragma is ignored and all parts run on the caller.
namespace {
constexpr long ALIGN = 24;  // a multiple of every block width NO, so parts split no block
}

// x (R, K) and W (O, K) row-major and contiguous; writes y[r * ldy + o] for o in [o0, o1), on
// up to `threads` threads. Returns 0, or -1 when R is out of range (nothing written).
extern "C" int dsocr_fewrow(const float* x, long R, long K, const float* W, long o0, long o1,
                            float* y, long ldy, int threads) {
  if (R < 1 || R > 8) return -1;
  long span = o1 - o0;
  if (threads < 2 || span < 2 * ALIGN) return fewrow(x, R, K, W, o0, o1, y, ldy);
  long chunk = ((span + threads - 1) / threads + ALIGN - 1) / ALIGN * ALIGN;
  int parts = (int)((span + chunk - 1) / chunk);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int i = 0; i < parts; i++) {
    long a = o0 + i * chunk, b = a + chunk < o1 ? a + chunk : o1;
    fewrow(x, R, K, W, a, b, y, ldy);
  }
  return 0;
}

extern "C" int dsocr_fewrow_threaded() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Single-query attention for decode: for each of B*H (row, head) pairs, softmax(q . K[s] * scale)
// over the first lengths[row] keys, times V. q, out (B, H, D); K, V (B, H, Smax, D), all
// contiguous fp32. One pass over K, one over V, each (row, head) on one OpenMP thread; torch's
// sdpa streams the cache at about 11 GB/s here. Returns 0, or -1 for a head size it does not take
// (D a multiple of the vector width, at most 256).
extern "C" int dsocr_decode_attention(const float* q, const float* K, const float* V,
                                      const long* lengths, long B, long H, long D, long Smax,
                                      float scale, float* out, int threads) {
  constexpr long MAXV = 256 / VL;
  if (D % VL || D > 256) return -1;
  const long nv = D / VL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long bh = 0; bh < B * H; bh++) {
    const long L = lengths[bh / H];
    const float* qv = q + bh * D;
    const float* Kb = K + bh * Smax * D;
    const float* Vb = V + bh * Smax * D;
    float* o = out + bh * D;
    if (L <= 0) {
      for (long d = 0; d < D; d++) o[d] = 0.f;
      continue;
    }
    float* p = new float[L];
    vec qs[MAXV];
    for (long j = 0; j < nv; j++) qs[j] = load(qv + j * VL);
    float m = -__builtin_inff();
    for (long s = 0; s < L; s++) {
      const float* k = Kb + s * D;
      vec acc = qs[0] * load(k);
      for (long j = 1; j < nv; j++) acc += qs[j] * load(k + j * VL);
      p[s] = hsum(acc) * scale;
      m = p[s] > m ? p[s] : m;
    }
    float sum = 0.f;
    for (long s = 0; s < L; s++) {
      p[s] = __builtin_expf(p[s] - m);
      sum += p[s];
    }
    vec acc[MAXV];
    for (long j = 0; j < nv; j++) acc[j] = vec{};
    for (long s = 0; s < L; s++) {
      const float* v = Vb + s * D;
      const float w = p[s];
      for (long j = 0; j < nv; j++) acc[j] += w * load(v + j * VL);
    }
    const float inv = 1.f / sum;
    for (long j = 0; j < nv; j++) {
      vec r = acc[j] * inv;
      std::memcpy(o + j * VL, &r, sizeof(vec));
    }
    delete[] p;
  }
  return 0;
}
