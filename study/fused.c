/* Passes over prompts fused into one loop each, compiled on first use by study/fused.py:

   - reduced_step, full_step: the LSA's GD step over a stack of training problems (training.step);
   - logreg_newton: L2-regularised softmax regression on each context by Newton (classifiers.logreg);
   - em_fit: EM for a mixture of linear regressions on each context, its restarts together (em.fit).

   Every loop runs over contiguous prompts or examples, so that the compiler vectorises it, exp and
   log included where the C library has vector variants of them (ICL_MVEC). Sums over prompts or
   examples are partial sums per tile, then per member or prompt: the sums of the torch kernels
   they replace, in another order (tests compare the two). */

#include <math.h>
#include <string.h>

#ifdef ICL_MVEC
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log(double);
#endif

#define TILE 256
#define MAX_D 32
#define MAX_C 16

/* out[r] += sum_i q[i] rows[r][i] for r < count: four rows at a time (independent sums, 5 loads per
   4 multiply-adds) */
static void dot_rows(const double *q, const double *const *rows, int count, int n, double *out) {
  int r = 0;
  for (; r + 4 <= count; r += 4) {
    const double *f0 = rows[r], *f1 = rows[r + 1], *f2 = rows[r + 2], *f3 = rows[r + 3];
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < n; i++) {
      s0 += q[i] * f0[i];
      s1 += q[i] * f1[i];
      s2 += q[i] * f2[i];
      s3 += q[i] * f3[i];
    }
    out[r] += s0, out[r + 1] += s1, out[r + 2] += s2, out[r + 3] += s3;
  }
  for (; r < count; r++) {
    const double *f0 = rows[r];
    double s0 = 0.0;
#pragma omp simd reduction(+ : s0)
    for (int i = 0; i < n; i++) s0 += q[i] * f0[i];
    out[r] += s0;
  }
}

/* For rows z[k] (k < K, TILE apart) over n columns: mx = max_k z[k] (NaN wins, as torch.maximum),
   z[k] <- exp(z[k] - mx) and den = sum_k z[k]: a softmax's or log-sum-exp's shifted exponentials */
static void shifted_exp(int K, int n, double *z, double *mx, double *den) {
  memcpy(mx, z, n * sizeof(double));
  for (int k = 1; k < K; k++) {
    const double *zk = z + k * TILE;
#pragma omp simd
    for (int i = 0; i < n; i++) mx[i] = (zk[i] > mx[i] || zk[i] != zk[i]) ? zk[i] : mx[i];
  }
  memset(den, 0, n * sizeof(double));
  for (int k = 0; k < K; k++) {
    double *zk = z + k * TILE;
#pragma omp simd
    for (int i = 0; i < n; i++) {
      zk[i] = exp(zk[i] - mx[i]);
      den[i] += zk[i];
    }
  }
}

/* out[r][t] = sum_l A[r * ars + l * acs] rows[l][t] for r < R, t < n (out rows `ostride` apart):
   a small matrix times rows of contiguous prompts, four rows of them at a time */
static void mat_rows(int R, int L, const double *A, int ars, int acs, const double *const *rows, int n, double *out, int ostride) {
  for (int r = 0; r < R; r++) {
    const double *ar = A + r * ars;
    double *o = out + r * ostride;
#pragma omp simd
    for (int t = 0; t < n; t++) o[t] = 0.0;
    int l = 0;
    for (; l + 4 <= L; l += 4) {
      const double *x0 = rows[l], *x1 = rows[l + 1], *x2 = rows[l + 2], *x3 = rows[l + 3];
      double w0 = ar[l * acs], w1 = ar[(l + 1) * acs], w2 = ar[(l + 2) * acs], w3 = ar[(l + 3) * acs];
#pragma omp simd
      for (int t = 0; t < n; t++) o[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t];
    }
    for (; l < L; l++) {
      const double *xl = rows[l], w = ar[l * acs];
#pragma omp simd
      for (int t = 0; t < n; t++) o[t] += w * xl[t];
    }
  }
}

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
  for (int j = 0; j < c; j++) { /* - z_y, before z turns into exponentials */
    const double *zj = z + j * TILE;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc -= y[i] == j ? zj[i] : 0.0;
  }
  double m[TILE];
  shifted_exp(c, n, z, m, t);
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; i++) acc += m[i];
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

/* ---------------------------------------------------------------------------------------------
   The reduced LSA's GD step. For each member s and prompt b (prompts last, as training.Problem
   stores them): u = W x_q, z = V u (c' logits), loss(z, y), g = dloss/dz, grad += (V^T g) x_q^T.
   A tile of TILE prompts is read once (lsa.reduced_loss_grad reads each chunk twice).

   W [S][d][d], V [S][c][d][B], X [S][d][B], y [S][B] (class index or target)
   -> loss [S] (summed over prompts), grad [S][d][d] (summed). Returns 0, or -1 for shapes
   beyond MAX_D / MAX_C. k: the factors per log in the cross-entropy's sum of logs. */
int reduced_step(int S, int d, int c, long B, const double *W, const double *V, const double *X,
                 const double *y, int squared, int k, double *loss, double *grad) {
  if (d > MAX_D || c > MAX_C || d < 1 || c < 1 || (squared && c != 1)) return -1;
  double u[MAX_D][TILE], z[MAX_C * TILE], gv[MAX_D][TILE];
  for (int s = 0; s < S; s++) {
    const double *Ws = W + (long)s * d * d, *Vs = V + (long)s * c * d * B, *Xs = X + (long)s * d * B;
    const double *ys = y + (long)s * B;
    double *G = grad + (long)s * d * d, acc = 0.0;
    memset(G, 0, d * d * sizeof(double));
    for (long b0 = 0; b0 < B; b0 += TILE) {
      int n = B - b0 < TILE ? (int)(B - b0) : TILE;
      /* u = W x_q: two rows by four columns of W at a time (x_q read once for both rows) */
      for (int a = 0; a < d; a += 2) {
        int two = a + 1 < d; /* an odd d's last row goes alone: ub is then scratch */
        double *ua = u[a], *ub = two ? u[a + 1] : gv[0];
        const double *wa = Ws + a * d, *wb = Ws + (a + two) * d;
#pragma omp simd
        for (int i = 0; i < n; i++) ua[i] = ub[i] = 0.0;
        int l = 0;
        for (; l + 4 <= d; l += 4) {
          const double *x0 = Xs + l * B + b0, *x1 = x0 + B, *x2 = x1 + B, *x3 = x2 + B;
          double w0 = wa[l], w1 = wa[l + 1], w2 = wa[l + 2], w3 = wa[l + 3];
          double v0 = wb[l], v1 = wb[l + 1], v2 = wb[l + 2], v3 = wb[l + 3];
#pragma omp simd
          for (int i = 0; i < n; i++) {
            double y0 = x0[i], y1 = x1[i], y2 = x2[i], y3 = x3[i];
            ua[i] += w0 * y0 + w1 * y1 + w2 * y2 + w3 * y3;
            ub[i] += v0 * y0 + v1 * y1 + v2 * y2 + v3 * y3;
          }
        }
        for (; l < d; l++) {
          const double *xl = Xs + l * B + b0;
          double wl = wa[l], vl = wb[l];
#pragma omp simd
          for (int i = 0; i < n; i++) {
            ua[i] += wl * xl[i];
            ub[i] += vl * xl[i];
          }
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

/* ---------------------------------------------------------------------------------------------
   The full LSA's GD step (lsa.full_loss_grad). For each member s and prompt b: a = K x_q,
   h = G a, z = P h (c' logits), loss(z, y), g = dloss/dz; dP += g h^T, da = G^T (P^T g),
   dK += da x_q^T. A tile of FULL_TILE prompts of G (D x D each) is read from memory once; its
   second use (da) finds it in cache.

   P [S][c][D], K [S][D][d], G [S][D][D][B], X [S][d][B], y [S][B] -> loss [S], dP [S][c][D],
   dK [S][D][d] (sums over prompts). Returns 0, or -1 beyond FULL_MAX_D / MAX_C. */

#define FULL_TILE 64
#define FULL_MAX_D 48 /* D = d + c' */

int full_step(int S, int d, int c, int D, long B, const double *P, const double *K, const double *G,
              const double *X, const double *y, int squared, int k, double *loss, double *dP, double *dK) {
  if (D > FULL_MAX_D || c > MAX_C || d < 1 || c < 1 || D < d || (squared && c != 1)) return -1;
  double a[FULL_MAX_D][FULL_TILE], h[FULL_MAX_D][FULL_TILE], pg[FULL_MAX_D][FULL_TILE], z[MAX_C * TILE];
  const double *rows[FULL_MAX_D], *xrows[FULL_MAX_D], *zrows[MAX_C];
  for (int i = 0; i < D; i++) rows[i] = h[i];
  for (int j = 0; j < c; j++) zrows[j] = z + j * TILE;
  for (int s = 0; s < S; s++) {
    const double *Ps = P + (long)s * c * D, *Ks = K + (long)s * D * d, *Gs = G + (long)s * D * D * B;
    const double *Xs = X + (long)s * d * B, *ys = y + (long)s * B;
    double *dPs = dP + (long)s * c * D, *dKs = dK + (long)s * D * d, acc = 0.0;
    memset(dPs, 0, c * D * sizeof(double));
    memset(dKs, 0, D * d * sizeof(double));
    for (long b0 = 0; b0 < B; b0 += FULL_TILE) {
      int n = B - b0 < FULL_TILE ? (int)(B - b0) : FULL_TILE;
      for (int l = 0; l < d; l++) xrows[l] = Xs + l * B + b0;
      mat_rows(D, d, Ks, d, 1, xrows, n, a[0], FULL_TILE); /* a = K x_q */
      for (int i = 0; i < D; i++) { /* h = G a, four columns of G at a time */
        double *hi = h[i];
        const double *gi = Gs + (long)i * D * B + b0;
#pragma omp simd
        for (int t = 0; t < n; t++) hi[t] = 0.0;
        int j = 0;
        for (; j + 4 <= D; j += 4) {
          const double *g0 = gi + j * B, *g1 = g0 + B, *g2 = g1 + B, *g3 = g2 + B;
          const double *a0 = a[j], *a1 = a[j + 1], *a2 = a[j + 2], *a3 = a[j + 3];
#pragma omp simd
          for (int t = 0; t < n; t++) hi[t] += g0[t] * a0[t] + g1[t] * a1[t] + g2[t] * a2[t] + g3[t] * a3[t];
        }
        for (; j < D; j++) {
          const double *gij = gi + j * B, *aj = a[j];
#pragma omp simd
          for (int t = 0; t < n; t++) hi[t] += gij[t] * aj[t];
        }
      }
      mat_rows(c, D, Ps, D, 1, rows, n, z, TILE); /* z = P h */
      acc += tile_loss(c, n, z, ys + b0, squared, k);
      for (int j = 0; j < c; j++) dot_rows(z + j * TILE, rows, D, n, dPs + j * D); /* dP += g h^T */
      mat_rows(D, c, Ps, 1, D, zrows, n, pg[0], FULL_TILE); /* pg = P^T g */
      for (int j = 0; j < D; j++) { /* da = G^T pg, into a (no longer needed) */
        double *aj = a[j];
#pragma omp simd
        for (int t = 0; t < n; t++) aj[t] = 0.0;
      }
      int i = 0;
      for (; i + 4 <= D; i += 4) { /* four rows of G at a time */
        const double *p0 = pg[i], *p1 = pg[i + 1], *p2 = pg[i + 2], *p3 = pg[i + 3];
        for (int j = 0; j < D; j++) {
          const double *g0 = Gs + ((long)i * D + j) * B + b0, *g1 = g0 + D * B, *g2 = g1 + D * B, *g3 = g2 + D * B;
          double *aj = a[j];
#pragma omp simd
          for (int t = 0; t < n; t++) aj[t] += g0[t] * p0[t] + g1[t] * p1[t] + g2[t] * p2[t] + g3[t] * p3[t];
        }
      }
      for (; i < D; i++) {
        const double *pi = pg[i];
        for (int j = 0; j < D; j++) {
          const double *gij = Gs + ((long)i * D + j) * B + b0;
          double *aj = a[j];
#pragma omp simd
          for (int t = 0; t < n; t++) aj[t] += gij[t] * pi[t];
        }
      }
      for (int i = 0; i < D; i++) dot_rows(a[i], xrows, d, n, dKs + i * d); /* dK += da x_q^T */
    }
    loss[s] = acc;
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------------
   L2-regularised softmax regression on each context by Newton's method (classifiers.logreg_fit):
   per prompt, minimise sum_m CE(softmax(w [x_m; 1]), y_m) + l2 / 2 ||w||^2 over w [c][d+1] from
   w = 0, stopping after the first step with max |step| < tol (that step applied) or after max_iter.

   Per step the Hessian is l2 I + sum_m (diag p_m - p_m p_m^T) (x) f_m f_m^T with f = [x; 1]. The
   rows of diag p - p p^T sum to 0, so its sums follow from the pairs k <= l < c - 1; f f^T is
   symmetric, so each context keeps its T = e(e+1)/2 products f_i f_j (i <= j), formed once. The
   system is solved by Cholesky (the Hessian is positive definite: l2 > 0). */

#define LR_MAX_E 17 /* d + 1 */
#define LR_MAX_C 8
#define LR_MAX_N (LR_MAX_C * LR_MAX_E)
#define LR_MAX_T (LR_MAX_E * (LR_MAX_E + 1) / 2)
#define LR_MAX_U ((LR_MAX_C - 1) * LR_MAX_C / 2)

/* solve A s = b for symmetric positive definite A [n][n] (overwritten by its factor); b becomes s */
static int cholesky_solve(int n, double *A, double *b) {
  for (int j = 0; j < n; j++) {
    double *aj = A + j * n, s = aj[j];
    for (int k = 0; k < j; k++) s -= aj[k] * aj[k];
    if (!(s > 0.0)) return -1;
    s = sqrt(s);
    aj[j] = s;
    for (int i = j + 1; i < n; i++) {
      double *ai = A + i * n, t = ai[j];
      for (int k = 0; k < j; k++) t -= ai[k] * aj[k];
      ai[j] = t / s;
    }
  }
  for (int i = 0; i < n; i++) { /* L z = b */
    double t = b[i];
    for (int k = 0; k < i; k++) t -= A[i * n + k] * b[k];
    b[i] = t / A[i * n + i];
  }
  for (int i = n - 1; i >= 0; i--) { /* L^T s = z */
    double t = b[i];
    for (int k = i + 1; k < n; k++) t -= A[k * n + i] * b[k];
    b[i] = t / A[i * n + i];
  }
  return 0;
}

/* x [P][d][M] (examples last), y [P][M] (class index as double) -> w [P][c][d+1] (intercept last),
   steps [P] (Newton steps taken; -1 where a Hessian was not positive definite). work: T * M doubles. */
int logreg_newton(int P, int d, int c, long M, const double *x, const double *y, double l2, double tol,
                  int max_iter, double *w, int *steps, double *work) {
  if (d < 1 || d + 1 > LR_MAX_E || c < 2 || c > LR_MAX_C) return -1;
  int e = d + 1, n = c * e, T = e * (e + 1) / 2, U = (c - 1) * c / 2;
  int ti[LR_MAX_T], tj[LR_MAX_T], tix[LR_MAX_E][LR_MAX_E], pa[LR_MAX_U], pb[LR_MAX_U];
  for (int i = 0, t = 0; i < e; i++)
    for (int j = i; j < e; j++, t++) ti[t] = i, tj[t] = j, tix[i][j] = tix[j][i] = t;
  for (int a = 0, u = 0; a < c - 1; a++)
    for (int b = a; b < c - 1; b++, u++) pa[u] = a, pb[u] = b;
  double H[LR_MAX_N * LR_MAX_N], g[LR_MAX_N], hs[LR_MAX_U][LR_MAX_T], gs[LR_MAX_C][LR_MAX_E];
  double z[LR_MAX_C][TILE], q[TILE];
  for (int p = 0; p < P; p++) {
    const double *xp = x + (long)p * d * M, *yp = y + (long)p * M;
    double *wp = w + (long)p * n;
    for (int t = 0; t < T; t++) { /* f_i f_j, the intercept's products included */
      double *out = work + t * M;
      int i = ti[t], j = tj[t];
      if (j == d) { /* f_i * 1 */
        if (i == d) for (long m = 0; m < M; m++) out[m] = 1.0;
        else if (M > 0) memcpy(out, xp + i * M, M * sizeof(double)); /* M = 0: a NULL pointer */
      } else {
        const double *xi = xp + i * M, *xj = xp + j * M;
#pragma omp simd
        for (long m = 0; m < M; m++) out[m] = xi[m] * xj[m];
      }
    }
    memset(wp, 0, n * sizeof(double));
    steps[p] = max_iter;
    for (int it = 0; it < max_iter; it++) {
      for (int u = 0; u < U; u++) memset(hs[u], 0, T * sizeof(double));
      for (int k = 0; k < c; k++) memset(gs[k], 0, e * sizeof(double));
      for (long m0 = 0; m0 < M; m0 += TILE) {
        int nt = M - m0 < TILE ? (int)(M - m0) : TILE;
        const double *ym = yp + m0, *frow[LR_MAX_E], *prow[LR_MAX_T];
        double mx[TILE], tot[TILE];
        for (int t = 0; t < T; t++) prow[t] = work + t * M + m0;
        for (int l = 0; l < e; l++) frow[l] = prow[tix[l][d]]; /* f_l = f_l * 1 */
        mat_rows(c, e, wp, e, 1, frow, nt, z[0], TILE); /* logits w_k . [x; 1] */
        shifted_exp(c, nt, z[0], mx, tot);
        for (int k = 0; k < c; k++) { /* p, then the gradient's sums of (p_k - y_k) f */
          double ck = k, *zk = z[k], *gk = gs[k];
#pragma omp simd
          for (int i = 0; i < nt; i++) {
            double pk = zk[i] / tot[i];
            zk[i] = pk;
            q[i] = pk - (ym[i] == ck ? 1.0 : 0.0);
          }
          dot_rows(q, frow, e, nt, gk);
        }
        for (int u = 0; u < U; u++) { /* the pairs' weights p_a (delta_ab - p_b) against every product */
          const double *za = z[pa[u]], *zb = z[pb[u]];
          if (pa[u] == pb[u]) {
#pragma omp simd
            for (int i = 0; i < nt; i++) q[i] = za[i] * (1.0 - za[i]);
          } else {
#pragma omp simd
            for (int i = 0; i < nt; i++) q[i] = -za[i] * zb[i];
          }
          dot_rows(q, prow, T, nt, hs[u]);
        }
      }
      /* the c x c blocks from the pairs (rows sum to 0), then H = blocks (x) products + l2 I */
      double blk[LR_MAX_C][LR_MAX_C][LR_MAX_T];
      for (int u = 0; u < U; u++)
        for (int t = 0; t < T; t++) blk[pa[u]][pb[u]][t] = blk[pb[u]][pa[u]][t] = hs[u][t];
      for (int t = 0; t < T; t++) {
        double all = 0.0;
        for (int a = 0; a < c - 1; a++) {
          double row = 0.0;
          for (int b = 0; b < c - 1; b++) row += blk[a][b][t];
          blk[a][c - 1][t] = blk[c - 1][a][t] = -row;
          all += row;
        }
        blk[c - 1][c - 1][t] = all;
      }
      for (int k = 0; k < c; k++)
        for (int i = 0; i < e; i++)
          for (int l = 0; l < c; l++)
            for (int j = 0; j < e; j++) H[(k * e + i) * n + l * e + j] = blk[k][l][tix[i][j]];
      for (int r = 0; r < n; r++) {
        H[r * n + r] += l2;
        g[r] = gs[r / e][r % e] + l2 * wp[r];
      }
      if (cholesky_solve(n, H, g) != 0) {
        steps[p] = -1;
        break;
      }
      double big = 0.0;
      for (int r = 0; r < n; r++) {
        wp[r] -= g[r];
        double a = fabs(g[r]);
        big = a > big || a != a ? a : big;
      }
      if (!(big >= tol)) { /* NaN stops too, as in torch */
        steps[p] = it + 1;
        break;
      }
    }
  }
  return 0;
}

/* ---------------------------------------------------------------------------------------------
   EM for a K-component mixture of linear regressions on each context (em.fit with grad_steps = 0):
   all R restarts of a prompt iterate together until none of their mean log-likelihoods moves by
   tol (that iteration's M-step applied), or for iters iterations; then the restart with the best
   final log-likelihood is kept (the first on ties). sigma >= 0: known; < 0: estimated from the
   data's std, floored at sigma_floor. The M-step solves (sum_i r_ki x_i x_i^T + ridge I) beta_k =
   sum_i r_ki y_i x_i by Cholesky (the matrix is positive definite: the ridge), or, where rounding
   makes it fail, by Gaussian elimination with partial pivoting. */

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif
#define EM_MAX_D 16
#define EM_MAX_K 8
#define EM_MAX_T (EM_MAX_D * (EM_MAX_D + 1) / 2)

/* max(v, lo) that keeps a NaN, as torch's clamp(min=lo): a non-finite fit stays visible */
static double clamp_min(double v, double lo) { return v < lo ? lo : v; }

/* solve A s = b, A [n][n] (overwritten), partial pivoting; b becomes s */
static void lu_solve(int n, double *A, double *b) {
  for (int j = 0; j < n; j++) {
    int piv = j;
    for (int i = j + 1; i < n; i++)
      if (fabs(A[i * n + j]) > fabs(A[piv * n + j])) piv = i;
    if (piv != j) {
      for (int k = 0; k < n; k++) {
        double t = A[j * n + k];
        A[j * n + k] = A[piv * n + k];
        A[piv * n + k] = t;
      }
      double t = b[j];
      b[j] = b[piv];
      b[piv] = t;
    }
    for (int i = j + 1; i < n; i++) {
      double f = A[i * n + j] / A[j * n + j];
      for (int k = j + 1; k < n; k++) A[i * n + k] -= f * A[j * n + k];
      b[i] -= f * b[j];
    }
  }
  for (int i = n - 1; i >= 0; i--) {
    double t = b[i];
    for (int k = i + 1; k < n; k++) t -= A[i * n + k] * b[k];
    b[i] = t / A[i * n + i];
  }
}

/* out[k][i] = beta_k . x_i over the tile m0 .. m0 + nt of a context x [d][M] (examples last) */
static void em_predict(int d, int K, long M, long m0, int nt, const double *x, const double *beta, double (*out)[TILE]) {
  const double *xrows[EM_MAX_D];
  for (int l = 0; l < d; l++) xrows[l] = x + l * M + m0;
  mat_rows(K, d, beta, d, 1, xrows, nt, out[0], TILE);
}

/* The tile's log weights log pi_k + log N(y_i; beta_k x_i, s2) (lpi = log pi, c0 = log(2 pi s2) / 2),
   then shifted to exponentials: lw[k] = exp(log weight - mx), den = their sum over k */
static void em_weights(int d, int K, long M, long m0, int nt, const double *x, const double *y, const double *beta,
                       const double *lpi, double s2, double c0, double (*lw)[TILE], double *mx, double *den) {
  const double *ym = y + m0;
  em_predict(d, K, M, m0, nt, x, beta, lw);
  for (int k = 0; k < K; k++) {
    double *lk = lw[k], lp = lpi[k];
#pragma omp simd
    for (int i = 0; i < nt; i++) {
      double r = ym[i] - lk[i];
      lk[i] = lp + (-(r * r)) / (2.0 * s2) - c0;
    }
  }
  shifted_exp(K, nt, lw[0], mx, den);
}

/* One E-step of one restart over a context: the mean log-likelihood; with sums != NULL also the
   M-step's sums per component: [N_k, A_k (T products), b_k (d)] = sums + k * (1 + T + d). */
static double em_estep(int d, int K, long M, const double *x, const double *y, const double *const *prow,
                       const double *beta, const double *pi, double sig, double *sums) {
  int T = d * (d + 1) / 2, W = 1 + T + d;
  double s2 = sig * sig, c0 = 0.5 * log(2.0 * M_PI * s2), lpi[EM_MAX_K], total = 0.0;
  for (int k = 0; k < K; k++) lpi[k] = log(pi[k]);
  if (sums) memset(sums, 0, K * W * sizeof(double));
  double lw[EM_MAX_K][TILE], mx[TILE], den[TILE], ry[TILE];
  const double *rows[EM_MAX_T];
  for (long m0 = 0; m0 < M; m0 += TILE) {
    int nt = M - m0 < TILE ? (int)(M - m0) : TILE;
    const double *ym = y + m0;
    em_weights(d, K, M, m0, nt, x, y, beta, lpi, s2, c0, lw, mx, den);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int i = 0; i < nt; i++) acc += log(den[i]) + mx[i];
    total += acc;
    if (!sums) continue;
    for (int l = 0; l < T; l++) rows[l] = prow[l] + m0;
    for (int k = 0; k < K; k++) { /* responsibilities, then their sums against 1, x x^T and y x */
      double *rk = lw[k], *sk = sums + k * W, n = 0.0;
#pragma omp simd reduction(+ : n)
      for (int i = 0; i < nt; i++) {
        double r = rk[i] / den[i];
        rk[i] = r;
        ry[i] = r * ym[i];
        n += r;
      }
      sk[0] += n;
      dot_rows(rk, rows, T, nt, sk + 1);
      const double *xrows[EM_MAX_D];
      for (int l = 0; l < d; l++) xrows[l] = x + l * M + m0;
      dot_rows(ry, xrows, d, nt, sk + 1 + T);
    }
  }
  return total / M;
}

/* sum_k sum_i r_ki (y_i - beta_k x_i)^2 over a context, the responsibilities r at (beta_old, pi, sig) */
static double em_scatter(int d, int K, long M, const double *x, const double *y, const double *beta_old,
                         const double *pi, double sig, const double *beta_new) {
  double s2 = sig * sig, c0 = 0.5 * log(2.0 * M_PI * s2), lpi[EM_MAX_K], total = 0.0;
  for (int k = 0; k < K; k++) lpi[k] = log(pi[k]);
  double lw[EM_MAX_K][TILE], e2[EM_MAX_K][TILE], mx[TILE], den[TILE];
  for (long m0 = 0; m0 < M; m0 += TILE) {
    int nt = M - m0 < TILE ? (int)(M - m0) : TILE;
    const double *ym = y + m0;
    em_weights(d, K, M, m0, nt, x, y, beta_old, lpi, s2, c0, lw, mx, den);
    em_predict(d, K, M, m0, nt, x, beta_new, e2);
    for (int k = 0; k < K; k++) {
      double *ek = e2[k];
#pragma omp simd
      for (int i = 0; i < nt; i++) ek[i] = (ym[i] - ek[i]) * (ym[i] - ek[i]);
    }
    for (int k = 0; k < K; k++) {
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int i = 0; i < nt; i++) acc += lw[k][i] / den[i] * e2[k][i];
      total += acc;
    }
  }
  return total;
}

/* x [P][d][M] (examples last), y [P][M], beta0 [P][R][K][d] -> beta [P][K][d], pi [P][K], sigma [P],
   loglik [P]; returns the most iterations any prompt ran, or -1 for shapes beyond the kernel.
   work: T * M + R * (K * d + K + 2 + K * (1 + T + d)) doubles, T = d (d + 1) / 2. */
int em_fit(int P, int d, int K, int R, long M, const double *x, const double *y, const double *beta0,
           double sigma, int iters, double tol, double ridge, double sigma_floor, double *beta_out,
           double *pi_out, double *sigma_out, double *loglik_out, double *work) {
  if (d < 1 || d > EM_MAX_D || K < 1 || K > EM_MAX_K || R < 1 || M < 1) return -1;
  int T = d * (d + 1) / 2, W = 1 + T + d, most = 0;
  int ti[EM_MAX_T], tj[EM_MAX_T];
  for (int i = 0, t = 0; i < d; i++)
    for (int j = i; j < d; j++, t++) ti[t] = i, tj[t] = j;
  double *prod = work, *beta = prod + T * M, *pi = beta + R * K * d, *sig = pi + R * K, *sums = sig + R;
  double *prev = sums + R * K * W;
  const double *prow[EM_MAX_T];
  for (int t = 0; t < T; t++) prow[t] = prod + t * M;
  for (int p = 0; p < P; p++) {
    const double *xp = x + (long)p * d * M, *yp = y + (long)p * M;
    for (int t = 0; t < T; t++) {
      const double *a = xp + ti[t] * M, *b = xp + tj[t] * M;
      double *out = prod + t * M;
#pragma omp simd
      for (long m = 0; m < M; m++) out[m] = a[m] * b[m];
    }
    double s0 = sigma;
    if (sigma < 0.0) { /* the data's std (unbiased), floored */
      double mean = 0.0, ss = 0.0;
      for (long m = 0; m < M; m++) mean += yp[m];
      mean /= M;
      for (long m = 0; m < M; m++) ss += (yp[m] - mean) * (yp[m] - mean);
      s0 = clamp_min(M > 1 ? sqrt(ss / (M - 1)) : NAN, sigma_floor);
    }
    memcpy(beta, beta0 + (long)p * R * K * d, R * K * d * sizeof(double));
    for (int r = 0; r < R; r++) {
      for (int k = 0; k < K; k++) pi[r * K + k] = 1.0 / K;
      sig[r] = s0;
      prev[r] = -INFINITY;
    }
    int it = 0;
    for (it = 1; it <= iters; it++) {
      double moved = 0.0;
      for (int r = 0; r < R; r++) {
        double *br = beta + r * K * d, *pr = pi + r * K, *sr = sums + r * K * W;
        double sc = clamp_min(sig[r], sigma_floor);
        double ll = em_estep(d, K, M, xp, yp, prow, br, pr, sc, sr);
        double mv = fabs(ll - prev[r]);
        moved = mv > moved || mv != mv ? mv : moved;
        prev[r] = ll;
        double nb[EM_MAX_K * EM_MAX_D];
        for (int k = 0; k < K; k++) {
          double *sk = sr + k * W, A[EM_MAX_D * EM_MAX_D], A2[EM_MAX_D * EM_MAX_D], *bk = nb + k * d;
          for (int t = 0; t < T; t++) A[ti[t] * d + tj[t]] = A[tj[t] * d + ti[t]] = sk[1 + t];
          for (int l = 0; l < d; l++) A[l * d + l] += ridge, bk[l] = sk[1 + T + l];
          memcpy(A2, A, d * d * sizeof(double)); /* for the fallback: Cholesky overwrites A and bk */
          if (cholesky_solve(d, A, bk) != 0) { /* not positive definite in rounding: pivoted LU */
            for (int l = 0; l < d; l++) bk[l] = sk[1 + T + l];
            lu_solve(d, A2, bk);
          }
        }
        if (sigma < 0.0) {
          sig[r] = clamp_min(sqrt(em_scatter(d, K, M, xp, yp, br, pr, sc, nb) / M), sigma_floor);
        }
        for (int k = 0; k < K; k++) {
          pr[k] = clamp_min(sr[k * W] / M, 1e-12);
        }
        memcpy(br, nb, K * d * sizeof(double));
      }
      if (!(moved >= tol)) break; /* converged (NaN stops too, as in torch) */
    }
    if (it > iters) it = iters;
    most = it > most ? it : most;
    int best = 0;
    double best_ll = 0.0;
    for (int r = 0; r < R; r++) {
      double ll = em_estep(d, K, M, xp, yp, prow, beta + r * K * d, pi + r * K, clamp_min(sig[r], sigma_floor), NULL);
      if (r == 0 || ll > best_ll) best = r, best_ll = ll;
    }
    memcpy(beta_out + (long)p * K * d, beta + best * K * d, K * d * sizeof(double));
    memcpy(pi_out + (long)p * K, pi + best * K, K * sizeof(double));
    sigma_out[p] = sig[best];
    loglik_out[p] = best_ll;
  }
  return most;
}
