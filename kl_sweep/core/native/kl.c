/* The reverse KL's fit derivatives (reverse_kl), whole reverse-KL fits (reverse_fit, below) and
 * both KLs of a result row (kl_pair), one row at a time.
 *
 * reverse_kl: KL(Q||P) and its derivatives in theta = (mu, log sigma). The same rule and formulas
 * as kl_sweep.core.fit.Objective._closed_form_derivatives with the Quadrature estimator (see its
 * docstring for the maths), fused into one pass over each row's nodes: the torch path makes about
 * twenty passes over [rows, nodes] tensors per step.
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

/* The rule's constants and one row's P, as every per-row function takes them. */
struct rule {
    int n_scale, n_off, order;
    const double *scale, *off, *t, *gw;
    double support;
};

struct mixture {
    int S;
    const double *means, *variances, *log_weights, *switch_points, *widths;
};

/* Appends each component's scale points of row r of P and the edges around its switch points, as
 * offsets from o, to edges[0..ne), and widens [*lo, *hi] to P's support; returns the new count. */
static int add_p_edges(double *edges, int ne, const struct rule *R, const struct mixture *P, ptrdiff_t r,
                       double o, double *lo, double *hi)
{
    for (int k = 0; k < 2; ++k) {
        const double sd = sqrt(P->variances[2 * r + k]), d = P->means[2 * r + k] - o;
        for (int i = 0; i < R->n_scale; ++i) edges[ne++] = d + sd * R->scale[i];
        *lo = fmin(*lo, d - R->support * sd);
        *hi = fmax(*hi, d + R->support * sd);
    }
    return add_switch_edges(edges, ne, P->S, P->switch_points + r * P->S, P->widths + r * P->S, o, R->n_off,
                            R->off);
}

/* Clips edges[0..ne) to [lo, hi], sorts them and lays the rule's panels between them (weights for
 * dx); returns the number of nodes. */
static int clipped_panels(double *edges, int ne, double lo, double hi, const struct rule *R, double *nodes,
                          double *rule)
{
    for (int i = 0; i < ne; ++i) edges[i] = fmin(fmax(edges[i], lo), hi);
    sort_edges(edges, ne);
    return panels(edges, ne, R->order, R->t, R->gw, 1.0, nodes, rule);
}

/* Scratch for one row's panels: max_edges edges, (max_edges - 1) * order nodes and weights. */
#define SCRATCH(name, max_edges, order)                                                   \
    double name##_edges[max_edges];                                                       \
    double name##_nodes[((max_edges) - 1) * (order)], name##_rule[((max_edges) - 1) * (order)]

/* The reverse KL of row r of P at (m, s), its gradient g[2] and, if asked, its Hessian h[4].
 * Never inlined: the batched kernel and the fused fit then run the very same code, so they give
 * the same bits. */
__attribute__((noinline)) static void
row_reverse_kl(const struct rule *R, const struct mixture *P, ptrdiff_t r, double m, double s, int hessian,
               double *edges, double *z, double *rule, double *loss, double *g, double *h)
{
    const double sigma = exp(s);
    const double lo = -R->support * sigma, hi = R->support * sigma;
    int ne = 0;
    for (int i = 0; i < R->n_scale; ++i) edges[ne++] = sigma * R->scale[i];
    ne = add_switch_edges(edges, ne, P->S, P->switch_points + r * P->S, P->widths + r * P->S, m, R->n_off,
                          R->off);
    for (int i = 0; i < ne; ++i) {
        double v = edges[i];
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        edges[i] = v / sigma;
    }
    sort_edges(edges, ne);
    const int n = panels(edges, ne, R->order, R->t, R->gw, sigma, z, rule);
    /* log w_k N(x; m_k, v_k) = c_k - e_k^2 with e_k = shift_k + slope_k z. */
    const double *mk = P->means + 2 * r, *vk = P->variances + 2 * r, *lw = P->log_weights + 2 * r;
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
    *loss = a_sum - w_sum;
    g[0] = az / sigma;
    g[1] = azz - a_sum;
    if (hessian) {
        const double h_ms = (bzzz - 2.0 * az) / sigma;
        h[0] = (bzz - a_sum) / (sigma * sigma);
        h[1] = h_ms;
        h[2] = h_ms;
        h[3] = bzz1 - 2.0 * azz;
    }
}

void reverse_kl(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta,
                const double *means, const double *variances, const double *log_weights,
                const double *switch_points, const double *widths,
                int n_scale, const double *scale, int n_off, const double *off, double support,
                int order, const double *t, const double *gw,
                int hessian, double *loss, double *grad, double *hess)
{
    const struct rule R = {n_scale, n_off, order, scale, off, t, gw, support};
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};
    const int max_edges = n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    /* On each thread's stack: 2 x 28 panels x order doubles, 29 KB at the largest order the
     * config allows (64, kl_sweep.validate). */
    SCRATCH(row, max_edges, order);
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r)
        row_reverse_kl(&R, &P, r, theta[2 * r], theta[2 * r + 1], hessian, row_edges, row_nodes, row_rule,
                       loss + r, grad + 2 * r, hessian ? hess + 4 * r : NULL);
    }
}

/* forward_moments: the moment form of the forward KL under P's Quadrature rule, as
 * kl_sweep.core.fit.Objective.build computes it: nodes x = o + u, with o the mean of P's means, on
 * composite Gauss-Legendre panels (order nodes each) between each component's scale points
 * (scale[] sds) and the switch points' offsets (off[] widths), clipped to the support of P
 * (support sds of each component) and sorted; with w = rule p(x) and d = x - ref:
 *   c = sum w log p,  m0 = sum w,  m1 = sum w d,  m2 = sum w d^2. */
void forward_moments(ptrdiff_t rows, ptrdiff_t min_rows, int S,
                     const double *means, const double *variances, const double *log_weights,
                     const double *switch_points, const double *widths,
                     int n_scale, const double *scale, int n_off, const double *off, double support,
                     int order, const double *t, const double *gw, const double *ref,
                     double *c, double *m0, double *m1, double *m2)
{
    const struct rule R = {n_scale, n_off, order, scale, off, t, gw, support};
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};
    const int max_edges = 2 * n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        const double *mk = means + 2 * r, *vk = variances + 2 * r, *lw = log_weights + 2 * r;
        const double o = 0.5 * (mk[0] + mk[1]);
        double lo = INFINITY, hi = -INFINITY;
        const int ne = add_p_edges(row_edges, 0, &R, &P, r, o, &lo, &hi);
        const int n = clipped_panels(row_edges, ne, lo, hi, &R, row_nodes, row_rule);
        double c0, k0, c1, k1;
        component(lw[0], vk[0], &c0, &k0);
        component(lw[1], vk[1], &c1, &k1);
        const double shift0 = (o - mk[0]) * k0, shift1 = (o - mk[1]) * k1, offset = o - ref[r];
        double c_sum = 0, w_sum = 0, d_sum = 0, dd_sum = 0;
#pragma omp simd reduction(+ : c_sum, w_sum, d_sum, dd_sum)
        for (int i = 0; i < n; ++i) {
            const double ui = row_nodes[i];
            const double e0 = shift0 + ui * k0, e1 = shift1 + ui * k1;
            const double l0 = c0 - e0 * e0, l1 = c1 - e1 * e1;
            const double top = l0 > l1 ? l0 : l1, low = l0 > l1 ? l1 : l0;
            const double log_p = top + log1p(exp(low - top));
            const double w = row_rule[i] * exp(log_p), d = offset + ui;
            c_sum += w * log_p;
            w_sum += w;
            d_sum += w * d;
            dd_sum += w * d * d;
        }
        c[r] = c_sum, m0[r] = w_sum, m1[r] = d_sum, m2[r] = dd_sum;
    }
    }
}

/* Statuses, as kl_sweep.core.fit.Status numbers them. */
enum { CONVERGED = 1, MAX_STEPS = 2, DIVERGED = 3 };

/* Where a fit counts as diverged (kl_sweep.core.fit.MAX_ABS_MU, MAX_ABS_LOG_SIGMA). */
#define MAX_ABS_MU 1e100
#define MAX_ABS_LOG_SIGMA 100.0

/* A row's loss *f, gradient g[2] and (if hessian) Hessian h[4] at theta = (m, s). */
typedef void (*derivatives_fn)(const void *ctx, ptrdiff_t r, double m, double s, int hessian, double *f,
                               double *g, double *h);

/* The fit's per-row budget and shared settings (kl_sweep.core.fit.Problem, Settings, Adam). */
struct fit {
    const double *lr, *tol;
    const long *max_steps;
    const unsigned char *trusted; /* NULL: every row */
    double beta1, beta2, eps, log_beta1, log_beta2, handover;
    int polish, check_every;
    double *theta, *loss, *gnorm; /* outputs: what each row reports */
    long *steps, *status;
};

/* One row's whole fit, by the rules of kl_sweep.core.fit.fit_stream with Adam, the same steps in
 * the same order:
 *
 * First-order phase, each iteration: the loss and gradient (and the Hessian on iterations where
 * polish is on and it % check_every == 0); a row whose values are finite and within bounds keeps
 * this point as the one it reports; it leaves as diverged (not finite, or its nodes do not see P:
 * it reports its last finite point), converged (|grad| <= tol) or out of budget (steps >=
 * max_steps). Otherwise, on a check iteration with a positive definite Hessian and a Newton
 * decrement <= handover, it goes to the polish (without a step this iteration); else it takes an
 * Adam step.
 *
 * Polish, each iteration: a point with a smaller |grad| than the best so far is kept; the row
 * stops once its best |grad| is <= tol and the latest point was no better (converged), or at
 * max_steps; a non-finite point or a Hessian that is not positive definite sends it back to the
 * first-order phase from its kept point; else a full Newton step, capped at 1 in each coordinate. */
static void fit_row(derivatives_fn derivatives, const void *ctx, const struct fit *F, ptrdiff_t r,
                    const double *theta0)
{
    double x[2] = {theta0[2 * r], theta0[2 * r + 1]};
    double m1[2] = {0, 0}, m2[2] = {0, 0}, adam_t = 0, best = INFINITY;
    double kept[2] = {x[0], x[1]}, kept_loss = NAN, kept_gnorm = NAN;
    long step = 0, kept_step = 0, code = 0;
    const int trusted = F->trusted == NULL || F->trusted[r];
    int newton_phase = 0;
    for (long it = 0; !code; ++it) {
        const int check = newton_phase || (F->polish && it % F->check_every == 0);
        double f, g[2], h[4];
        derivatives(ctx, r, x[0], x[1], check, &f, g, h);
        const double norm = sqrt(g[0] * g[0] + g[1] * g[1]);
        const int finite = isfinite(f) && isfinite(g[0]) && isfinite(g[1]) && fabs(x[0]) < MAX_ABS_MU
                           && fabs(x[1]) < MAX_ABS_LOG_SIGMA;
        /* The Newton step -H^-1 g, its decrement g^T H^-1 g, and whether H is positive definite
         * (kl_sweep.core.optim.newton). */
        double d[2] = {0, 0}, decrement = 0;
        int pd = 0;
        if (check) {
            const double det = h[0] * h[3] - h[1] * h[1];
            pd = h[0] > 0 && det > 0 && isfinite(det);
            if (pd) {
                d[0] = -(h[3] * g[0] - h[1] * g[1]) / det;
                d[1] = -(h[0] * g[1] - h[1] * g[0]) / det;
                decrement = -(d[0] * g[0] + d[1] * g[1]);
            }
        }
        if (!newton_phase) {
            if (finite) {
                kept[0] = x[0], kept[1] = x[1], kept_loss = f, kept_gnorm = norm, kept_step = step;
            }
            if (!finite || !trusted) code = DIVERGED;
            else if (norm <= F->tol[r]) code = CONVERGED;
            else if (step >= F->max_steps[r]) code = MAX_STEPS;
            else if (check && pd && decrement <= F->handover) {
                newton_phase = 1;
                best = INFINITY;
            } else {
                adam_t += 1;
                const double c1 = -expm1(adam_t * F->log_beta1), c2 = -expm1(adam_t * F->log_beta2);
                for (int i = 0; i < 2; ++i) {
                    m1[i] = m1[i] * F->beta1 + (1 - F->beta1) * g[i];
                    m2[i] = m2[i] * F->beta2 + (1 - F->beta2) * g[i] * g[i];
                    x[i] = x[i] - F->lr[r] * (m1[i] / c1) / (sqrt(m2[i] / c2) + F->eps);
                }
                ++step;
            }
            continue;
        }
        const int better = finite && norm < best;
        if (better) {
            kept[0] = x[0], kept[1] = x[1], kept_loss = f, kept_gnorm = norm, kept_step = step;
            best = norm;
        }
        const int converged = best <= F->tol[r];
        if (converged && !better) code = CONVERGED;
        else if (step >= F->max_steps[r]) code = converged ? CONVERGED : MAX_STEPS;
        else if (!finite || !pd) {
            newton_phase = 0;
            x[0] = kept[0], x[1] = kept[1];
        } else {
            const double cap = fmax(fmax(fabs(d[0]), fabs(d[1])), 1.0);
            x[0] = x[0] + d[0] / cap;
            x[1] = x[1] + d[1] / cap;
            ++step;
        }
    }
    F->theta[2 * r] = kept[0], F->theta[2 * r + 1] = kept[1];
    F->loss[r] = kept_loss, F->gnorm[r] = kept_gnorm, F->steps[r] = kept_step, F->status[r] = code;
}

#define FIT_ARGS                                                                                    \
    const double *lr, const long *max_steps, const double *tol, const unsigned char *trusted,       \
        double beta1, double beta2, double eps, int polish, double handover, int check_every,       \
        double *theta, double *loss, double *gnorm, long *steps, long *status
#define FIT_INIT                                                                                    \
    {lr, tol, max_steps, trusted, beta1, beta2, eps, log(beta1), log(beta2), handover, polish,      \
     check_every, theta, loss, gnorm, steps, status}

struct reverse_context {
    const struct rule *R;
    const struct mixture *P;
    double *edges, *nodes, *rule;
};

static void reverse_derivatives(const void *ctx, ptrdiff_t r, double m, double s, int hessian, double *f,
                                double *g, double *h)
{
    const struct reverse_context *c = ctx;
    row_reverse_kl(c->R, c->P, r, m, s, hessian, c->edges, c->nodes, c->rule, f, g, h);
}

/* reverse_fit: whole fits of the reverse KL (fit_row), from theta0 [rows, 2]. Rows take their own
 * number of steps (1 to max_steps), so they are dealt to threads a few at a time. */
void reverse_fit(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta0,
                 const double *means, const double *variances, const double *log_weights,
                 const double *switch_points, const double *widths,
                 int n_scale, const double *scale, int n_off, const double *off, double support,
                 int order, const double *t, const double *gw, FIT_ARGS)
{
    const struct rule R = {n_scale, n_off, order, scale, off, t, gw, support};
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};
    const struct fit F = FIT_INIT;
    const int max_edges = n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
    const struct reverse_context ctx = {&R, &P, row_edges, row_nodes, row_rule};
#pragma omp for schedule(dynamic, 4)
    for (ptrdiff_t r = 0; r < rows; ++r) fit_row(reverse_derivatives, &ctx, &F, r, theta0);
    }
}

/* The moment form of an integrand affine in log q under a fixed P (kl_sweep.core.fit.Objective:
 * c, m0, m1, m2 about ref, per row). */
struct moments {
    const double *c, *m0, *m1, *m2, *ref;
};

/* The same formulas as kl_sweep.core.fit.Objective._moment_derivatives:
 * L = c + m0 (s + log(2 pi) / 2) + S e^(-2 s) / 2 with d = mu - ref, S = m2 - 2 d m1 + d^2 m0. */
static void moment_derivatives(const void *ctx, ptrdiff_t r, double m, double s, int hessian, double *f,
                               double *g, double *h)
{
    const struct moments *M = ctx;
    const double m0 = M->m0[r], m1 = M->m1[r], d = m - M->ref[r];
    const double inv = exp(-2 * s), sq = M->m2[r] - 2 * d * m1 + d * d * m0;
    *f = M->c[r] + m0 * (s + 0.5 * LOG_2PI) + 0.5 * sq * inv;
    g[0] = inv * (d * m0 - m1);
    g[1] = m0 - sq * inv;
    if (hessian) {
        h[0] = inv * m0;
        h[1] = h[2] = -2 * g[0];
        h[3] = 2 * sq * inv;
    }
}

/* moment_fit: whole fits of a moment-form divergence (the forward KL), from theta0 [rows, 2]. */
void moment_fit(ptrdiff_t rows, ptrdiff_t min_rows, const double *theta0, const double *c, const double *m0,
                const double *m1, const double *m2, const double *ref, FIT_ARGS)
{
    const struct moments M = {c, m0, m1, m2, ref};
    const struct fit F = FIT_INIT;
#pragma omp parallel for schedule(dynamic, 64) if (rows >= min_rows)
    for (ptrdiff_t r = 0; r < rows; ++r) fit_row(moment_derivatives, &M, &F, r, theta0);
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
    const struct rule R = {n_scale, n_off, order, scale, off, t, gw, support};
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};
    const int max_edges = 3 * n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
    double *edges = row_edges, *u = row_nodes, *rule = row_rule;
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        const double m = theta[2 * r], s = theta[2 * r + 1], sigma = exp(s);
        const double *mk = means + 2 * r, *vk = variances + 2 * r, *lw = log_weights + 2 * r;
        double lo = -support * sigma, hi = support * sigma;
        int ne = 0;
        for (int i = 0; i < n_scale; ++i) edges[ne++] = sigma * scale[i];
        ne = add_p_edges(edges, ne, &R, &P, r, m, &lo, &hi);
        const int n = clipped_panels(edges, ne, lo, hi, &R, u, rule);
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
