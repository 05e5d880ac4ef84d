/* Depth-wise K×K convolution ('same' zero padding, stride 1) over channels-last fp32 tensors, with the
   ΔConvBlock's gate optionally fused into its epilogue. Compiled at first use by
   deltadistill/cpu_kernel.py (gcc/clang, -O3 -march=native) and called through ctypes.

   Layout: X [B, H, W, C] contiguous, Wt [C, K, K] (the module's own weight; each channel block copies its
   taps into a tap-major [K·K][VL] buffer first), bias [C] or NULL. Work is split over channel blocks of VL lanes and over output rows, so that the
   caller can hand each thread a part. Per channel block the input is first packed into a zero-padded
   plane [rows + K - 1 + RB - 1][W + K - 1 + TW - 1][VL]: contiguous, so that the K×K taps read
   neighbouring cache lines instead of lines one row (a multiple of 4 KiB for the usual grids) apart,
   which all fall in the same L1 set; and padded, so that no tap needs a bounds check. Each tile keeps
   RB×TW output vectors in registers; with RB > 1 each input vector loaded serves the RB output rows over it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)  /* 32 vector registers: tiles of one row × 8 columns (16 columns spill a register
                              when the compiler keeps the input window in registers: 6-12% slower at K = 9) */
#define VL 16
#define TW 8
#define RB 1
#else  /* 16 vector registers (AVX2) or fewer: tiles of 2 rows × 4 columns */
#define VL 8
#define TW 4
#define RB 2
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4), may_alias));

/* exp(x), vectorisable: x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 Taylor series in r (relative error
   ~1e-7), 2^n written into the exponent bits; x clamped to [-87, 88] (σ is 0 or 1 to fp32 precision there). */
static inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float t = x * 1.44269504f + 12582912.0f;
  float n = t - 12582912.0f;
  int32_t ti; memcpy(&ti, &t, 4);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f
            + r * (1.3888889e-3f + r * 1.9841270e-4f))))));
  int32_t bits = ((ti - 0x4B400000) + 127) << 23;
  float s; memcpy(&s, &bits, 4);
  return p * s;
}

static inline float gate1(int mode, float a, float g, float scale) {
  return mode == 1 ? a * g * scale : a / (1.0f + exp_approx(-g));
}

/* the packed plane of one channel block: P[ρ][x][l] = X[h0 - p + ρ][x - p][c + l] + ib[l], zero outside the image
   (rows ρ < nrows, columns x < Wp; lanes past the block's channels are zeros). ib: the block's input bias (the
   projection's bias before the stage, added here instead of in a pass of its own), or zeros. */
static void pack(float* P, const float* xb, int H, int W, int C, int p, int h0, int nrows, int Wp, int c, int lanes,
                 vf ib) {
  for (int rho = 0; rho < nrows; rho++) {
    int h = h0 - p + rho;
    if (h < 0 || h >= H) { memset(P + (long)rho * Wp * VL, 0, (size_t)Wp * VL * sizeof(float)); continue; }
    memset(P + (long)rho * Wp * VL, 0, (size_t)p * VL * sizeof(float));
    memset(P + ((long)rho * Wp + p + W) * VL, 0, (size_t)(Wp - p - W) * VL * sizeof(float));
    const float* src = xb + (long)h * W * C + c;
    float* dst = P + ((long)rho * Wp + p) * VL;
    if (lanes == VL)
      for (int x = 0; x < W; x++) *(vf*)(dst + (long)x * VL) = *(const vf*)(src + (long)x * C) + ib;
    else  /* a partial block: the lanes past the last channel are zeros */
      for (int x = 0; x < W; x++)
        for (int l = 0; l < VL; l++) dst[(long)x * VL + l] = l < lanes ? src[(long)x * C + l] + ib[l] : 0.0f;
  }
}

/* RB×TW outputs (rows h..h+RB-1, columns x0..x0+TW-1, relative to the packed block) into acc */
static inline __attribute__((always_inline)) void tile(const float* P, const float* Wt, int Wp, int K, int C,
                                                       int h, int x0, int c, vf acc[RB][TW], vf b) {
  for (int q = 0; q < RB; q++) for (int t = 0; t < TW; t++) acc[q][t] = b;
  for (int d = 0; d < K + RB - 1; d++) {  /* packed row h + d: tap row d - q of output row h + q */
    const float* prow = P + ((long)(h + d) * Wp + x0) * VL;
    if (d >= RB - 1 && d < K) {  /* every output row of the block uses this input row */
      const float* wr[RB];
      for (int q = 0; q < RB; q++) wr[q] = Wt + (long)(d - q) * K * C + c;
      for (int j = 0; j < K; j++) {
        vf w[RB];
        for (int q = 0; q < RB; q++) w[q] = *(const vf*)(wr[q] + (long)j * C);
        for (int t = 0; t < TW; t++) {
          vf v = *(const vf*)(prow + (long)(t + j) * VL);
          for (int q = 0; q < RB; q++) acc[q][t] += w[q] * v;
        }
      }
    } else {
      for (int q = 0; q < RB; q++) {
        int i = d - q;
        if (i < 0 || i >= K) continue;
        const float* wr = Wt + (long)i * K * C + c;
        for (int j = 0; j < K; j++) {
          vf w = *(const vf*)(wr + (long)j * C);
          for (int t = 0; t < TW; t++) acc[q][t] += w * *(const vf*)(prow + (long)(t + j) * VL);
        }
      }
    }
  }
}

/* mode 0: out[.., C] = conv; 1: out[.., C/2] = x1·x2·scale; 2: out[.., C/2] = x1·σ(x2), x1 and x2 the first
   and second half of the convolved channels. The input is X + Ib (Ib [C] or NULL: the preceding projection's bias,
   so that the projection need not add it), zero outside the image. Output rows [h0, h1) of every image, channel
   blocks [k0, k1) of VL output channels (the last block may be partial). Returns 0, or -1 if out of memory. */
int dw_stage(const float* X, const float* Wt, const float* Bi, const float* Ib, float* O, int B, int H, int W, int C,
             int K, int mode, float scale, int h0, int h1, int k0, int k1) {
  int p = K / 2, half = C / 2, Co = mode ? half : C, span = mode ? half : C, KK = K * K;
  int rows = h1 - h0, nrows = rows + 2 * p + RB - 1, Wp = W + 2 * p + TW - 1;
  size_t plane = (size_t)nrows * Wp * VL, taps = (size_t)KK * VL;
  /* the packed planes (one per gate half) and the blocks' taps, [K·K][VL] each */
  float* P = aligned_alloc(64, (((plane + taps) * (mode ? 2 : 1) * sizeof(float)) + 63) / 64 * 64);
  if (!P) return -1;
  float* P2 = P + plane;
  float* Wk1 = P + plane * (mode ? 2 : 1);
  float* Wk2 = Wk1 + taps;
  for (int k = k0; k < k1; k++) {
    int c0 = k * VL, lanes = span - c0 < VL ? span - c0 : VL;
    vf b1, b2, i1, i2;
    for (int l = 0; l < VL; l++) {
      b1[l] = (Bi && l < lanes) ? Bi[c0 + l] : 0.0f;
      b2[l] = (Bi && mode && l < lanes) ? Bi[c0 + half + l] : 0.0f;
      i1[l] = (Ib && l < lanes) ? Ib[c0 + l] : 0.0f;
      i2[l] = (Ib && mode && l < lanes) ? Ib[c0 + half + l] : 0.0f;
    }
    /* tap-major copies of the block's weights; the lanes past the last channel are zeros */
    for (int l = 0; l < VL; l++)
      for (int t = 0; t < KK; t++) {
        Wk1[(size_t)t * VL + l] = l < lanes ? Wt[(size_t)(c0 + l) * KK + t] : 0.0f;
        if (mode) Wk2[(size_t)t * VL + l] = l < lanes ? Wt[(size_t)(c0 + half + l) * KK + t] : 0.0f;
      }
    for (int n = 0; n < B; n++) {
      const float* xb = X + (long)n * H * W * C;
      pack(P, xb, H, W, C, p, h0, nrows, Wp, c0, lanes, i1);
      if (mode) pack(P2, xb, H, W, C, p, h0, nrows, Wp, c0 + half, lanes, i2);
      for (int h = 0; h < rows; h += RB) {
        for (int x0 = 0; x0 < W; x0 += TW) {
          vf a1[RB][TW], a2[RB][TW];
          tile(P, Wk1, Wp, K, VL, h, x0, 0, a1, b1);
          if (mode) tile(P2, Wk2, Wp, K, VL, h, x0, 0, a2, b2);
          for (int q = 0; q < RB && h + q < rows; q++) {
            float* orow = O + ((long)n * H + h0 + h + q) * W * Co;
            for (int t = 0; t < TW && x0 + t < W; t++) {
              vf o;
              if (!mode) o = a1[q][t];
              else for (int l = 0; l < VL; l++) o[l] = gate1(mode, a1[q][t][l], a2[q][t][l], scale);
              float* dst = orow + (long)(x0 + t) * Co + c0;
              if (lanes == VL) *(vf*)dst = o;
              else for (int l = 0; l < lanes; l++) dst[l] = o[l];
            }
          }
        }
      }
    }
  }
  free(P);
  return 0;
}

int dw_lanes(void) { return VL; }

/* The weight gradient of the depth-wise convolution (training, deltadistill/cpu_kernel.py's autograd function):
   dW[c, i, j] = Σ_{n, y, x} X[n, y + i − p, x + j − p, c] · G[n, y, x, c] (zero outside the image), written into
   dW [C, K, K] for the channel blocks [k0, k1) over the images [n0, n1). Per block and image the input is packed as
   in dw_stage; for each tap row i the K taps of that row accumulate in registers over the whole image (at most
   JT of them at a time), so every product is one load and one FMA. Returns 0, or -1 if out of memory. */
#define JT 16
int dw_weight_grad(const float* X, const float* G, float* dW, int B, int H, int W, int C, int K, int n0, int n1,
                   int k0, int k1) {
  (void)B;
  int p = K / 2, KK = K * K, nrows = H + 2 * p, Wp = W + 2 * p;
  size_t plane = (size_t)nrows * Wp * VL, gplane = (size_t)H * W * VL;
  float* P = aligned_alloc(64, (((plane + gplane + (size_t)KK * VL) * sizeof(float)) + 63) / 64 * 64);
  if (!P) return -1;
  float* Gp = P + plane;          /* the block's gradient, packed [H][W][VL] */
  float* acc = Gp + gplane;       /* the block's taps, [K·K][VL] */
  for (int k = k0; k < k1; k++) {
    int c0 = k * VL, lanes = C - c0 < VL ? C - c0 : VL;
    memset(acc, 0, (size_t)KK * VL * sizeof(float));
    for (int n = n0; n < n1; n++) {
      const float* xb = X + (long)n * H * W * C;
      const float* gb = G + (long)n * H * W * C;
      pack(P, xb, H, W, C, p, 0, nrows, Wp, c0, lanes, (vf){0});
      for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
          float* dst = Gp + ((long)y * W + x) * VL;
          const float* src = gb + ((long)y * W + x) * C + c0;
          if (lanes == VL) *(vf*)dst = *(const vf*)src;
          else { memset(dst, 0, VL * sizeof(float)); memcpy(dst, src, lanes * sizeof(float)); }
        }
      for (int i = 0; i < K; i++)
        for (int j0 = 0; j0 < K; j0 += JT) {
          int nj = K - j0 < JT ? K - j0 : JT;
          vf a[JT];
          for (int j = 0; j < JT; j++) a[j] = (vf){0};
          for (int y = 0; y < H; y++) {
            const float* prow = P + ((long)(y + i) * Wp + j0) * VL;
            const float* grow = Gp + (long)y * W * VL;
            for (int x = 0; x < W; x++) {
              vf g = *(const vf*)(grow + (long)x * VL);
              if (nj == JT)
                for (int j = 0; j < JT; j++) a[j] += *(const vf*)(prow + (long)(x + j) * VL) * g;
              else
                for (int j = 0; j < nj; j++) a[j] += *(const vf*)(prow + (long)(x + j) * VL) * g;
            }
          }
          for (int j = 0; j < nj; j++) *(vf*)(acc + ((long)i * K + j0 + j) * VL) += a[j];
        }
    }
    for (int l = 0; l < lanes; l++)
      for (int t = 0; t < KK; t++) dW[(size_t)(c0 + l) * KK + t] = acc[(size_t)t * VL + l];
  }
  free(P);
  return 0;
}

/* out[n, y, x, :] += bilinear(S)[n, y, x, :] + Bias[n, :], S [B, hs, ws, C] resized to out [B, H, W, C] with
   align_corners=False, PyTorch's rule: source coordinate (d + ½)·(in/out) − ½, clamped at 0; Bias [B, C] or NULL.
   Output rows [r0, r1) of the B·H rows. The coarse stage's projection (and the block's output bias, which the
   full-resolution projection then need not add) joins the output in one pass instead of two. */
int upsample_add(const float* S, const float* Bias, float* O, int B, int hs, int ws, int H, int W, int C, int r0,
                 int r1) {
  (void)B;
  float sh = (float)hs / (float)H, sw = (float)ws / (float)W;
  for (int r = r0; r < r1; r++) {
    int n = r / H, y = r % H;
    float fy = sh * ((float)y + 0.5f) - 0.5f;
    if (fy < 0.0f) fy = 0.0f;
    int y0 = (int)fy, y1 = y0 + (y0 < hs - 1);
    float ly1 = fy - (float)y0, ly0 = 1.0f - ly1;
    for (int x = 0; x < W; x++) {
      float fx = sw * ((float)x + 0.5f) - 0.5f;
      if (fx < 0.0f) fx = 0.0f;
      int x0 = (int)fx, x1 = x0 + (x0 < ws - 1);
      float lx1 = fx - (float)x0, lx0 = 1.0f - lx1;
      const float* restrict a = S + (((long)n * hs + y0) * ws + x0) * C;
      const float* restrict b = S + (((long)n * hs + y0) * ws + x1) * C;
      const float* restrict c = S + (((long)n * hs + y1) * ws + x0) * C;
      const float* restrict d = S + (((long)n * hs + y1) * ws + x1) * C;
      float* restrict o = O + (((long)n * H + y) * W + x) * C;
      if (Bias) {
        const float* restrict e = Bias + (long)n * C;
        for (int k = 0; k < C; k++) o[k] += ly0 * (lx0 * a[k] + lx1 * b[k]) + ly1 * (lx0 * c[k] + lx1 * d[k]) + e[k];
      } else
        for (int k = 0; k < C; k++) o[k] += ly0 * (lx0 * a[k] + lx1 * b[k]) + ly1 * (lx0 * c[k] + lx1 * d[k]);
    }
  }
  return 0;
}

#ifdef _OPENMP
/* The parts of one call on the process's OpenMP team: PyTorch's own threads when PyTorch (built with GNU
   OpenMP) is loaded first, as deltadistill/cpu_kernel.py makes sure; they are awake right after PyTorch's
   matmuls, where threads of a pool of ours would have to wait for them to stop spinning.
   parts[4i .. 4i+3] = h0, h1, k0, k1 of dw_stage; parts[2i .. 2i+1] = r0, r1 of upsample_add. */
int dw_stage_parts(const float* X, const float* Wt, const float* Bi, const float* Ib, float* O, int B, int H, int W,
                   int C, int K, int mode, float scale, int n, const int* parts) {
  int rc = 0;
#pragma omp parallel for num_threads(n) schedule(static, 1) reduction(| : rc)
  for (int i = 0; i < n; i++)
    rc |= dw_stage(X, Wt, Bi, Ib, O, B, H, W, C, K, mode, scale, parts[4 * i], parts[4 * i + 1], parts[4 * i + 2],
                   parts[4 * i + 3]);
  return rc;
}

int dw_weight_grad_parts(const float* X, const float* G, float* dW, int B, int H, int W, int C, int K, int n,
                        const int* parts, long stride) {
  int rc = 0;
#pragma omp parallel for num_threads(n) schedule(static, 1) reduction(| : rc)
  for (int i = 0; i < n; i++)
    rc |= dw_weight_grad(X, G, dW + stride * i, B, H, W, C, K, parts[4 * i], parts[4 * i + 1], parts[4 * i + 2],
                         parts[4 * i + 3]);
  return rc;
}

int upsample_add_parts(const float* S, const float* Bias, float* O, int B, int hs, int ws, int H, int W, int C, int n,
                       const int* parts) {
#pragma omp parallel for num_threads(n) schedule(static, 1)
  for (int i = 0; i < n; i++) upsample_add(S, Bias, O, B, hs, ws, H, W, C, parts[2 * i], parts[2 * i + 1]);
  return 0;
}
#endif
