/* The reverse KL's fit derivatives (reverse_kl) and both KLs of a result row (kl_pair), one row
 * at a time.
 *
 * reverse_kl: KL(Q||P) and its derivatives in theta = (mu, log sigma). The same rule and formulas as kl_sweep.core.fit.Objective._closed_form_derivatives with the
 * Quadrature estimator (see its docstring for the maths), fused into one pass over each row's
 * nodes: the torch path makes about twenty passes over [rows, nodes] tensors per step.
 *
 * Q = N(mu, sigma^2), P = sum_k w_k N(m_k, v_k) with K = 2 components. Panel edges, as offsets
 * from mu in Q's standard units z: Q's scale points (scale[], in sds) and each switch point of P
 * (switch offsets off[] in widths around it; a repeated switch point counts once), clipped to
 * +-support sds and sorted. On each panel, `order` Gauss-Legendre nodes t[] with weights gw[].
 * With w = q(x) dx, phi = log q - log p, a = w (phi + 1) and b = w (phi + 2):
 *   loss = sum a - sum w,   grad = (sum a z / sigma, sum a z^2 - sum a),
 *   hess = [[(sum b z^2 - sum a) / sigma^2, (sum b z (z^2 - 1) - 2 sum a z) / sigma],
 *           [.., sum b (z^2 - 1)^2 - 2 sum a z^2]].
 *
 * Every row is computed by the same code from its own inputs only, so its bits do not depend on
 * the batch it is in, nor on how rows are split among threads. The node loop is vectorised (the
 * sums along it are reassociated, the same way for every row); exp and log1p then come from
 * glibc's vector math library (libmvec, at most 4 ulp) when KL_SWEEP_MVEC is defined.
 *
 * Rows are shared among OpenMP threads (from min_rows rows on). Built with -fopenmp, this library
 * asks for libgomp.so.1, which in a torch process is the one torch has loaded: the kernel runs on
 * torch's own thread team (torch.set_num_threads applies), with no second pool competing for the
 * cores with torch's spinning workers.
 */
#include <math.h>
#include <stddef.h>

#ifdef KL_SWEEP_MVEC
double exp(double) __attribute__((simd("notinbranch")));
double expm1(double) __attribute__((simd("notinbranch")));
double log1p(double) __attribute__((simd("notinbranch")));
#endif

#define LOG_2PI 1.8378770664093454835606594728112

int kl_sweep_abi(void) { return 1; }

/* Sort a few values in place (insertion sort: a row has at most a few dozen panel edges). */
static void sort_edges(double *e, int n)
{
    for (int i = 1; i < n; ++i) {
        const double v = e[i];
        int k = i - 1;
        for (; k >= 0 && e[k] > v; --k) e[k + 1] = e[k];
        e[k + 1] = v;
    }
}

/* Appends the edges around each distinct switch point of a row (off[] widths around it, as
 * offsets from Q's mean m) to edges[0..ne); returns the new count. */
static int add_switch_edges(double *edges, int ne, int S, const double *sw, const double *wd, double m,
                            int n_off, const double *off)
{
    for (int j = 0; j < S; ++j) {
        int seen = 0;
        for (int k = 0; k < j; ++k) seen |= sw[k] == sw[j];
        if (seen) continue;
        const double c = sw[j] - m, width = fmin(wd[j], 1e300);
        for (int i = 0; i < n_off; ++i) edges[ne++] = c + width * off[i];
    }
    return ne;
}

/* Gauss-Legendre nodes on the panels between consecutive sorted edges, with weights times
 * `scale`; returns the number of nodes. */
static int panels(const double *edges, int ne, int order, const double *t, const double *gw, double scale,
                  double *nodes, double *rule)
{
    int n = 0;
    for (int p = 0; p + 1 < ne; ++p) {
        const double left = edges[p], half = 0.5 * (edges[p + 1] - edges[p]);
        for (int i = 0; i < order; ++i, ++n) {
            nodes[n] = left + half * (t[i] + 1.0);
            rule[n] = half * scale * gw[i];
        }
    }
    return n;
}

/* log w N(x; mean, var) = c - e^2 with e = shift + k u at x = m + u: c and k (shift = (m - mean) k). */
static void component(double log_weight, double var, double *c, double *k)
{
    *c = log_weight - 0.5 * (LOG_2PI + log(var));
    *k = 1.0 / sqrt(2.0 * var);
}

void reverse_kl(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta,
                const double *means, const double *variances, const double *log_weights,
                const double *switch_points, const double *widths,
                int n_scale, const double *scale, int n_off, const double *off, double support,
                int order, const double *t, const double *gw,
                int hessian, double *loss, double *grad, double *hess)
{
    const int max_edges = n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    /* On each thread's stack: 2 x 28 panels x order doubles, 29 KB at the largest order the
     * config allows (64, kl_sweep.validate). */
    double edges[max_edges];
    double z[(max_edges - 1) * order], rule[(max_edges - 1) * order];
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        const double m = theta[2 * r], s = theta[2 * r + 1], sigma = exp(s);
        const double lo = -support * sigma, hi = support * sigma;
        int ne = 0;
        for (int i = 0; i < n_scale; ++i) edges[ne++] = sigma * scale[i];
        ne = add_switch_edges(edges, ne, S, switch_points + r * S, widths + r * S, m, n_off, off);
        for (int i = 0; i < ne; ++i) {
            double v = edges[i];
            v = v < lo ? lo : v;
            v = v > hi ? hi : v;
            edges[i] = v / sigma;
        }
        sort_edges(edges, ne);
        const int n = panels(edges, ne, order, t, gw, sigma, z, rule);
        /* log w_k N(x; m_k, v_k) = c_k - e_k^2 with e_k = shift_k + slope_k z. */
        const double *mk = means + 2 * r, *vk = variances + 2 * r, *lw = log_weights + 2 * r;
        double c0, k0, c1, k1;
        component(lw[0], vk[0], &c0, &k0);
        component(lw[1], vk[1], &c1, &k1);
        const double shift0 = (m - mk[0]) * k0, slope0 = sigma * k0;
        const double shift1 = (m - mk[1]) * k1, slope1 = sigma * k1;
        const double cq = -0.5 * LOG_2PI - s;
        double w_sum = 0, a_sum = 0, az = 0, azz = 0, bzz = 0, bzzz = 0, bzz1 = 0;
#pragma omp simd reduction(+ : w_sum, a_sum, az, azz, bzz, bzzz, bzz1)
        for (int i = 0; i < n; ++i) {
            const double zi = z[i], zz = zi * zi;
            const double log_q = cq - 0.5 * zz;
            const double w = exp(log_q) * rule[i];
            const double e0 = shift0 + zi * slope0, e1 = shift1 + zi * slope1;
            const double l0 = c0 - e0 * e0, l1 = c1 - e1 * e1;
            const double top = l0 > l1 ? l0 : l1, low = l0 > l1 ? l1 : l0;
            const double log_p = top + log1p(exp(low - top));
            const double a = w + w * (log_q - log_p);
            const double b = a + w, zz1 = zz - 1.0;
            w_sum += w;
            a_sum += a;
            az += a * zi;
            azz += a * zz;
            bzz += b * zz;
            bzzz += b * zi * zz1;
            bzz1 += b * zz1 * zz1;
        }
        loss[r] = a_sum - w_sum;
        grad[2 * r] = az / sigma;
        grad[2 * r + 1] = azz - a_sum;
        if (hessian) {
            const double h_ms = (bzzz - 2.0 * az) / sigma;
            hess[4 * r] = (bzz - a_sum) / (sigma * sigma);
            hess[4 * r + 1] = h_ms;
            hess[4 * r + 2] = h_ms;
            hess[4 * r + 3] = bzz1 - 2.0 * azz;
        }
    }
    }
}

/* kl_pair: KL(P||Q) and KL(Q||P) as kl_sweep.core.divergences.kl_pair_exact computes them for rows
 * whose nodes are shared (its docstring), on one set of nodes per row:
 *
 * nodes u = x - mu on composite Gauss-Legendre panels (order nodes each) between Q's and each
 * component's scale points (scale[] sds) and the switch points' offsets (off[] widths), clipped to
 * the support of both (support sds of Q and of each component) and sorted; at each node, with
 * delta = log p - log q, the non-negative densities
 *   KL(A||B) term = a (delta_ab + expm1(-delta_ab)) where |delta| < 1, else a delta_ab + b - a,
 * summed with the rule's weights. */
void kl_pair(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta,
             const double *means, const double *variances, const double *log_weights,
             const double *switch_points, const double *widths,
             int n_scale, const double *scale, int n_off, const double *off, double support,
             int order, const double *t, const double *gw, double *forward, double *reverse)
{
    const int max_edges = 3 * n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    double edges[max_edges];
    double u[(max_edges - 1) * order], rule[(max_edges - 1) * order];
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        const double m = theta[2 * r], s = theta[2 * r + 1], sigma = exp(s);
        const double *mk = means + 2 * r, *vk = variances + 2 * r, *lw = log_weights + 2 * r;
        const double sd0 = sqrt(vk[0]), sd1 = sqrt(vk[1]);
        const double d0 = mk[0] - m, d1 = mk[1] - m;
        double lo = -support * sigma, hi = support * sigma;
        lo = fmin(lo, fmin(d0 - support * sd0, d1 - support * sd1));
        hi = fmax(hi, fmax(d0 + support * sd0, d1 + support * sd1));
        int ne = 0;
        for (int i = 0; i < n_scale; ++i) edges[ne++] = sigma * scale[i];
        for (int i = 0; i < n_scale; ++i) edges[ne++] = d0 + sd0 * scale[i];
        for (int i = 0; i < n_scale; ++i) edges[ne++] = d1 + sd1 * scale[i];
        ne = add_switch_edges(edges, ne, S, switch_points + r * S, widths + r * S, m, n_off, off);
        for (int i = 0; i < ne; ++i) edges[i] = fmin(fmax(edges[i], lo), hi);
        sort_edges(edges, ne);
        const int n = panels(edges, ne, order, t, gw, 1.0, u, rule);
        double c0, k0, c1, k1;
        component(lw[0], vk[0], &c0, &k0);
        component(lw[1], vk[1], &c1, &k1);
        const double shift0 = (m - mk[0]) * k0, shift1 = (m - mk[1]) * k1;
        double f_sum = 0, r_sum = 0;
#pragma omp simd reduction(+ : f_sum, r_sum)
        for (int i = 0; i < n; ++i) {
            const double ui = u[i], z = ui / sigma;
            const double log_q = -0.5 * (LOG_2PI + z * z) - s;
            const double e0 = shift0 + ui * k0, e1 = shift1 + ui * k1;
            const double l0 = c0 - e0 * e0, l1 = c1 - e1 * e1;
            const double top = l0 > l1 ? l0 : l1, low = l0 > l1 ? l1 : l0;
            const double log_p = top + log1p(exp(low - top));
            const double delta = log_p - log_q;
            const double p = exp(log_p), q = exp(log_q);
            const int near = fabs(delta) < 1.0;
            const double d = near ? delta : 0.0;
            const double em = expm1(-d), ep = expm1(d);
            const double tf = near ? p * (delta + em) : p * delta + q - p;
            const double tr = near ? q * (-delta + ep) : q * -delta + p - q;
            f_sum += rule[i] * tf;
            r_sum += rule[i] * tr;
        }
        forward[r] = f_sum;
        reverse[r] = r_sum;
    }
    }
}
