/* The fit's hot paths, one row at a time: every divergence's derivatives and whole fits, and the
 * values a result row reports.
 *
 * The design: one node loop (node_sums) for every integrand (the reverse KL's, the alpha family's,
 * Jensen-Shannon's), one fit loop (fit_row, over P parameters) for every derivatives function (the
 * reverse KL's, the moment form's, the pointwise members', and in d > 1 the reverse KL's in Q's
 * family, whose 1-D part is the reverse KL's). The entry points: reverse_kl, reverse_fit (the
 * reverse KL), reduced_fit (the reverse KL in d > 1), pointwise, pointwise_fit, pointwise_value
 * (the alpha family and Jensen-Shannon, below), forward_moments and moment_fit (the forward KL),
 * kl_pair (both KLs of a result row).
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
 * sums along it are reassociated, the same way for every row); exp, expm1, log1p (and log, in the
 * loops that name it vector_log) then come from glibc's vector math library (libmvec, at most 4 ulp)
 * when KL_SWEEP_MVEC is defined.
 *
 * Rows are shared among OpenMP threads (from min_rows rows on). Built with -fopenmp, this library
 * asks for libgomp.so.1, which in a torch process is the one torch has loaded: the kernel runs on
 * torch's own thread team (torch.set_num_threads applies), with no second pool competing for the
 * cores with torch's spinning workers.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef KL_SWEEP_MVEC
double exp(double) __attribute__((simd("notinbranch")));
double expm1(double) __attribute__((simd("notinbranch")));
double log1p(double) __attribute__((simd("notinbranch")));
/* log, in vectors only in the loops that call it by this name (Renyi's log terms): the other loops
 * that take a log (the stochastic fit's) keep the scalar one, and with it their bits. */
double vector_log(double) __asm__("log") __attribute__((simd("notinbranch"), const));
#else
#define vector_log log
#endif

#define LOG_2PI 1.8378770664093454835606594728112

int kl_sweep_abi(void) { return 1; }

/* Sort a row's panel edges in place. They come as runs that are already sorted, one per scale or
 * offset pattern (ascending, or descending for a tail laid out leftward), so a natural merge sort
 * does it in about n log2(runs) moves: a tenth of an insertion sort's on the alpha family's
 * hundred-odd edges. Stable, so any sort gives the same array. */
#define MAX_SORT 512
static void sort_edges(double *e, int n)
{
    if (n <= 32 || n > MAX_SORT) { /* a few dozen (the KLs' rows): insertion; none reach MAX_SORT */
        for (int i = 1; i < n; ++i) {
            const double v = e[i];
            int k = i - 1;
            for (; k >= 0 && e[k] > v; --k) e[k + 1] = e[k];
            e[k + 1] = v;
        }
        return;
    }
    int starts[MAX_SORT + 1], runs = 0;
    for (int i = 0; i < n;) { /* split into runs, turning strictly descending ones around */
        int j = i + 1;
        if (j < n && e[j] < e[i]) {
            while (j < n && e[j] < e[j - 1]) ++j;
            for (int a = i, b = j - 1; a < b; ++a, --b) {
                const double t = e[a];
                e[a] = e[b], e[b] = t;
            }
        } else {
            while (j < n && e[j] >= e[j - 1]) ++j;
        }
        starts[runs++] = i;
        i = j;
    }
    starts[runs] = n;
    double buffer[MAX_SORT], *from = e, *to = buffer;
    while (runs > 1) { /* merge neighbouring runs pairwise */
        int merged = 0;
        for (int r = 0; r < runs; r += 2) {
            /* (starts[runs] = n: a last run without a partner is copied as it is) */
            const int lo = starts[r], mid = starts[r + 1 < runs ? r + 1 : runs];
            const int hi = starts[r + 2 < runs ? r + 2 : runs];
            int a = lo, b = mid, k = lo;
            while (a < mid && b < hi) to[k++] = from[b] < from[a] ? from[b++] : from[a++];
            while (a < mid) to[k++] = from[a++];
            while (b < hi) to[k++] = from[b++];
            starts[merged++] = lo;
        }
        starts[merged] = n;
        runs = merged;
        double *t = from;
        from = to, to = t;
    }
    if (from != e)
        for (int i = 0; i < n; ++i) e[i] = from[i];
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
static inline __attribute__((always_inline)) int
panels_of(const int order, const double *edges, int ne, const double *t, const double *gw, double scale,
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

/* panels_of, its inner loop unrolled for the fits' 6 nodes a panel and the values' 12 (the same
 * arithmetic, so the same bits). */
static int panels(const double *edges, int ne, int order, const double *t, const double *gw, double scale,
                  double *nodes, double *rule)
{
    if (order == 6) return panels_of(6, edges, ne, t, gw, scale, nodes, rule);
    if (order == 12) return panels_of(12, edges, ne, t, gw, scale, nodes, rule);
    return panels_of(order, edges, ne, t, gw, scale, nodes, rule);
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

/* The integrands node_sums knows: the reverse KL's, the alpha family's, Jensen-Shannon's. */
enum { ALPHA_TERMS = 0, JENSEN_SHANNON_TERMS = 1, REVERSE_TERMS = 2 };
enum { COMPACT = 0, TILTED = 1, TAILS = 2 };

#define LOG_2 0.69314718055993530941723212145818
/* Renyi's value comes from log int q^alpha p^(1 - alpha) where that log is at least this
 * (kl_sweep.core.divergences.RENYI_NEAR). */
#define RENYI_NEAR LOG_2

/* min(max(x, lo), hi), keeping a NaN as torch.minimum and torch.maximum do. */
static double clamp(double x, double lo, double hi)
{
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* e^x, but no less than e^lowest, lowest = exp_lowest = -708 (the least normal double is 2.2e-308).
 * A vector exp hands every lane that would underflow to the scalar exp: that made the alpha
 * family's far nodes (its tails) cost about a tenth of its fits. A density below 1e-307 is not seen in
 * any sum of the rule. exp_lowest is a variable the compiler cannot fold: with a constant it
 * computes e^x on every lane and picks e^-708 after. The reported values (pointwise_value) keep
 * the plain exp. */
double exp_lowest = -708.0;

static inline double exp_normal(double x, double lowest)
{
    return exp(x < lowest ? lowest : x);
}

/* (t0, t1, t2) of D_a at one node (kl_sweep.core.alpha.alpha_fit_terms); high: a > 1/2 (the
 * mirror form of t0). inv_a = 1/a and inv_c = 1/(1 - a), 0 where a is 0 or 1 (then each near branch
 * is its limit, q delta or p delta): a vector division costs as much as an exp, and a node would
 * take five. Branch-free, so that the node loop is vectorised. */
static inline __attribute__((always_inline)) void
alpha_terms(const int high, double log_p, double log_q, double a, double inv_a, double inv_c, double lowest,
            double *t0, double *t1, double *t2)
{
    const double delta = log_p - log_q, y = a * delta;
    const double q = exp_normal(log_q, lowest), p = exp_normal(log_p, lowest);
    const double tilted = exp_normal(log_q + y, lowest);
    /* -q (e^y - 1)/a: as q delta expm1(y)/y near y = 0, from the two densities far from it */
    const double near = inv_a != 0.0 ? expm1(y) * inv_a : delta;
    const double d1 = fabs(y) < 0.5 ? -q * near : (q - tilted) * inv_a;
    *t1 = d1;
    *t2 = tilted + d1;
    if (!high) {
        *t0 = (p - q + d1) * inv_c;
    } else { /* (p - T)/(1 - a) = -p expm1(yy)/(1 - a), yy = -(1 - a) delta */
        const double yy = -(1.0 - a) * delta;
        const double mirror_near = inv_c != 0.0 ? -expm1(yy) * inv_c : delta;
        const double mirrored = fabs(yy) < 0.5 ? p * mirror_near : (p - tilted) * inv_c;
        *t0 = (q - p + mirrored) * inv_a;
    }
}

/* log(1 + e^x) = -logsigmoid(-x), exact everywhere (kl_sweep.core.mixture.softplus). */
static inline double softplus(double x)
{
    return (x > 0 ? x : 0.0) + log1p(exp(-fabs(x))); /* (a ternary, not fmax: it vectorises) */
}

/* (t0, t1, t2) of Jensen-Shannon at one node (kl_sweep.core.alpha.jensen_shannon_fit_terms), from
 * m = tanh(|delta| / 2) = -expm1(-|delta|) / (2 + expm1(-|delta|)) (vector expm1) and the logs of
 * 1 + u and 1 - u, u = sign(delta) m: log1p(m) always, log1p(-m) for |delta| < 1 and
 * log 2 - |delta| - log1p(e^-|delta|) beyond (1 - m = 2 e^-|delta| / (1 + e^-|delta|); there
 * e^-|delta| = 1 + expm1(-|delta|) errs by 1e-16 at most, next to |delta| >= 1). Formed as log 2
 * minus a softplus they lost digits where P and Q nearly agree: with the vector log1p's 4 ulp, the
 * table's values were 2.5e-12 off (against mpmath). With p + q = e^max (2 + expm1(-|delta|)) and
 * p / (p + q) = (1 + u) / 2 no further exp is taken. */
static inline __attribute__((always_inline)) void
jensen_shannon_terms(double log_p, double log_q, double *t0, double *t1, double *t2)
{
    const double delta = log_p - log_q, far = fabs(delta), q = exp(log_q);
    const double em = expm1(-far), m = -em / (2.0 + em);
    const int near = far < 1.0;
    const double up = log1p(m), l = log1p(near ? -m : 1.0 + em);
    const double down = near ? l : LOG_2 - far - l;
    const double u = delta < 0 ? -m : m, log1pu = delta < 0 ? down : up, log1mu = delta < 0 ? up : down;
    const double s = u * u;
    const double series = s * (1.0 + s * (1.0 / 6 + s * (1.0 / 15 + s * (1.0 / 28 + s / 45))));
    const double h = fabs(u) < 0.05 ? series : (1.0 + u) * log1pu + (1.0 - u) * log1mu;
    const double top = log_p > log_q ? log_p : log_q;
    *t0 = 0.25 * (exp(top) * (2.0 + em)) * h;
    *t1 = 0.5 * q * log1mu;
    *t2 = *t1 + 0.25 * q * (1.0 + u);
}

/* A row in Q's standard units z = (x - m) / sigma: log q = cq - z^2 / 2, and the weighted
 * components log w_k N(x; m_k, v_k) = c_k - e_k^2 with e_k = shift_k + slope_k z. */
struct standard {
    double cq, c0, shift0, slope0, c1, shift1, slope1;
};

static struct standard standardise(const struct mixture *P, ptrdiff_t r, double m, double s, double sigma)
{
    const double *mk = P->means + 2 * r, *vk = P->variances + 2 * r, *lw = P->log_weights + 2 * r;
    double c0, k0, c1, k1;
    component(lw[0], vk[0], &c0, &k0);
    component(lw[1], vk[1], &c1, &k1);
    const struct standard u = {-0.5 * LOG_2PI - s, c0, (m - mk[0]) * k0, sigma * k0, c1, (m - mk[1]) * k1,
                               sigma * k1};
    return u;
}

/* The node sums of a row's derivatives, one loop for every integrand: sums[] = (sum r t0 [r > 0],
 * sum r t1, .. z, .. z^2, sum r t2 z^2, .. z (z^2 - 1), .. (z^2 - 1)^2), and log p at each node
 * into log_p_at[] (unless NULL); for the reverse KL, with w = r q, (sum w, sum w (phi + 1), ..,
 * sum w (phi + 2) z^2, ..) as row_reverse_kl's formulas take them. terms and high are constants at
 * each call, so each integrand gets its own vectorised loop. */
static inline __attribute__((always_inline)) void
node_sums(const int terms, const int high, double a, int n, const double *z, const double *rule,
          const struct standard *u, double *log_p_at, double *sums)
{
    const double cq = u->cq, c0 = u->c0, shift0 = u->shift0, slope0 = u->slope0;
    const double c1 = u->c1, shift1 = u->shift1, slope1 = u->slope1, lowest = exp_lowest;
    const double inv_a = a != 0.0 ? 1.0 / a : 0.0, inv_c = a != 1.0 ? 1.0 / (1.0 - a) : 0.0;
    double t0_sum = 0, a_sum = 0, az = 0, azz = 0, bzz = 0, bzzz = 0, bzz1 = 0;
#pragma omp simd reduction(+ : t0_sum, a_sum, az, azz, bzz, bzzz, bzz1)
    for (int i = 0; i < n; ++i) {
        const double zi = z[i], zz = zi * zi, w = rule[i];
        const double log_q = cq - 0.5 * zz;
        const double e0 = shift0 + zi * slope0, e1 = shift1 + zi * slope1;
        const double l0 = c0 - e0 * e0, l1 = c1 - e1 * e1;
        const double top = l0 > l1 ? l0 : l1, low = l0 > l1 ? l1 : l0;
        const double gap = low - top; /* the pointwise members' far nodes: no scalar exp (exp_normal) */
        const double log_p = top + log1p(terms == REVERSE_TERMS ? exp(gap) : exp_normal(gap, lowest));
        double s0, at, bt;
        if (terms == REVERSE_TERMS) { /* w q (phi + 1), w q (phi + 2) and w q, phi = log q - log p */
            const double wq = exp(log_q) * w;
            at = wq + wq * (log_q - log_p);
            bt = at + wq;
            s0 = wq;
        } else {
            double t0, t1, t2;
            if (terms == JENSEN_SHANNON_TERMS) jensen_shannon_terms(log_p, log_q, &t0, &t1, &t2);
            else alpha_terms(high, log_p, log_q, a, inv_a, inv_c, lowest, &t0, &t1, &t2);
            at = w * t1, bt = w * t2;
            s0 = w > 0 ? w * t0 : 0.0;
        }
        const double zz1 = zz - 1.0;
        t0_sum += s0;
        a_sum += at;
        az += at * zi;
        azz += at * zz;
        bzz += bt * zz;
        bzzz += bt * zi * zz1;
        bzz1 += bt * zz1 * zz1;
        if (log_p_at != NULL) log_p_at[i] = log_p;
    }
    sums[0] = t0_sum, sums[1] = a_sum, sums[2] = az, sums[3] = azz, sums[4] = bzz, sums[5] = bzzz;
    sums[6] = bzz1;
}

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
    const struct standard u = standardise(P, r, m, s, sigma);
    double sums[7];
    node_sums(REVERSE_TERMS, 0, 0.0, n, z, rule, &u, NULL, sums);
    const double w_sum = sums[0], a_sum = sums[1], az = sums[2], azz = sums[3], bzz = sums[4];
    const double bzzz = sums[5], bzz1 = sums[6];
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
enum { CONVERGED = 1, MAX_STEPS = 2, DIVERGED = 3, INFINITE = 4 };

/* Where a fit counts as diverged (kl_sweep.core.fit.MAX_ABS_MU, MAX_ABS_LOG_SIGMA). */
#define MAX_ABS_MU 1e100
#define MAX_ABS_LOG_SIGMA 100.0
/* A row with a outside [0, 1] restarts Adam each time 1 + D has fallen this many times since the last
 * start, a < 0 unless it is held on the edge (kl_sweep.core.loop.RESTART_DROP). */
#define RESTART_DROP 10.0
/* Halvings of a step that would leave the finite region (kl_sweep.core.polish.MAX_HALVINGS). */
#define MAX_HALVINGS 60

/* A row's loss *f, gradient g[P] and (if hessian) Hessian h[P * P] (row-major) at theta x[P]:
 * P = 2, x = (mu, log sigma), in 1-D; the family's parameters in d > 1 (reduced_fit). */
typedef void (*derivatives_fn)(const void *ctx, ptrdiff_t r, const double *x, int hessian, double *f,
                               double *g, double *h);

/* The alpha family's finite region in log sigma, per row, as torch computes it
 * (kl_sweep.core.alpha.log_sigma_bounds, edge_is_finite: passed in, so that a row held on the edge
 * sits on the very double the table's on_boundary test compares with): finite for lo < s < hi, and
 * on s == hi where left < mu < right (a < 0, mu between the widest components; else left = +inf).
 * steep: 1 for a < 0, 2 for a > 1, where Adam is fed the gradient of log(1 + D) and restarts each
 * time 1 + D has fallen RESTART_DROP-fold, a < 0 unless held on the edge (kl_sweep.core.loop._damped);
 * else 0. */
struct region {
    const double *lo, *hi, *left, *right;
    const unsigned char *steep;
};

static int on_closed_edge(const struct region *E, ptrdiff_t r, double m)
{
    return E->left[r] < m && m < E->right[r];
}

static int finite_at(const struct region *E, ptrdiff_t r, double m, double s)
{
    return (s > E->lo[r] && s < E->hi[r]) || (s == E->hi[r] && on_closed_edge(E, r, m));
}

/* kl_sweep.core.polish._keep_finite: the proposed x, kept where the divergence is finite. Past a
 * closed edge log sigma is set on it, towards an open lower bound it goes halfway there; a step that
 * still lands where the divergence is infinite is halved until it does not (else the row stays).
 * Returns whether the step landed on the edge from below (fit_row then restarts Adam: at once in
 * the polish, in the first-order phase once the row is held there, kl_sweep.core.polish._settle). */
static int keep_finite(const struct region *E, ptrdiff_t r, const double old[2], double x[2])
{
    const double lo = E->lo[r], hi = E->hi[r];
    const double s = x[1] <= lo ? 0.5 * (old[1] + lo) : x[1];
    const int landing = s >= hi && old[1] < hi;
    x[1] = s > hi ? hi : s; /* (a NaN stays NaN, as torch.minimum keeps it) */
    for (int k = 0; k < MAX_HALVINGS; ++k) {
        if (finite_at(E, r, x[0], x[1]) || !(isfinite(x[0]) && isfinite(x[1]))) return landing;
        x[0] = old[0] + 0.5 * (x[0] - old[0]);
        x[1] = old[1] + 0.5 * (x[1] - old[1]);
    }
    x[0] = old[0], x[1] = old[1];
    return landing;
}

/* The fit's per-row budget and shared settings (kl_sweep.core.fit.Problem, Settings, Adam). */
struct fit {
    const double *lr, *tol;
    const long *max_steps;
    const unsigned char *trusted; /* NULL: every row */
    double beta1, beta2, eps, log_beta1, log_beta2, handover;
    int polish, check_every;
    double *theta, *loss, *gnorm; /* outputs: what each row reports */
    long *steps, *status;
    /* theta's length P, and which of its entries are logs of a scale (bounded by
     * MAX_ABS_LOG_SIGMA; the others, means and off-diagonal entries, by MAX_ABS_MU). NULL: P = 2,
     * theta = (mu, log sigma). */
    int n_params;
    const unsigned char *log_scale;
};

/* The Newton step d = -H^-1 g of a P x P system (P > 2; fit_row_of solves 2 x 2 ones in closed
 * form), its decrement g^T H^-1 g, and whether H is positive definite (kl_sweep.core.optim.newton):
 * by a Cholesky factorisation of (H + H^T) / 2 in chol[P * P]. */
static int newton_system(int P, const double *g, const double *h, double *chol, double *d, double *decrement)
{
    for (int i = 0; i < P; ++i) d[i] = 0;
    *decrement = 0;
    for (int i = 0; i < P; ++i)
        for (int j = 0; j <= i; ++j) {
            const double v = 0.5 * (h[i * P + j] + h[j * P + i]);
            if (!isfinite(v)) return 0;
            chol[i * P + j] = v;
        }
    for (int j = 0; j < P; ++j) { /* L L^T, lower triangle in place; its dot products vectorised */
        const double *lj = chol + j * P;
        double v = 0;
#pragma omp simd reduction(+ : v)
        for (int k = 0; k < j; ++k) v += lj[k] * lj[k];
        v = chol[j * P + j] - v;
        if (!(v > 0)) return 0;
        const double l = sqrt(v);
        chol[j * P + j] = l;
        for (int i = j + 1; i < P; ++i) {
            const double *li = chol + i * P;
            double w = 0;
#pragma omp simd reduction(+ : w)
            for (int k = 0; k < j; ++k) w += li[k] * lj[k];
            chol[i * P + j] = (chol[i * P + j] - w) / l;
        }
    }
    for (int i = 0; i < P; ++i) { /* L y = -g */
        double v = -g[i];
        for (int k = 0; k < i; ++k) v -= chol[i * P + k] * d[k];
        d[i] = v / chol[i * P + i];
    }
    for (int i = P - 1; i >= 0; --i) { /* L^T d = y */
        double v = d[i];
        for (int k = i + 1; k < P; ++k) v -= chol[k * P + i] * d[k];
        d[i] = v / chol[i * P + i];
    }
    double dec = 0;
    for (int i = 0; i < P; ++i) dec -= d[i] * g[i];
    *decrement = dec;
    return 1;
}

/* One row's whole fit, by the rules of kl_sweep.core.fit.fit_stream with Adam, the same steps in
 * the same order:
 *
 * First-order phase, each iteration: the loss and gradient (and the Hessian on iterations where
 * polish is on and it % check_every == 0); a row whose values are finite and within bounds keeps
 * this point as the one it reports; it leaves as diverged (not finite, or its nodes do not see P:
 * it reports its last finite point), converged (|grad| <= tol) or out of budget (steps >=
 * max_steps). Otherwise, on a check iteration with a positive definite Hessian and a Newton
 * decrement <= handover, it goes to the polish (without a step this iteration), unless the polish
 * sent it back to the very point it was last handed over at; else it takes an Adam step.
 *
 * Polish, each iteration: a point with a smaller |grad| than the best so far is kept; the row
 * stops once its best |grad| is <= tol and the latest point was no better (converged), or at
 * max_steps; a non-finite point, a Hessian that is not positive definite or (pointwise members) a
 * step that made |grad| worse sends it back to the first-order phase from its kept point; else a
 * full Newton step, capped at 1 in each coordinate.
 *
 * With a finite region E (the alpha family; NULL otherwise, and then none of this applies): a row
 * whose start is outside it ends there as infinite; every step is kept inside (keep_finite); on a
 * closed edge with the gradient pushing outward the row is held there, its gradient norm is
 * |d/d mu| and its Newton step is along the edge (kl_sweep.core.polish._pushed_to_edge, _newton);
 * a polish step along the edge that made |grad| worse is taken back and the next halved instead. */
static inline __attribute__((always_inline)) void
fit_row_of(const int P, derivatives_fn derivatives, const void *ctx, const struct fit *F, const struct region *E,
           int pointwise, ptrdiff_t r, const double *theta0)
{
    const int PP = P * P;
    /* P = 2 on the stack (every 1-D fit); a d > 1 family's Hessian and its factor on the heap. */
    double small[8], *heap = P > 2 ? malloc(2 * (size_t)PP * sizeof(double)) : NULL;
    double *h = P > 2 ? heap : small, *chol = P > 2 ? heap + PP : small + 4;
    double x[P], m1[P], m2[P], kept[P], handed[P], g[P], d[P], old[P];
    double adam_t = 0, best = INFINITY, damp = 1.0, restart = INFINITY;
    double kept_loss = NAN, kept_gnorm = NAN;
    for (int i = 0; i < P; ++i) {
        x[i] = kept[i] = theta0[P * r + i];
        m1[i] = m2[i] = 0, handed[i] = NAN;
    }
    long step = 0, kept_step = 0, code = 0;
    const int trusted = F->trusted == NULL || F->trusted[r];
    const int steep = E != NULL ? E->steep[r] : 0;
    int newton_phase = 0, landed = 0;
    if (P > 2 && heap == NULL) code = DIVERGED, kept_loss = NAN; /* out of memory: the row is lost, not the sweep */
    if (E != NULL && !finite_at(E, r, x[0], x[1])) code = INFINITE, kept_loss = INFINITY;
    for (long it = 0; !code; ++it) {
        const int check = newton_phase || (F->polish && it % F->check_every == 0);
        double f;
        derivatives(ctx, r, x, check, &f, g, h);
        const int edge = E != NULL && x[1] == E->hi[r] && on_closed_edge(E, r, x[0]) && g[1] < 0;
        /* Held on the edge it stepped onto, a row solves a problem in mu alone: Adam starts afresh
         * (its moments remember the steep way in). Not on landing: a row not held there keeps
         * them, else Adam's first step (lr in each coordinate) can take it off the edge and back
         * onto the same point for ever (kl_sweep.core.polish._settle). */
        if (landed && x[1] != E->hi[r]) landed = 0;
        else if (landed && edge) {
            m1[0] = m1[1] = m2[0] = m2[1] = 0, adam_t = 0;
            landed = 0;
        }
        double norm;
        int finite = isfinite(f);
        if (P == 2) {
            norm = edge ? fabs(g[0]) : sqrt(g[0] * g[0] + g[1] * g[1]);
            finite = finite && isfinite(g[0]) && isfinite(g[1]) && fabs(x[0]) < MAX_ABS_MU
                     && fabs(x[1]) < MAX_ABS_LOG_SIGMA;
        } else {
            double sq = 0;
            for (int i = 0; i < P; ++i) {
                sq += g[i] * g[i];
                finite = finite && isfinite(g[i])
                         && fabs(x[i]) < (F->log_scale[i] ? MAX_ABS_LOG_SIGMA : MAX_ABS_MU);
            }
            norm = sqrt(sq);
        }
        /* The Newton step -H^-1 g, its decrement g^T H^-1 g, and whether H is positive definite
         * (kl_sweep.core.optim.newton); on the edge, in mu alone. */
        double decrement = 0;
        int pd = 0;
        if (check && edge) {
            pd = h[0] > 0;
            d[0] = -g[0] / (pd ? h[0] : 1.0), d[1] = 0;
            decrement = -d[0] * g[0];
        } else if (check && P == 2) { /* (in closed form; as written here, for the 1-D fits' bits) */
            d[0] = d[1] = 0;
            const double det = h[0] * h[3] - h[1] * h[1];
            pd = h[0] > 0 && det > 0 && isfinite(det);
            if (pd) {
                d[0] = -(h[3] * g[0] - h[1] * g[1]) / det;
                d[1] = -(h[0] * g[1] - h[1] * g[0]) / det;
                decrement = -(d[0] * g[0] + d[1] * g[1]);
            }
        } else if (check) {
            pd = newton_system(P, g, h, chol, d, &decrement);
        } else {
            for (int i = 0; i < P; ++i) d[i] = 0;
        }
        for (int i = 0; i < P; ++i) old[i] = x[i];
        if (!newton_phase) {
            if (finite) {
                for (int i = 0; i < P; ++i) kept[i] = x[i];
                kept_loss = f, kept_gnorm = norm, kept_step = step;
            }
            int again = 1; /* handed over from this very point before */
            for (int i = 0; i < P; ++i) again = again && x[i] == handed[i];
            if (!finite || !trusted) code = DIVERGED;
            else if (norm <= F->tol[r]) code = CONVERGED;
            else if (step >= F->max_steps[r]) code = MAX_STEPS;
            /* (not twice from one point: sent back there, it would come back for ever) */
            else if (check && pd && decrement <= F->handover && !again) {
                newton_phase = 1;
                best = INFINITY;
                for (int i = 0; i < P; ++i) handed[i] = x[i];
            } else {
                const double fed = steep ? 1.0 + (f > 0 ? f : 0.0) : 1.0;
                if (steep && !edge && fed * RESTART_DROP <= restart) { /* a decade down the wall */
                    if (restart < INFINITY) m1[0] = m1[1] = m2[0] = m2[1] = 0, adam_t = 0;
                    restart = fed;
                }
                adam_t += 1;
                const double c1 = -expm1(adam_t * F->log_beta1), c2 = -expm1(adam_t * F->log_beta2);
                for (int i = 0; i < P; ++i) {
                    const double gi = steep ? g[i] / fed : g[i];
                    m1[i] = m1[i] * F->beta1 + (1 - F->beta1) * gi;
                    m2[i] = m2[i] * F->beta2 + (1 - F->beta2) * gi * gi;
                    x[i] = x[i] - F->lr[r] * (m1[i] / c1) / (sqrt(m2[i] / c2) + F->eps);
                }
                if (E != NULL && keep_finite(E, r, old, x)) landed = 1;
                ++step;
            }
            continue;
        }
        const int better = finite && norm < best;
        if (better) {
            for (int i = 0; i < P; ++i) kept[i] = x[i];
            kept_loss = f, kept_gnorm = norm, kept_step = step;
            best = norm;
        }
        const int converged = best <= F->tol[r];
        const int worse = finite && !converged && norm > best;
        damp = better ? 1.0 : worse && edge ? 0.5 * damp : damp;
        if (converged && !better) code = CONVERGED;
        else if (step >= F->max_steps[r]) code = converged ? CONVERGED : MAX_STEPS;
        else if (!finite || !pd || (pointwise && worse && !edge)) {
            newton_phase = 0;
            for (int i = 0; i < P; ++i) x[i] = kept[i];
        } else {
            double cap = 1.0;
            if (P == 2) cap = fmax(fmax(fabs(d[0]), fabs(d[1])), 1.0);
            else
                for (int i = 0; i < P; ++i) cap = fmax(cap, fabs(d[i]));
            if (worse && edge) {
                x[0] = kept[0], x[1] = kept[1];
            } else if (E != NULL) {
                x[0] = x[0] + d[0] / cap * damp;
                x[1] = x[1] + d[1] / cap * damp;
            } else {
                for (int i = 0; i < P; ++i) x[i] = x[i] + d[i] / cap;
            }
            if (E != NULL && keep_finite(E, r, old, x)) { /* in the polish, Adam restarts at once */
                m1[0] = m1[1] = m2[0] = m2[1] = 0, adam_t = 0;
                landed = 0;
            }
            ++step;
        }
    }
    for (int i = 0; i < P; ++i) F->theta[P * r + i] = kept[i];
    F->loss[r] = kept_loss, F->gnorm[r] = kept_gnorm, F->steps[r] = kept_step, F->status[r] = code;
    free(heap);
}

/* fit_row_of for F's P: compiled apart for P = 2 (every 1-D fit, with its fixed-size loops). */
static void fit_row(derivatives_fn derivatives, const void *ctx, const struct fit *F, const struct region *E,
                    int pointwise, ptrdiff_t r, const double *theta0)
{
    if (F->n_params == 2) fit_row_of(2, derivatives, ctx, F, E, pointwise, r, theta0);
    else fit_row_of(F->n_params, derivatives, ctx, F, E, pointwise, r, theta0);
}

#define FIT_ARGS                                                                                    \
    const double *lr, const long *max_steps, const double *tol, const unsigned char *trusted,       \
        double beta1, double beta2, double eps, int polish, double handover, int check_every,       \
        double *theta, double *loss, double *gnorm, long *steps, long *status
#define FIT_INIT                                                                                    \
    {lr, tol, max_steps, trusted, beta1, beta2, eps, log(beta1), log(beta2), handover, polish,      \
     check_every, theta, loss, gnorm, steps, status, 2, NULL}

struct reverse_context {
    const struct rule *R;
    const struct mixture *P;
    double *edges, *nodes, *rule;
};

static void reverse_derivatives(const void *ctx, ptrdiff_t r, const double *x, int hessian, double *f,
                                double *g, double *h)
{
    const struct reverse_context *c = ctx;
    row_reverse_kl(c->R, c->P, r, x[0], x[1], hessian, c->edges, c->nodes, c->rule, f, g, h);
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
    for (ptrdiff_t r = 0; r < rows; ++r) fit_row(reverse_derivatives, &ctx, &F, NULL, 0, r, theta0);
    }
}

/* d > 1: Q = N(mean, S = L L^T) in one of the families fitted to two components with a shared
 * covariance Sigma (kl_sweep.core.reduction): KL(Q||P) = KL(q_1||p_1) + G, with q_1 = N(m, C) of
 * the projection tau = b^T (x - c 1), m = b^T (mean - c 1), C = b^T S b = |L^T b|^2, and p_1 the
 * line mixture (row r of P, as reverse_fit takes it). The same formulas, term for term, as
 * kl_sweep.core.reduction.ReducedObjective._reverse_derivatives (its docstring has the maths):
 * with s = log(C) / 2, the loss is F(m, s) + s - m^2/2 - C/2 + mu^T Sigma^-1 mu / 2
 * + tr(Sigma^-1 S) / 2 - log det S / 2 + log det Sigma / 2 - (d - 1)/2, F the 1-D reverse KL
 * (row_reverse_kl), Sigma^-1 = alpha I + beta 1 1^T. L's entries k (row_k, col_k) are set by the
 * scale parameters: full, entry k by parameter d + k (row-major lower triangle, each diagonal entry
 * as its log); diag, the diagonal, entry k by d + k (as its log); iso, every diagonal entry by
 * parameter d (as its log). O(d^2) a row for full, O(d) for diag and iso; the Hessian O(P^2). */
enum { FULL = 0, DIAG = 1, ISO = 2 };

struct reduced {
    int dim, family, n_entries;
    const long *rows, *cols;                              /* L's entries [n_entries] */
    const double *b, *centre, *alpha, *beta, *log_det_cov; /* b [rows, dim]; the rest [rows] */
};

struct reduced_context {
    const struct rule *R;
    const struct mixture *P;
    const struct reduced *D;
    double *edges, *nodes, *rule;
};

static void reduced_derivatives(const void *ctx, ptrdiff_t r, const double *x, int hessian, double *f,
                                double *g, double *h)
{
    const struct reduced_context *c = ctx;
    const struct reduced *D = c->D;
    const int d = D->dim, nE = D->n_entries, P = d + (D->family == FULL ? nE : D->family == DIAG ? d : 1);
    const double *b = D->b + (ptrdiff_t)d * r;
    const double alpha = D->alpha[r], beta = D->beta[r], centre = D->centre[r];
    double mu[d], prec_mean[d], Ltb[d], col_sum[d];
    double vals[nE], jac[nE], dc_l[nE], dc[nE], ds[nE], prec_l[nE];
    double m = 0, total = 0, maha = 0, log_det_s = 0;
    for (int i = 0; i < d; ++i) {
        mu[i] = x[i] - centre;
        m += b[i] * mu[i];
        total += mu[i];
        Ltb[i] = col_sum[i] = 0;
    }
    for (int i = 0; i < d; ++i) {
        prec_mean[i] = alpha * mu[i] + beta * total;
        maha += mu[i] * prec_mean[i];
    }
    for (int k = 0; k < nE; ++k) {
        const int diagonal = D->rows[k] == D->cols[k];
        const double psi = x[d + (D->family == ISO ? 0 : k)];
        vals[k] = diagonal ? exp(psi) : psi;
        jac[k] = diagonal ? vals[k] : 1.0;
        if (diagonal) log_det_s += 2.0 * psi;
        Ltb[D->cols[k]] += b[D->rows[k]] * vals[k];
        col_sum[D->cols[k]] += vals[k];
    }
    double C = 0, trace = 0;
    for (int i = 0; i < d; ++i) C += Ltb[i] * Ltb[i];
    for (int k = 0; k < nE; ++k) {
        prec_l[k] = alpha * vals[k] + beta * col_sum[D->cols[k]]; /* (Sigma^-1 L)_k */
        trace += vals[k] * prec_l[k];
    }
    const double s = 0.5 * log(C);
    double F, g1[2], H1[4];
    row_reverse_kl(c->R, c->P, r, m, s, hessian, c->edges, c->nodes, c->rule, &F, g1, H1);
    *f = F + s - 0.5 * m * m - 0.5 * C + 0.5 * maha + 0.5 * trace - 0.5 * log_det_s
         + 0.5 * D->log_det_cov[r] - 0.5 * (d - 1);
    const double f_m = g1[0] - m, f_s = g1[1] + 1.0 - C;
    for (int i = 0; i < d; ++i) g[i] = f_m * b[i] + prec_mean[i];
    for (int i = d; i < P; ++i) g[i] = 0;
    for (int k = 0; k < nE; ++k) {
        const int diagonal = D->rows[k] == D->cols[k];
        dc_l[k] = 2.0 * b[D->rows[k]] * Ltb[D->cols[k]];
        dc[k] = dc_l[k] * jac[k];
        ds[k] = dc[k] / (2.0 * C);
        g[d + (D->family == ISO ? 0 : k)] += f_s * ds[k] + prec_l[k] * jac[k] - diagonal;
    }
    if (!hessian) return;
    const double f_mm = H1[0] - 1.0, f_ms = H1[1], f_ss = H1[3] - 2.0 * C;
    for (int i = 0; i < P * P; ++i) h[i] = 0;
    for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j) h[i * P + j] = f_mm * b[i] * b[j] + (i == j ? alpha : 0.0) + beta;
    for (int k = 0; k < nE; ++k) {
        const int pk = d + (D->family == ISO ? 0 : k);
        for (int i = 0; i < d; ++i) {
            const double v = f_ms * b[i] * ds[k];
            h[i * P + pk] += v;
            h[pk * P + i] += v;
        }
        for (int l = 0; l < nE; ++l) {
            const int pl = d + (D->family == ISO ? 0 : l);
            double d2c = 0, d2t = 0;
            if (D->cols[k] == D->cols[l]) {
                const double jj = jac[k] * jac[l];
                d2c = 2.0 * b[D->rows[k]] * b[D->rows[l]] * jj;
                d2t = ((D->rows[k] == D->rows[l] ? alpha : 0.0) + beta) * jj;
            }
            if (k == l && D->rows[k] == D->cols[k]) {
                d2c += vals[k] * dc_l[k];
                d2t += vals[k] * prec_l[k];
            }
            const double d2s = d2c / (2.0 * C) - dc[k] * dc[l] / (2.0 * C * C);
            h[pk * P + pl] += f_ss * ds[k] * ds[l] + f_s * d2s + d2t;
        }
    }
}

/* reduced_fit: whole fits (fit_row) of the reverse KL in d > 1 (reduced_derivatives), from theta0
 * [rows, P] in the family's parameters; log_scale [P] marks its log-scale entries. */
void reduced_fit(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta0,
                 const double *means, const double *variances, const double *log_weights,
                 const double *switch_points, const double *widths,
                 int n_scale, const double *scale, int n_off, const double *off, double support,
                 int order, const double *t, const double *gw,
                 int dim, int family, int n_entries, const long *entry_rows, const long *entry_cols,
                 const double *b, const double *centre, const double *alpha, const double *beta,
                 const double *log_det_cov, int n_params, const unsigned char *log_scale, FIT_ARGS)
{
    const struct rule R = {n_scale, n_off, order, scale, off, t, gw, support};
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};
    const struct reduced D = {dim, family, n_entries, entry_rows, entry_cols, b, centre, alpha, beta, log_det_cov};
    struct fit F = FIT_INIT;
    F.n_params = n_params, F.log_scale = log_scale;
    const int max_edges = n_scale + S * n_off;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
    const struct reduced_context ctx = {&R, &P, &D, row_edges, row_nodes, row_rule};
#pragma omp for schedule(dynamic, 4)
    for (ptrdiff_t r = 0; r < rows; ++r) fit_row(reduced_derivatives, &ctx, &F, NULL, 0, r, theta0);
    }
}

/* The moment form of an integrand affine in log q under a fixed P (kl_sweep.core.fit.Objective:
 * c, m0, m1, m2 about ref, per row). */
struct moments {
    const double *c, *m0, *m1, *m2, *ref;
};

/* The same formulas as kl_sweep.core.fit.Objective._moment_derivatives:
 * L = c + m0 (s + log(2 pi) / 2) + S e^(-2 s) / 2 with d = mu - ref, S = m2 - 2 d m1 + d^2 m0. */
static void moment_derivatives(const void *ctx, ptrdiff_t r, const double *x, int hessian, double *f,
                               double *g, double *h)
{
    const struct moments *M = ctx;
    const double m = x[0], s = x[1];
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
    for (ptrdiff_t r = 0; r < rows; ++r) fit_row(moment_derivatives, &M, &F, NULL, 0, r, theta0);
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

/* ---- The alpha family and Jensen-Shannon: one kernel for every pointwise divergence ----------
 *
 * pointwise: the derivatives kl_sweep.core.objective.Objective._pointwise_derivatives computes on
 * the Quadrature rule, fused into one pass over each row's nodes; pointwise_fit: whole fits of
 * them (fit_row, with the member's finite region). The member is given by its pointwise terms
 * (t0, t1, t2): the density and its weighted derivatives in log q (kl_sweep.core.alpha), so the
 * same loop serves every member:
 *   loss = sum r t0,  grad = (sum r t1 z / sigma, sum r t1 (z^2 - 1)),
 *   hess = [[(sum r t2 z^2 - sum r t1) / sigma^2, (sum r t2 z (z^2 - 1) - 2 sum r t1 z) / sigma],
 *           [.., sum r t2 (z^2 - 1)^2 - 2 sum r t1 z^2]],
 * then the member's scale and, for Renyi, its transform (and, where int q^alpha p^(1 - alpha) is
 * far from 1, its value through that integral's log, as kl_sweep.core.objective._renyi_from_log).
 *
 * The rule: Gauss-Legendre panels between the scale points of Q and of each component, the edges
 * around the switch points and, for a outside [0.4, 0.6] (kl_sweep.core.alpha.layout), the scale
 * points of each tilted Gaussian p_k^a q^(1-a) and, for a outside [0, 1], exponential tails out of
 * each mean and each switch point (kl_sweep.core.alpha.panel_points), clipped to the support of P
 * and Q stretched to hold those points. */

/* One pointwise member: its terms, order a per row (NULL for Jensen-Shannon), scale, Renyi's alpha
 * per row (NULL: not Renyi), the tails' offsets (kl_sweep.core.alpha.TAIL_OFFSETS, REACH) and its
 * finite region (E.lo NULL: finite everywhere). */
struct member {
    int terms;
    const double *a, *alpha;
    double scale;
    int n_tail;
    const double *tail;
    double reach;
    struct region E;
};

/* kl_sweep.core.alpha.layout of order a. */
static int layout(double a)
{
    if ((a >= 0.4 && a <= 0.6) || a == 0.0 || a == 1.0) return COMPACT;
    return a < 0.0 || a > 1.0 ? TAILS : TILTED;
}

/* Appends kl_sweep.core.alpha.panel_points (absolute x) of row r at (m, s) to out[0..n); returns
 * the new count. */
static int add_tilted(double *out, int n, const struct rule *R, const struct mixture *P, const struct member *M,
                      ptrdiff_t r, double a, int tails, double m, double s)
{
    const double *mk = P->means + 2 * r, *vk = P->variances + 2 * r;
    const double inv_s2 = exp(-2.0 * s), sd = exp(s);
    const double m_lo = fmin(mk[0], mk[1]), m_hi = fmax(mk[0], mk[1]);
    const double spread = (m_hi - m_lo) + sd + sqrt(fmax(vk[0], vk[1]));
    const double lo = fmin(m_lo, m) - M->reach * spread, hi = fmax(m_hi, m) + M->reach * spread;
    const int first = n;
    double prec[2], lin[2];
    for (int k = 0; k < 2; ++k) {
        prec[k] = a / vk[k] + (1.0 - a) * inv_s2;
        lin[k] = a * mk[k] / vk[k] + (1.0 - a) * m * inv_s2;
        const int positive = prec[k] > 0;
        const double centre = positive ? lin[k] / prec[k] : m, width = positive ? 1.0 / sqrt(prec[k]) : 0.0;
        for (int i = 0; i < R->n_scale; ++i) out[n++] = centre + width * R->scale[i];
    }
    if (tails) {
        const double *sw = P->switch_points + r * P->S;
        const int S = P->S == 2 && sw[0] == sw[1] ? 1 : P->S;
        const double near_lo = lo + (M->reach - 10.0) * spread, near_hi = hi - (M->reach - 10.0) * spread;
        for (int k = 0; k < 2; ++k) {
            const double rate = prec[k] * mk[k] - lin[k], length = rate != 0 ? 1.0 / rate : 0.0;
            for (int j = 0; j < M->n_tail; ++j) out[n++] = mk[k] + length * M->tail[j];
        }
        for (int k = 0; k < 2; ++k)
            for (int j = 0; j < S; ++j) {
                const double at = clamp(sw[j], near_lo, near_hi);
                const double rate = prec[k] * at - lin[k], length = rate != 0 ? 1.0 / rate : 0.0;
                for (int i = 0; i < M->n_tail; ++i) out[n++] = at + length * M->tail[i];
            }
    }
    for (int i = first; i < n; ++i) out[i] = clamp(isfinite(out[i]) ? out[i] : m, lo, hi);
    return n;
}

/* The member's panels for row r at (m, s): nodes z[] in Q's standard units with weights rule[] for
 * integrals dx; returns their number. */
static int pointwise_panels(const struct rule *R, const struct mixture *P, const struct member *M, ptrdiff_t r,
                            double m, double s, double *edges, double *z, double *rule)
{
    const double sigma = exp(s), a = M->a != NULL ? M->a[r] : 0.0;
    const int kind = M->a != NULL ? layout(a) : COMPACT;
    const double *mk = P->means + 2 * r, *vk = P->variances + 2 * r;
    const double sd0 = sqrt(vk[0]), sd1 = sqrt(vk[1]);
    /* The support of P and Q as offsets from m, stretched to the tilted points. */
    double lo = fmin(-R->support * sigma, fmin((mk[0] - m) - R->support * sd0, (mk[1] - m) - R->support * sd1));
    double hi = fmax(R->support * sigma, fmax((mk[0] - m) + R->support * sd0, (mk[1] - m) + R->support * sd1));
    int ne = 0;
    for (int i = 0; i < R->n_scale; ++i) edges[ne++] = sigma * R->scale[i];
    for (int k = 0; k < 2; ++k) {
        const double c = mk[k] - m, sd = k ? sd1 : sd0;
        for (int i = 0; i < R->n_scale; ++i) edges[ne++] = c + sd * R->scale[i];
    }
    ne = add_switch_edges(edges, ne, P->S, P->switch_points + r * P->S, P->widths + r * P->S, m, R->n_off,
                          R->off);
    if (kind != COMPACT) {
        const int first = ne;
        ne = add_tilted(edges, ne, R, P, M, r, a, kind == TAILS, m, s);
        for (int i = first; i < ne; ++i) {
            edges[i] -= m;
            lo = fmin(lo, edges[i]);
            hi = fmax(hi, edges[i]);
        }
    }
    for (int i = 0; i < ne; ++i) edges[i] = clamp(edges[i], lo, hi) / sigma;
    sort_edges(edges, ne);
    /* Points clipped to the same end stack up: a zero-width panel adds nothing, so it is left out. */
    int distinct = ne > 0;
    for (int i = 1; i < ne; ++i)
        if (edges[i] != edges[distinct - 1]) edges[distinct++] = edges[i];
    return panels(edges, distinct, R->order, R->t, R->gw, sigma, z, rule);
}

/* The largest of x[0..n), passing over NaN as fmax does (a loop of its own: GCC vectorises no
 * max-reduction in a loop that calls a vector function). */
static inline double largest(int n, const double *x)
{
    double top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int i = 0; i < n; ++i) top = x[i] > top ? x[i] : top;
    return top;
}

/* Renyi's log terms log(r q^alpha p^(1 - alpha)) of each node over log p in aux[], tilt =
 * 1 - alpha; returns the largest (a NaN term is passed over, as fmax does). Every weight r is
 * positive (pointwise_panels leaves zero-width panels out). Apart from row_pointwise, so that its
 * loop is vectorised. */
static double renyi_log_terms(int n, const double *z, const double *rule, double cq, double tilt, double *aux)
{
#pragma omp simd
    for (int i = 0; i < n; ++i) {
        const double log_q = cq - 0.5 * z[i] * z[i];
        aux[i] = vector_log(rule[i]) + log_q + tilt * (aux[i] - log_q);
    }
    return largest(n, aux);
}

/* The member's loss, gradient and (if asked) Hessian for row r at (m, s); scratch: edges, z, rule
 * and aux (Renyi's log terms), each as large as pointwise_fit sizes them. Never inlined (see
 * row_reverse_kl). */
__attribute__((noinline)) static void
row_pointwise(const struct rule *R, const struct mixture *P, const struct member *M, ptrdiff_t r, double m,
              double s, int hessian, double *edges, double *z, double *rule, double *aux, double *loss,
              double *g, double *h)
{
    const double sigma = exp(s), a = M->a != NULL ? M->a[r] : 0.0;
    const int n = pointwise_panels(R, P, M, r, m, s, edges, z, rule);
    const struct standard u = standardise(P, r, m, s, sigma);
    const double cq = u.cq;
    double sums[7];
    double *log_p_at = M->alpha != NULL ? aux : NULL; /* (Renyi's log terms need log p) */
    if (M->terms == JENSEN_SHANNON_TERMS)
        node_sums(JENSEN_SHANNON_TERMS, 0, a, n, z, rule, &u, log_p_at, sums);
    else if (a <= 0.5) node_sums(ALPHA_TERMS, 0, a, n, z, rule, &u, log_p_at, sums);
    else node_sums(ALPHA_TERMS, 1, a, n, z, rule, &u, log_p_at, sums);
    const double t0_sum = sums[0], a_sum = sums[1], az = sums[2], azz = sums[3], bzz = sums[4];
    const double bzzz = sums[5], bzz1 = sums[6];
    const int renyi = M->alpha != NULL;
    const double k = M->scale;
    double f = k * t0_sum;
    g[0] = k * (az / sigma);
    g[1] = k * (azz - a_sum);
    double hm = 0, hx = 0, hs = 0;
    if (hessian) {
        hm = k * ((bzz - a_sum) / (sigma * sigma));
        hx = k * ((bzzz - 2.0 * az) / sigma);
        hs = k * (bzz1 - 2.0 * azz);
    }
    if (renyi) { /* kl_sweep.core.divergences.renyi_from_alpha, then the far branch */
        const double alpha = M->alpha[r], c = alpha * (1.0 - alpha), y = -c * f;
        const double ratio = y == 0 ? 1.0 : log1p(y) / y, integral = 1.0 + y;
        const double d1 = alpha / integral, d2 = alpha * c / (integral * integral);
        f = alpha * f * ratio;
        hm = d1 * hm + d2 * g[0] * g[0];
        hx = d1 * hx + d2 * g[0] * g[1];
        hs = d1 * hs + d2 * g[1] * g[1];
        g[0] = d1 * g[0], g[1] = d1 * g[1];
        /* log int q^alpha p^(1 - alpha) by log-sum-exp of the nodes' log terms (in aux, over log p). */
        const double tilt = 1.0 - alpha;
        const double top = renyi_log_terms(n, z, rule, cq, tilt, aux);
        double sum = 0;
        for (int i = 0; i < n; ++i) sum += exp(aux[i] - top);
        const double log_i = top + log(sum), inv = 1.0 / (alpha - 1.0), far = log_i * inv;
        if (!(fabs(far * (alpha - 1.0)) < RENYI_NEAR)) {
            double ez = 0, ezz = 0, ed = 0, ezd = 0, edd = 0;
            for (int i = 0; i < n; ++i) {
                const double pi = exp(aux[i] - log_i), zi = z[i], zz = zi * zi, zz1 = zz - 1.0;
                ez += pi * zi, ezz += pi * zz, ed += pi * zz1, ezd += pi * zi * zz1, edd += pi * zz1 * zz1;
            }
            f = far;
            g[0] = alpha * inv * (ez / sigma);
            g[1] = alpha * inv * (ezz - 1.0);
            hm = inv * (alpha * alpha * ((ezz - ez * ez) / (sigma * sigma)) - alpha / (sigma * sigma));
            hx = inv * (alpha * alpha * ((ezd - ez * ed) / sigma) - 2 * alpha * ez / sigma);
            hs = inv * (alpha * alpha * (edd - ed * ed) - 2 * alpha * ezz);
        }
    }
    if (M->E.lo != NULL && !finite_at(&M->E, r, m, s)) f = INFINITY;
    *loss = f;
    if (hessian) h[0] = hm, h[1] = h[2] = hx, h[3] = hs;
}

/* E(y)/y = y/2! + y^2/3! + ... for |y| < 0.05 (kl_sweep.core.alpha._excess_over). */
static inline double excess_over(double y)
{
    double out = 1.0 / 362880.0; /* 1/9! */
    const double inverse_factorials[] = {1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5};
    for (int k = 0; k < 7; ++k) out = out * y + inverse_factorials[k];
    return out * y;
}

/* w E(c x) / c with w = e^log_w (kl_sweep.core.alpha._weighted_excess). */
static inline double weighted_excess(double log_w, double x, double c)
{
    const double y = c * x, w = exp(log_w);
    return fabs(y) < 0.05 ? w * x * excess_over(y) : (exp(log_w + y) - w) / c - w * x;
}

/* D_a's non-negative pointwise density (kl_sweep.core.alpha.alpha_density): what reported values
 * integrate, exact for tiny and huge values alike. */
static inline double alpha_density(double log_p, double log_q, double a)
{
    const int mirror = a > 0.5;
    const double c = mirror ? 1.0 - a : a, log_w = mirror ? log_p : log_q;
    const double x = mirror ? log_q - log_p : log_p - log_q;
    return (weighted_excess(log_w, x, 1.0) - weighted_excess(log_w, x, c)) / (1.0 - c);
}

/* The node sums of a row's value (pointwise_value): *d = sum r density (r > 0: pointwise_panels
 * leaves zero-width panels out), and, for Renyi (renyi), each node's log(r q^alpha p^(1 - alpha))
 * written over z[] (no longer needed) and their largest, *top. The plain exp here: a reported
 * value keeps every density that does not underflow. terms and renyi are constants at each call:
 * each case gets its own vectorised loop. */
static inline __attribute__((always_inline)) void
value_sums(const int terms, const int renyi, double a, int n, double *z, const double *rule,
           const struct standard *u, double *d_out, double *top_out)
{
    const double cq = u->cq, tilt = 1.0 - (1.0 - a); /* (as torch forms it) */
    double d = 0;
#pragma omp simd reduction(+ : d)
    for (int i = 0; i < n; ++i) {
        const double zi = z[i], w = rule[i];
        const double log_q = cq - 0.5 * zi * zi;
        const double e0 = u->shift0 + zi * u->slope0, e1 = u->shift1 + zi * u->slope1;
        const double l0 = u->c0 - e0 * e0, l1 = u->c1 - e1 * e1;
        const double hi = l0 > l1 ? l0 : l1, lo = l0 > l1 ? l1 : l0;
        const double log_p = hi + log1p(exp(lo - hi));
        double density, t1, t2;
        if (terms == JENSEN_SHANNON_TERMS) jensen_shannon_terms(log_p, log_q, &density, &t1, &t2);
        else density = alpha_density(log_p, log_q, a);
        d += w > 0 ? w * density : 0.0;
        if (renyi) {
            z[i] = vector_log(w) + log_q + tilt * (log_p - log_q);
        }
    }
    *d_out = d, *top_out = renyi ? largest(n, z) : -INFINITY;
}

#define POINTWISE_ARGS                                                                              \
    int terms, const double *a, const double *alpha, double scale, int n_tail, const double *tail,  \
        double reach, const double *lo, const double *hi, const double *left, const double *right,  \
        const unsigned char *steep
#define POINTWISE_INIT {terms, a, alpha, scale, n_tail, tail, reach, {lo, hi, left, right, steep}}

/* The largest number of panel edges of a row: Q's and both components' scale points, the switch
 * edges, the tilted Gaussians' scale points and the tails. */
#define POINTWISE_EDGES(n_scale, S, n_off, n_tail) (5 * (n_scale) + (S) * (n_off) + 2 * (n_tail) * (1 + (S)))

/* The rule, P, the member and the scratch size of a pointwise entry point, from its arguments. */
#define POINTWISE_SETUP                                                                             \
    const struct rule R = {n_scale, n_off, order, scale_points, off, t, gw, support};               \
    const struct mixture P = {S, means, variances, log_weights, switch_points, widths};             \
    const struct member M = POINTWISE_INIT;                                                          \
    const int max_edges = POINTWISE_EDGES(n_scale, S, n_off, n_tail)

/* pointwise: the member's loss, gradient and (if hessian) Hessian for rows of theta [rows, 2]. */
void pointwise(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta,
               const double *means, const double *variances, const double *log_weights,
               const double *switch_points, const double *widths,
               int n_scale, const double *scale_points, int n_off, const double *off, double support,
               int order, const double *t, const double *gw, POINTWISE_ARGS,
               int hessian, double *loss, double *grad, double *hess)
{
    POINTWISE_SETUP;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
    double row_aux[(max_edges - 1) * order];
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r)
        row_pointwise(&R, &P, &M, r, theta[2 * r], theta[2 * r + 1], hessian, row_edges, row_nodes, row_rule,
                      row_aux, loss + r, grad + 2 * r, hessian ? hess + 4 * r : NULL);
    }
}

struct pointwise_context {
    const struct rule *R;
    const struct mixture *P;
    const struct member *M;
    double *edges, *nodes, *rule, *aux;
};

static void pointwise_derivatives(const void *ctx, ptrdiff_t r, const double *x, int hessian, double *f,
                                  double *g, double *h)
{
    const struct pointwise_context *c = ctx;
    row_pointwise(c->R, c->P, c->M, r, x[0], x[1], hessian, c->edges, c->nodes, c->rule, c->aux, f, g, h);
}

/* pointwise_fit: whole fits of the member (fit_row, within its finite region), from theta0 [rows, 2]. */
void pointwise_fit(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta0,
                   const double *means, const double *variances, const double *log_weights,
                   const double *switch_points, const double *widths,
                   int n_scale, const double *scale_points, int n_off, const double *off, double support,
                   int order, const double *t, const double *gw, POINTWISE_ARGS, FIT_ARGS)
{
    POINTWISE_SETUP;
    const struct fit F = FIT_INIT;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
    double row_aux[(max_edges - 1) * order];
    const struct pointwise_context ctx = {&R, &P, &M, row_edges, row_nodes, row_rule, row_aux};
#pragma omp for schedule(dynamic, 4)
    for (ptrdiff_t r = 0; r < rows; ++r)
        fit_row(pointwise_derivatives, &ctx, &F, M.E.lo != NULL ? &M.E : NULL, 1, r, theta0);
    }
}

/* pointwise_value: the member's value at each row of theta [rows, 2], as
 * kl_sweep.core.divergences.divergence_value computes it on the Quadrature rule: the integral of
 * its pointwise density (not the fit's t0, which loses digits where P and Q nearly agree), scaled;
 * Renyi from D where |log I| < log 2 and from log I elsewhere; +inf outside the finite region. */
void pointwise_value(ptrdiff_t rows, ptrdiff_t min_rows, int S, const double *theta,
                     const double *means, const double *variances, const double *log_weights,
                     const double *switch_points, const double *widths,
                     int n_scale, const double *scale_points, int n_off, const double *off, double support,
                     int order, const double *t, const double *gw, POINTWISE_ARGS, double *value)
{
    POINTWISE_SETUP;
#pragma omp parallel if (rows >= min_rows)
    {
    SCRATCH(row, max_edges, order);
#pragma omp for schedule(static)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        const double m = theta[2 * r], s = theta[2 * r + 1], sigma = exp(s);
        const double a = M.a != NULL ? M.a[r] : 0.0;
        const int n = pointwise_panels(&R, &P, &M, r, m, s, row_edges, row_nodes, row_rule);
        const struct standard u = standardise(&P, r, m, s, sigma);
        const int renyi = M.alpha != NULL;
        double d, top;
        if (M.terms == JENSEN_SHANNON_TERMS)
            value_sums(JENSEN_SHANNON_TERMS, 0, a, n, row_nodes, row_rule, &u, &d, &top);
        else if (renyi) value_sums(ALPHA_TERMS, 1, a, n, row_nodes, row_rule, &u, &d, &top);
        else value_sums(ALPHA_TERMS, 0, a, n, row_nodes, row_rule, &u, &d, &top);
        d *= M.scale;
        if (renyi) {
            double sum = 0;
            for (int i = 0; i < n; ++i) sum += exp(row_nodes[i] - top);
            const double log_i = top + log(sum), alpha = M.alpha[r];
            if (fabs(log_i) < RENYI_NEAR) {
                const double c = alpha * (1.0 - alpha), y = -c * d;
                d = alpha * d * (y == 0 ? 1.0 : log1p(y) / y);
            } else {
                d = log_i / (alpha - 1.0);
            }
        }
        value[r] = M.E.lo != NULL && !finite_at(&M.E, r, m, s) ? INFINITY : d;
    }
    }
}

/* ---- Stochastic VI: fresh Monte Carlo draws every step (kl_sweep.core.stochastic) ---------------
 *
 * stochastic_fit runs each row's whole stochastic fit by the rules of fit_stochastic's torch loop:
 * at update t the draws of (key, seed, t) from Philox4x32-10 (kl_sweep.core.counter: the same
 * counters, words and Box-Muller), the gradient of the registry's Monte Carlo estimate of the
 * divergence in theta = (mu, log sigma), Adam at lr or lr (1 + t / decay_steps)^-decay, the sum of
 * the iterates from update `start` on, and the count of changes of the nearest exact minimum.
 *
 * One gradient for every divergence. Each estimate is a function Phi of the draws' log ratios
 * delta = log p - log q (kl_sweep.core.divergences._monte_carlo); only dPhi/d delta_j = g_j is the
 * member's own (mc_weights, the counterpart of alpha_terms). Then grad = sum_j g_j d delta_j/d theta,
 * with, at a draw x = mu + sigma z of Q (reparameterised),
 *   d delta/d mu = p'(x),                 d delta/d s = p'(x) sigma z + 1         (log q live),
 *   d delta/d mu = p'(x) + z / sigma,     d delta/d s = (p'(x) + z / sigma) sigma z  (held: "stl"),
 * and at a draw x of P (which does not move with theta), with z = (x - mu) / sigma,
 *   d delta/d mu = -z / sigma,            d delta/d s = 1 - z^2,
 * where p' = d log p / dx. Outside the alpha family's finite region the estimate is +inf, and its
 * gradient (as torch.where gives it) zero.
 */

#define STREAM_Q 0
#define STREAM_P 1
#define STREAM_COMPONENT 2
enum { MC_REVERSE = 0, MC_FORWARD = 1, MC_ALPHA = 2, MC_RENYI = 3, MC_JENSEN_SHANNON = 4 };

/* Philox4x32-10 of counter c[4] under key (k0, k1), in place (kl_sweep.core.counter.philox4x32). */
static inline void philox(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; ++r) {
        if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        const uint64_t p0 = (uint64_t)c[0] * 0xD2511F53u, p1 = (uint64_t)c[2] * 0xCD9E8D57u;
        const uint32_t c1 = c[1], c3 = c[3];
        c[0] = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        c[1] = (uint32_t)p1;
        c[2] = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c[3] = (uint32_t)p0;
    }
}

/* A double in (0, 1) from 27 + 26 bits of two words (kl_sweep.core.counter._unit). */
static inline double unit(uint32_t hi, uint32_t lo)
{
    return ((double)((uint64_t)(hi >> 5) * 67108864u + (lo >> 6)) + 0.5) * 0x1p-53;
}

/* n draws of a row at a step and stream: normals (Box-Muller) or uniforms, as kl_sweep.core.counter. */
static void counter_draws(uint64_t key, uint64_t seed, long step, int stream, int n, int normal, double *out)
{
    for (int j = 0; 2 * j < n; ++j) {
        uint32_t c[4] = {(uint32_t)step, (uint32_t)j | ((uint32_t)stream << 28), (uint32_t)seed,
                         (uint32_t)(seed >> 32)};
        philox(c, (uint32_t)key, (uint32_t)(key >> 32));
        const double ua = unit(c[0], c[1]), ub = unit(c[2], c[3]);
        double first = ua, second = ub;
        if (normal) {
            const double r = sqrt(-2.0 * log(ua)), angle = (2.0 * M_PI) * ub;
            first = r * cos(angle), second = r * sin(angle);
        }
        out[2 * j] = first;
        if (2 * j + 1 < n) out[2 * j + 1] = second;
    }
}

/* log p(x) of row r's K-component P and its derivative in x: c[k] = log w_k - log(2 pi v_k) / 2. */
static inline double mixture_log_prob(int K, const double *m, const double *iv, const double *c, double x,
                                      double *slope)
{
    double top = -INFINITY, e[K];
    for (int k = 0; k < K; ++k) {
        const double d = x - m[k];
        e[k] = c[k] - 0.5 * d * d * iv[k];
        top = fmax(top, e[k]);
    }
    double sum = 0, pull = 0;
    for (int k = 0; k < K; ++k) {
        const double w = exp(e[k] - top);
        sum += w;
        pull -= w * (x - m[k]) * iv[k];
    }
    *slope = pull / sum;
    return top + log(sum);
}

/* dPhi/d delta at one draw of a member's estimate whose value is a mean (all but Renyi's). */
static inline double mc_weight(int form, int under_p, double a, double scale, double delta, double n)
{
    switch (form) {
    case MC_REVERSE: return -1.0 / n;
    case MC_FORWARD: return 1.0 / n;
    case MC_ALPHA: /* E_Q[-expm1(a delta)] / (a (1 - a)) for a <= 1/2, E_P[-expm1(-(1 - a) delta)] / ... */
        return under_p ? scale * exp(-(1.0 - a) * delta) / (a * n) : -scale * exp(a * delta) / ((1.0 - a) * n);
    default: /* Jensen-Shannon: 1/2 E_P[log 2 - softplus(-delta)] + 1/2 E_Q[log 2 - softplus(delta)] */
        return under_p ? 0.5 / (1.0 + exp(delta)) / n : -0.5 / (1.0 + exp(-delta)) / n;
    }
}

/* The gradient g[2] of row r's estimate at (m, s) on the draws of step t; scratch holds 3 n doubles. */
static void mc_gradient(int form, int stick, int n, int K, const double *mean, const double *var,
                        const double *iv, const double *c, const double *cum, double a, double scale, uint64_t key, uint64_t seed, long t,
                        double m, double s, double *scratch, double g[2])
{
    const double sigma = exp(s);
    double gm = 0, gs = 0;
    const int q = form != MC_FORWARD && !(form == MC_ALPHA && a > 0.5);
    const int p = form == MC_FORWARD || form == MC_JENSEN_SHANNON || (form == MC_ALPHA && a > 0.5);
    if (q) { /* draws of Q: x = m + sigma z */
        double *z = scratch, *dm = scratch + n, *ds = scratch + 2 * n;
        counter_draws(key, seed, t, STREAM_Q, n, 1, z);
        double top = -INFINITY;
        for (int j = 0; j < n; ++j) {
            const double x = m + sigma * z[j];
            double slope;
            const double log_p = mixture_log_prob(K, mean, iv, c, x, &slope);
            const double log_q = -0.5 * (LOG_2PI + z[j] * z[j]) - s;
            const double delta = log_p - log_q;
            if (stick) dm[j] = slope + z[j] / sigma, ds[j] = dm[j] * sigma * z[j];
            else dm[j] = slope, ds[j] = slope * sigma * z[j] + 1.0;
            if (form == MC_RENYI) {
                z[j] = a * delta; /* (b delta, b = 1 - alpha = a: the log-mean-exp's terms) */
                top = fmax(top, z[j]);
            } else {
                const double w = mc_weight(form, 0, a, scale, delta, n);
                gm += w * dm[j], gs += w * ds[j];
            }
        }
        if (form == MC_RENYI) { /* -(1/b) log mean e^(b delta): weights -softmax(b delta), -1/n at b = 0 */
            double sum = 0;
            for (int j = 0; j < n; ++j) sum += z[j] = a == 0 ? 1.0 : exp(z[j] - top);
            for (int j = 0; j < n; ++j) gm -= z[j] / sum * dm[j], gs -= z[j] / sum * ds[j];
        }
    }
    if (p) { /* draws of P: a component by inverse CDF of a uniform, then its normal */
        double *eps = scratch, *u = scratch + n;
        counter_draws(key, seed, t, STREAM_P, n, 1, eps);
        counter_draws(key, seed, t, STREAM_COMPONENT, n, 0, u);
        for (int j = 0; j < n; ++j) {
            int k = 0;
            while (k < K - 1 && cum[k] < u[j]) ++k;
            const double x = mean[k] + sqrt(var[k]) * eps[j];
            double slope;
            const double log_p = mixture_log_prob(K, mean, iv, c, x, &slope);
            const double zq = (x - m) / sigma;
            const double log_q = -0.5 * (LOG_2PI + zq * zq) - s;
            const double w = mc_weight(form, 1, a, scale, log_p - log_q, n);
            gm += w * (-zq / sigma), gs += w * (1.0 - zq * zq);
        }
    }
    g[0] = gm, g[1] = gs;
}

/* The index of the exact minimum nearest theta among M (NaN-padded) in (mu, log sigma); -1 if none
 * (kl_sweep.core.stochastic.place). */
static inline long nearest(const double *minima, int M, double m, double s)
{
    long best = -1;
    double least = INFINITY;
    for (int i = 0; i < M; ++i) {
        const double dm = minima[2 * i] - m, ds = minima[2 * i + 1] - s;
        const double d = sqrt(dm * dm + ds * ds);
        if (d < least) least = d, best = i;
    }
    return best;
}

/* stochastic_fit: every row's stochastic fit from theta [rows, 2] (updated in place to the last
 * iterate); total [rows, 2] gets the sum of the iterates of updates start..budget-1, steps the
 * updates made, alive 0 where an iterate stopped being finite or in bounds (the row keeps its last
 * good iterate), crossings the changes of the nearest of minima [rows, M, 2]. Rows with alive 0 on
 * entry (an infinite divergence at the start) are left as they are. */
void stochastic_fit(ptrdiff_t rows, ptrdiff_t min_rows, int K, const double *means, const double *variances,
                    const double *log_weights, const double *cum_weights, const int64_t *keys, const int64_t *seeds,
                    int form, const double *order, double scale, const double *lo, const double *hi,
                    const double *left, const double *right, int stick, int n, const double *lr, const long *budget,
                    const long *start, double beta1, double beta2, double eps, int decaying, double decay,
                    double decay_steps, int M, const double *minima, double *theta, double *total, long *steps,
                    unsigned char *alive, long *crossings)
{
    const struct region E = {lo, hi, left, right, NULL};
    const double log_beta1 = log(beta1), log_beta2 = log(beta2);
#pragma omp parallel if (rows >= min_rows)
    {
    double *scratch = malloc(3 * (size_t)(n > 0 ? n : 1) * sizeof(double));
    double iv[K], c[K];
#pragma omp for schedule(dynamic, 16)
    for (ptrdiff_t r = 0; r < rows; ++r) {
        if (scratch == NULL) { /* no memory for the draws: the row ends as diverged, at its start */
            total[2 * r] = total[2 * r + 1] = 0.0, steps[r] = 0, alive[r] = 0, crossings[r] = 0;
            continue;
        }
        const double *mean = means + r * K, *row_minima = minima + r * 2 * M;
        for (int k = 0; k < K; ++k) {
            iv[k] = 1.0 / variances[r * K + k];
            c[k] = log_weights[r * K + k] - 0.5 * (LOG_2PI + log(variances[r * K + k]));
        }
        const double a = order != NULL ? order[r] : 0.0;
        double x[2] = {theta[2 * r], theta[2 * r + 1]}, mo[2] = {0, 0}, v[2] = {0, 0}, sum[2] = {0, 0};
        long label = nearest(row_minima, M, x[0], x[1]), moved = 0, changes = 0;
        int ok = alive[r];
        for (long t = 0; ok && t < budget[r]; ++t) {
            double g[2] = {0, 0};
            if (lo == NULL || finite_at(&E, r, x[0], x[1]))
                mc_gradient(form, stick, n, K, mean, variances + r * K, iv, c, cum_weights + r * K, a, scale, (uint64_t)keys[r],
                            (uint64_t)seeds[r], t, x[0], x[1], scratch, g);
            const double rate = decaying ? lr[r] * pow(1.0 + (double)t / decay_steps, -decay) : lr[r];
            const double count = (double)(t + 1);
            double next[2];
            for (int i = 0; i < 2; ++i) { /* kl_sweep.core.optim.Adam.step */
                mo[i] = mo[i] * beta1 + (1 - beta1) * g[i];
                v[i] = v[i] * beta2 + (1 - beta2) * (g[i] * g[i]);
                const double m_hat = mo[i] / -expm1(count * log_beta1), v_hat = v[i] / -expm1(count * log_beta2);
                next[i] = x[i] - rate * m_hat / (sqrt(v_hat) + eps);
            }
            ok = isfinite(g[0]) && isfinite(g[1]) && isfinite(next[0]) && isfinite(next[1])
                 && fabs(next[0]) < MAX_ABS_MU && fabs(next[1]) < MAX_ABS_LOG_SIGMA;
            if (!ok) break;
            x[0] = next[0], x[1] = next[1];
            ++moved;
            if (t >= start[r]) sum[0] += x[0], sum[1] += x[1];
            const long now = nearest(row_minima, M, x[0], x[1]);
            changes += now != label;
            label = now;
        }
        theta[2 * r] = x[0], theta[2 * r + 1] = x[1];
        total[2 * r] = sum[0], total[2 * r + 1] = sum[1];
        steps[r] = moved, alive[r] = (unsigned char)ok, crossings[r] = changes;
    }
    free(scratch);
    }
}
