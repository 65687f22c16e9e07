"""Statistics on fixed-edge histograms: the tests and effect sizes behind the drift monitor.

Every function takes plain counts (``len(edges) + 1`` entries: underflow bin, the bins
between the edges, overflow bin), so the same code runs on one device's window and on a
fleet-wide sum of windows. Pure and NumPy-only: the chi-square survival function and the
Kolmogorov distribution are written out here (scipy is not a dependency).

- ``chi_square``: two-sample chi-square test of homogeneity (window vs reference).
- ``ks_from_histograms``: two-sample Kolmogorov-Smirnov on the binned CDFs.
- ``psi``, ``jensen_shannon``, ``wasserstein``: effect sizes; their thresholds come from
  ``calibrate_effect_thresholds`` (chance level for a window of the same size).
- ``cbpe``: label-free accuracy estimate from the P(defect) histogram and sums of p;
  ``reference_defect_rate``: the fail rate a reference profile's histogram implies.
- ``benjamini_hochberg``: false discovery rate control across many p-values.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.protocol.manifest import ReferenceProfile

Floats = npt.NDArray[np.float64]

# Chi-square's approximation needs about 5 expected frames per cell; sparser
# neighbouring bins are pooled until each group reaches this.
MIN_EXPECTED = 5.0
# Pseudo-count per bin for PSI, whose log ratio is infinite on an empty bin.
PSI_PSEUDO_COUNT = 0.5


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square with ``dof`` degrees of freedom (1 for dof <= 0)."""
    if dof <= 0 or x <= 0.0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x): a series below a + 1, a continued
    fraction (modified Lentz) above, as in Numerical Recipes' gammq."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def kolmogorov_sf(lam: float) -> float:
    """P(K >= lam) for the Kolmogorov distribution (limit of sqrt(n) * D_n)."""
    if lam <= 0.0:
        return 1.0
    if lam < 1.0:
        # The alternating series converges slowly for small lam; use the Jacobi form.
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8.0 * lam * lam)) for k in range(1, 8))
        return max(0.0, min(1.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = 0.0
    for k in range(1, 101):
        term = math.exp(-2.0 * k * k * lam * lam)
        s += term if k % 2 else -term
        if term < 1e-18:
            break
    return max(0.0, min(1.0, 2.0 * s))


def _pair(counts: Sequence[float], ref_counts: Sequence[float]) -> tuple[Floats, Floats]:
    a = np.asarray(counts, dtype=np.float64)
    b = np.asarray(ref_counts, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"histograms differ in shape: {a.shape} vs {b.shape}")
    if np.any(a < 0) or np.any(b < 0):
        raise ValueError("counts must be >= 0")
    return a, b


def chi_square(counts: Sequence[float], ref_counts: Sequence[float]) -> tuple[float, int, float]:
    """Two-sample chi-square test of homogeneity between two histograms on the same edges.

    Both histograms are samples (the reference too), so this is the 2 x B contingency
    test, not goodness of fit against the reference proportions taken as exact. Bins are
    pooled with their right neighbours until each group expects MIN_EXPECTED frames in
    both rows (a short last group joins the one before it); bins empty in both are
    dropped. Returns ``(statistic, dof, p_value)``; ``(0.0, 0, 1.0)`` when an input is
    empty or everything falls into one group.

    Raises:
        ValueError: different lengths or a negative count.
    """
    a, b = _pair(counts, ref_counts)
    n, m = float(a.sum()), float(b.sum())
    if n == 0.0 or m == 0.0:
        return 0.0, 0, 1.0
    share = min(n, m) / (n + m)
    groups: list[tuple[float, float]] = []
    ga = gb = 0.0
    for ca, cb in zip(a, b, strict=True):
        ga, gb = ga + ca, gb + cb
        if (ga + gb) * share >= MIN_EXPECTED:
            groups.append((ga, gb))
            ga = gb = 0.0
    if ga + gb > 0.0:
        if groups:
            last_a, last_b = groups.pop()
            groups.append((last_a + ga, last_b + gb))
        else:
            groups.append((ga, gb))
    if len(groups) < 2:
        return 0.0, 0, 1.0
    g = np.asarray(groups)
    totals = g.sum(axis=1)
    expected = np.outer(totals, [n, m]) / (n + m)
    stat = float(((g - expected) ** 2 / expected).sum())
    dof = len(groups) - 1
    return stat, dof, chi2_sf(stat, dof)


@functools.lru_cache(maxsize=256)
def chi2_critical(alpha: float, dof: int) -> float:
    """The x with chi2_sf(x, dof) == alpha (bisection, cached); inf for dof <= 0."""
    if dof <= 0:
        return math.inf
    lo, hi = 0.0, float(dof) + 10.0
    while chi2_sf(hi, dof) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if chi2_sf(mid, dof) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def ks_from_histograms(counts: Sequence[float], ref_counts: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test on binned data: ``(D, p_value)``.

    D is the largest gap between the two empirical CDFs at the bin edges (the only points
    where binned CDFs are known); the p-value is the asymptotic Kolmogorov one with
    effective size n*m/(n+m) and Stephens' small-sample correction. Binning can only hide
    differences, so on binned data the test is conservative. ``(0.0, 1.0)`` when an
    input is empty.

    Raises:
        ValueError: different lengths or a negative count.
    """
    a, b = _pair(counts, ref_counts)
    n, m = float(a.sum()), float(b.sum())
    if n == 0.0 or m == 0.0:
        return 0.0, 1.0
    d = float(np.max(np.abs(np.cumsum(a) / n - np.cumsum(b) / m)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def ks_critical(alpha: float, n: float, m: float) -> float:
    """The D at which ``ks_from_histograms`` on samples of n and m frames gives alpha."""
    en = math.sqrt(n * m / (n + m))
    return _kolmogorov_isf(alpha) / (en + 0.12 + 0.11 / en)


@functools.lru_cache(maxsize=256)
def _kolmogorov_isf(alpha: float) -> float:
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if kolmogorov_sf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def _proportions(c: Floats, pseudo: float = 0.0) -> Floats:
    total = c.sum(axis=-1, keepdims=True) + pseudo * c.shape[-1]
    out: Floats = (c + pseudo) / np.where(total > 0, total, 1.0)
    return out


def _psi(a: Floats, b: Floats) -> Floats:
    p, q = _proportions(a, PSI_PSEUDO_COUNT), _proportions(b, PSI_PSEUDO_COUNT)
    out: Floats = ((p - q) * np.log(p / q)).sum(axis=-1)
    return out


def _js(a: Floats, b: Floats) -> Floats:
    p, q = _proportions(a), _proportions(b)
    mid = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = np.where(p > 0, p * np.log2(p / mid), 0.0)
        kq = np.where(q > 0, q * np.log2(q / mid), 0.0)
    out: Floats = 0.5 * (kp.sum(axis=-1) + kq.sum(axis=-1))
    return out


def _wasserstein(a: Floats, b: Floats, edges: Floats) -> Floats:
    # CDF difference at each edge; the mass of an inner bin is spread evenly over it, so
    # the gap is linear between edges and its integral is exact. Under- and overflow
    # bins are point masses at the first and last edge.
    gap = np.cumsum(_proportions(a) - _proportions(b), axis=-1)[..., :-1]
    left, right = gap[..., :-1], gap[..., 1:]
    width = np.diff(edges)
    same_sign = left * right >= 0
    span = np.abs(left) + np.abs(right)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.where(span > 0, (left * left + right * right) / (2.0 * span), 0.0)
    area = np.where(same_sign, 0.5 * span, crossing)
    out: Floats = (area * width).sum(axis=-1)
    return out


def psi(counts: Sequence[float], ref_counts: Sequence[float]) -> float:
    """Population stability index, sum (p - q) ln(p / q), with PSI_PSEUDO_COUNT frames
    added to every bin of both histograms (an empty bin would make it infinite)."""
    a, b = _pair(counts, ref_counts)
    return float(_psi(a, b))


def jensen_shannon(counts: Sequence[float], ref_counts: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits (0 = same proportions, 1 = disjoint)."""
    a, b = _pair(counts, ref_counts)
    return float(_js(a, b))


def wasserstein(
    counts: Sequence[float], ref_counts: Sequence[float], edges: Sequence[float]
) -> float:
    """Earth mover's distance between two histograms, in the feature's own units.

    Raises:
        ValueError: shapes differ, or counts do not have ``len(edges) + 1`` entries.
    """
    a, b = _pair(counts, ref_counts)
    e = np.asarray(edges, dtype=np.float64)
    if a.shape[0] != e.shape[0] + 1:
        raise ValueError(f"{a.shape[0]} counts for {e.shape[0]} edges (need len(edges) + 1)")
    return float(_wasserstein(a, b, e))


@dataclass(frozen=True, slots=True)
class EffectThresholds:
    """Chance level of each effect size for windows of ``frames`` frames of one feature:
    mean + z standard deviations over windows drawn from the reference itself."""

    frames: int
    psi: float
    js: float
    wasserstein: float


def calibrate_effect_thresholds(
    reference: ReferenceProfile,
    n_frames: int,
    rng: np.random.Generator,
    *,
    draws: int = 200,
    z: float = 3.0,
) -> dict[str, EffectThresholds]:
    """Effect-size thresholds per feature for windows of ``n_frames`` frames.

    Each draw compares a window of ``n_frames`` and a reference of the reference's size,
    both sampled from the reference histogram: the spread both samples show when nothing
    has changed. A fixed threshold (PSI 0.1) ignores the window size and fires on most
    small windows; this one scales with it.

    Raises:
        ValueError: n_frames < 1, draws < 2.
    """
    if n_frames < 1 or draws < 2:
        raise ValueError(f"need n_frames >= 1 and draws >= 2, got {n_frames}, {draws}")
    out: dict[str, EffectThresholds] = {}
    for name, feature in reference.features.items():
        ref = np.asarray(feature.counts, dtype=np.float64)
        total = ref.sum()
        if total <= 0:
            out[name] = EffectThresholds(n_frames, math.inf, math.inf, math.inf)
            continue
        p = ref / total
        windows = rng.multinomial(n_frames, p, size=draws).astype(np.float64)
        refs = rng.multinomial(int(total), p, size=draws).astype(np.float64)
        edges = np.asarray(feature.edges, dtype=np.float64)
        values = (_psi(windows, refs), _js(windows, refs), _wasserstein(windows, refs, edges))
        psi_t, js_t, w_t = (float(v.mean() + z * v.std(ddof=1)) for v in values)
        out[name] = EffectThresholds(n_frames, psi_t, js_t, w_t)
    return out


def reference_defect_rate(reference: ReferenceProfile, t_fail: float) -> float:
    """Share of reference frames with P(defect) >= t_fail, from the profile's histogram
    (a bin split by t_fail counts in proportion, as if its values were spread evenly)."""
    feature = reference.features["p_defect"]
    edges, counts = feature.edges, feature.counts
    total = float(sum(counts))
    if total == 0:
        return math.nan
    fails = float(counts[-1]) if t_fail <= edges[-1] else 0.0
    for i in range(1, len(edges)):
        lo, hi = edges[i - 1], edges[i]
        share = 1.0 if lo >= t_fail else max(0.0, (hi - t_fail) / (hi - lo))
        fails += counts[i] * share
    return fails / total


def cbpe(
    p_hist: Sequence[float],
    p_sum: Sequence[float | None],
    edges: Sequence[float],
    t_fail: float,
) -> float:
    """Confidence-based performance estimate: the accuracy the model expects of itself.

    A frame predicted ``fail`` (p >= t_fail) is right with probability p, one predicted
    not failed with probability 1 - p, so the expected share correct is
    (sum of p over fail bins + sum of 1 - p over the others) / frames. A bin counts as
    fail when its mean p is at least t_fail (exact when t_fail is an edge). A None sum
    (a bin of under 10 frames, withheld for privacy) is taken as count x the bin's
    midpoint (the edge itself for the under- and overflow bins). Valid only while the
    model stays calibrated, that is while its inputs look like the reference. NaN for an
    empty histogram.

    Raises:
        ValueError: lengths that do not match ``len(edges) + 1``.
    """
    n_bins = len(edges) + 1
    if len(p_hist) != n_bins or len(p_sum) != n_bins:
        raise ValueError(f"need {n_bins} counts and sums, got {len(p_hist)}, {len(p_sum)}")
    mids = [edges[0], *((lo + hi) / 2.0 for lo, hi in itertools.pairwise(edges)), edges[-1]]
    frames = 0.0
    correct = 0.0
    for count, total, mid in zip(p_hist, p_sum, mids, strict=True):
        if count <= 0:
            continue
        s = count * mid if total is None else total
        frames += count
        correct += s if s / count >= t_fail else count - s
    return correct / frames if frames else math.nan


def benjamini_hochberg(p_values: Sequence[float], q: float) -> list[bool]:
    """Which hypotheses to reject at false discovery rate ``q`` (step-up procedure):
    the k smallest p-values, for the largest k with p_(k) <= k q / m. Order is kept.

    Raises:
        ValueError: q outside (0, 1).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    cut = 0
    for rank, i in enumerate(order, start=1):
        if p_values[i] <= rank * q / m:
            cut = rank
    reject = [False] * m
    for i in order[:cut]:
        reject[i] = True
    return reject
