/* The reduced LSA's GD step over a stack of training problems, fused into one pass over the prompts.

   For each member s and prompt b (prompts last, as training.Problem stores them):
       u = W x_q,  z = V u (c' logits),  loss(z, y),  g = dloss/dz,  grad += (V^T g) x_q^T.
   A tile of TILE prompts is read once (lsa.reduced_loss_grad reads each chunk twice), and every
   loop runs over the tile's contiguous prompts, so that the compiler vectorises it, exp and log
   included where the C library has vector variants of them (ICL_MVEC). Sums over the prompts are
   partial sums per tile, then per member: the sums of lsa.reduced_loss_grad in another order. */

#include <math.h>
#include <string.h>

#ifdef ICL_MVEC
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log(double);
#endif

#define TILE 256
#define MAX_D 32
#define MAX_C 16

/* sum of log t[0..n) for t in [1, bound] (or non-finite, which propagates): one log per product
   of k factors, k small enough that a product never overflows (lsa._sum_log) */
static double sum_log(const double *t, int n, int k) {
  double out = 0.0;
  for (int i = 0; i < n; i += k) {
    int m = n - i < k ? n - i : k;
    double p = 1.0;
#pragma omp simd reduction(* : p)
    for (int j = 0; j < m; j++) p *= t[i + j];
    out += log(p);
  }
  return out;
}

/* The loss summed over a tile's n prompts; z [c][TILE] (logits) becomes dloss/dz in place.
   y: the class index (ce) or the target (squared), as doubles. */
static double tile_loss(int c, int n, double *z, const double *y, int squared, int k) {
  double acc = 0.0, t[TILE];
  if (squared) {
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) {
      double r = z[i] - y[i];
      acc += r * r;
      z[i] = r;
    }
    return 0.5 * acc;
  }
  if (c == 1) { /* w = -ytil s; loss softplus(w) = max(w, 0) + log(1 + exp(-|w|)); dloss/ds = -ytil sigma(w) */
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) {
      double sign = 1.0 - 2.0 * y[i];
      double w = z[i] * sign, e = exp(-fabs(w)), total = 1.0 + e;
      double pos = w > 0.0 ? w : 0.0, num = w >= 0.0 ? 1.0 : e;
      acc += pos;
      t[i] = total;
      z[i] = num / total * sign;
    }
    return acc + sum_log(t, n, k);
  }
  double m[TILE];
  memcpy(m, z, n * sizeof(double));
  for (int j = 1; j < c; j++) {
    const double *zj = z + j * TILE;
#pragma omp simd
    for (int i = 0; i < n; i++) m[i] = (zj[i] > m[i] || zj[i] != zj[i]) ? zj[i] : m[i]; /* NaN wins, as torch.maximum */
  }
  for (int j = 0; j < c; j++) {
    const double *zj = z + j * TILE;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc -= y[i] == j ? zj[i] : 0.0;
  }
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; i++) acc += m[i];
  memset(t, 0, n * sizeof(double));
  for (int j = 0; j < c; j++) {
    double *zj = z + j * TILE;
#pragma omp simd
    for (int i = 0; i < n; i++) {
      zj[i] = exp(zj[i] - m[i]);
      t[i] += zj[i];
    }
  }
  for (int j = 0; j < c; j++) {
    double *zj = z + j * TILE, cj = j;
#pragma omp simd
    for (int i = 0; i < n; i++) {
      double hit = y[i] == cj ? 1.0 : 0.0;
      zj[i] = zj[i] / t[i] - hit;
    }
  }
  return acc + sum_log(t, n, k);
}

/* W [S][d][d], V [S][c][d][B], X [S][d][B], y [S][B] (class index or target)
   -> loss [S] (summed over prompts), grad [S][d][d] (summed). Returns 0, or -1 for shapes
   beyond MAX_D / MAX_C. k: the factors per log in the cross-entropy's sum of logs. */
int reduced_step(int S, int d, int c, long B, const double *W, const double *V, const double *X,
                 const double *y, int squared, int k, double *loss, double *grad) {
  if (d > MAX_D || c > MAX_C || d < 1 || c < 1) return -1;
  double u[MAX_D][TILE], z[MAX_C * TILE], gv[MAX_D][TILE];
  for (int s = 0; s < S; s++) {
    const double *Ws = W + (long)s * d * d, *Vs = V + (long)s * c * d * B, *Xs = X + (long)s * d * B;
    const double *ys = y + (long)s * B;
    double *G = grad + (long)s * d * d, acc = 0.0;
    memset(G, 0, d * d * sizeof(double));
    for (long b0 = 0; b0 < B; b0 += TILE) {
      int n = B - b0 < TILE ? (int)(B - b0) : TILE;
      for (int a = 0; a < d; a++) { /* u = W x_q, four columns of W at a time: fewer loads and stores of u */
        double *ua = u[a];
        const double *wa = Ws + a * d;
#pragma omp simd
        for (int i = 0; i < n; i++) ua[i] = 0.0;
        int l = 0;
        for (; l + 4 <= d; l += 4) {
          const double *x0 = Xs + l * B + b0, *x1 = x0 + B, *x2 = x1 + B, *x3 = x2 + B;
          double w0 = wa[l], w1 = wa[l + 1], w2 = wa[l + 2], w3 = wa[l + 3];
#pragma omp simd
          for (int i = 0; i < n; i++) ua[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i];
        }
        for (; l < d; l++) {
          const double *xl = Xs + l * B + b0;
          double wl = wa[l];
#pragma omp simd
          for (int i = 0; i < n; i++) ua[i] += wl * xl[i];
        }
      }
      for (int j = 0; j < c; j++) {
        double *zj = z + j * TILE;
        const double *vj = Vs + (long)j * d * B + b0;
#pragma omp simd
        for (int i = 0; i < n; i++) zj[i] = vj[i] * u[0][i];
        for (int a = 1; a < d; a++) {
          const double *vja = vj + a * B;
#pragma omp simd
          for (int i = 0; i < n; i++) zj[i] += vja[i] * u[a][i];
        }
      }
      acc += tile_loss(c, n, z, ys + b0, squared, k);
      for (int a = 0; a < d; a++) {
        double *ga = gv[a];
        const double *v0a = Vs + a * B + b0;
#pragma omp simd
        for (int i = 0; i < n; i++) ga[i] = z[i] * v0a[i];
        for (int j = 1; j < c; j++) {
          const double *vja = Vs + ((long)j * d + a) * B + b0, *zj = z + j * TILE;
#pragma omp simd
          for (int i = 0; i < n; i++) ga[i] += zj[i] * vja[i];
        }
      }
      /* grad += (V^T g) x_q^T: two rows by four columns at a time, 6 loads per 8 multiply-adds (the
         row-by-column dot products of the plain loop load twice per multiply-add) */
      for (int a = 0; a < d; a += 2) {
        int a2 = a + 1 < d;
        const double *g0 = gv[a], *g1 = gv[a + a2];
        int l = 0;
        for (; l + 4 <= d; l += 4) {
          const double *x0 = Xs + l * B + b0, *x1 = x0 + B, *x2 = x1 + B, *x3 = x2 + B;
          double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
          for (int i = 0; i < n; i++) {
            s00 += g0[i] * x0[i]; s01 += g0[i] * x1[i]; s02 += g0[i] * x2[i]; s03 += g0[i] * x3[i];
            s10 += g1[i] * x0[i]; s11 += g1[i] * x1[i]; s12 += g1[i] * x2[i]; s13 += g1[i] * x3[i];
          }
          G[a * d + l] += s00; G[a * d + l + 1] += s01; G[a * d + l + 2] += s02; G[a * d + l + 3] += s03;
          if (a2) { G[(a + 1) * d + l] += s10; G[(a + 1) * d + l + 1] += s11; G[(a + 1) * d + l + 2] += s12; G[(a + 1) * d + l + 3] += s13; }
        }
        for (; l < d; l++) {
          const double *xl = Xs + l * B + b0;
          double s0 = 0.0, s1 = 0.0;
#pragma omp simd reduction(+ : s0, s1)
          for (int i = 0; i < n; i++) { s0 += g0[i] * xl[i]; s1 += g1[i] * xl[i]; }
          G[a * d + l] += s0;
          if (a2) G[(a + 1) * d + l] += s1;
        }
      }
    }
    loss[s] = acc;
  }
  return 0;
}
