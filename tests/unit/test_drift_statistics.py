"""The drift statistics (edge_agent.core.drift_tests) on known values and edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent.core.drift_tests import (
    benjamini_hochberg,
    cbpe,
    chi2_critical,
    chi2_sf,
    chi_square,
    jensen_shannon,
    kolmogorov_sf,
    ks_critical,
    ks_from_histograms,
    psi,
    wasserstein,
)

# --- chi-square and Kolmogorov distributions -------------------------------------------


@pytest.mark.parametrize(
    ("x", "dof", "expected"),
    [
        (3.841458820694124, 1, 0.05),
        (6.634896601021214, 1, 0.01),
        (18.307038053275146, 10, 0.05),
        (0.5, 3, 0.918891411654676),
        (124.34211340400407, 100, 0.05),
    ],
)
def test_chi2_sf_matches_tables(x: float, dof: int, expected: float) -> None:
    assert chi2_sf(x, dof) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("x", "k"), [(0.3, 1), (2.0, 3), (40.0, 25), (120.0, 50), (10.0, 200)])
def test_chi2_sf_even_dof_matches_the_closed_form(x: float, k: int) -> None:
    # dof 2k: P(X >= 2x) = exp(-x) * sum_{i<k} x^i / i!
    closed = sum(math.exp(i * math.log(x) - x - math.lgamma(i + 1)) for i in range(k))
    assert chi2_sf(2 * x, 2 * k) == pytest.approx(closed, rel=1e-9, abs=1e-300)


def test_chi2_sf_edges_and_critical_value() -> None:
    assert chi2_sf(0.0, 3) == 1.0
    assert chi2_sf(5.0, 0) == 1.0
    assert chi2_critical(0.05, 1) == pytest.approx(3.841458820694124, rel=1e-9)
    assert chi2_critical(0.05, 0) == math.inf


@pytest.mark.parametrize(
    ("lam", "expected"),
    [(1.3580986393225505, 0.05), (1.6276236115189502, 0.01), (1.2238478702170825, 0.10)],
)
def test_kolmogorov_sf_matches_tables(lam: float, expected: float) -> None:
    assert kolmogorov_sf(lam) == pytest.approx(expected, rel=1e-9)


def test_kolmogorov_sf_is_continuous_between_its_two_series() -> None:
    assert kolmogorov_sf(0.0) == 1.0
    # The slope there is about -1.07: a step of 2e-6 moves Q by about 2.1e-6.
    assert kolmogorov_sf(0.999999) - kolmogorov_sf(1.000001) == pytest.approx(2.14e-6, rel=0.02)
    values = [kolmogorov_sf(x) for x in np.linspace(0.2, 3.0, 50)]
    assert all(a >= b for a, b in itertools.pairwise(values))


# --- tests on histograms --------------------------------------------------------------


def test_chi_square_two_by_two_by_hand() -> None:
    # [[30, 70], [50, 50]]: expected [[40, 60], [40, 60]], chi2 = 2 (100/40 + 100/60).
    stat, dof, p = chi_square([30, 70], [50, 50])
    assert stat == pytest.approx(2 * (100 / 40 + 100 / 60))
    assert dof == 1
    assert p == pytest.approx(chi2_sf(stat, 1))
    # Bins empty in both histograms change nothing.
    assert chi_square([0, 30, 0, 70, 0], [0, 50, 0, 50, 0]) == (stat, dof, p)


def test_chi_square_same_proportions_and_empty_inputs() -> None:
    assert chi_square([10, 20, 30], [100, 200, 300])[0] == pytest.approx(0.0)
    assert chi_square([10, 20, 30], [100, 200, 300])[2] == pytest.approx(1.0)
    assert chi_square([0, 0, 0], [1, 2, 3]) == (0.0, 0, 1.0)
    assert chi_square([5, 5, 5], [0, 0, 0]) == (0.0, 0, 1.0)


def test_chi_square_pools_sparse_bins() -> None:
    # The two 1-frame bins cannot stand alone (expected < 5): they join neighbours.
    _, dof, _ = chi_square([100, 1, 100, 1, 100], [100, 1, 100, 1, 100])
    assert dof == 2
    # Everything in one group: nothing to test.
    assert chi_square([3, 0, 0], [2, 0, 0]) == (0.0, 0, 1.0)


@pytest.mark.parametrize("bad", [([1, 2], [1, 2, 3]), ([1, -1, 2], [1, 1, 2])])
def test_histogram_tests_refuse_bad_input(bad: tuple[list[int], list[int]]) -> None:
    with pytest.raises(ValueError):
        chi_square(*bad)
    with pytest.raises(ValueError):
        ks_from_histograms(*bad)


def test_ks_from_histograms() -> None:
    d, p = ks_from_histograms([50, 50, 0], [0, 50, 50])
    assert d == pytest.approx(0.5)
    assert p < 1e-8
    assert ks_from_histograms([10, 20, 30], [20, 40, 60]) == (0.0, 1.0)
    assert ks_from_histograms([0, 0], [3, 4]) == (0.0, 1.0)
    # Large samples: the classic 1.358 * sqrt((n + m) / (n m)) at alpha = 0.05.
    n = m = 10**8
    assert ks_critical(0.05, n, m) == pytest.approx(1.3581 * math.sqrt(2 / n), rel=1e-3)


# --- effect sizes --------------------------------------------------------------------


def test_psi_by_hand() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    # [100, 0] vs [0, 100] with 0.5 added to each bin: p = (100.5, 0.5) / 101.
    expected = 2 * (100 / 101) * math.log(100.5 / 0.5)
    assert psi([100, 0], [0, 100]) == pytest.approx(expected)
    assert psi([1, 5, 9], [4, 4, 4]) == pytest.approx(psi([4, 4, 4], [1, 5, 9]))


def test_jensen_shannon_by_hand() -> None:
    assert jensen_shannon([5, 5], [50, 50]) == pytest.approx(0.0)
    assert jensen_shannon([7, 0], [0, 3]) == pytest.approx(1.0)
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4).
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    assert jensen_shannon([1, 1], [1, 0]) == pytest.approx(0.5 * (kl_p + kl_q))


def test_wasserstein_moves_mass_by_bin_distance() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    # [under, [0,1), [1,2), [2,3), over]
    assert wasserstein([0, 10, 0, 0, 0], [0, 0, 0, 10, 0], edges) == pytest.approx(2.0)
    assert wasserstein([0, 4, 4, 4, 0], [0, 8, 8, 8, 0], edges) == pytest.approx(0.0)
    # Under- and overflow are point masses at the outer edges.
    assert wasserstein([5, 0, 0, 0, 0], [0, 0, 0, 0, 5], edges) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        wasserstein([1, 2, 3], [1, 2, 3], edges)


def test_wasserstein_with_crossing_cdfs_matches_numeric_integration() -> None:
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    a = np.array([0.0, 6.0, 1.0, 3.0, 0.0])
    b = np.array([0.0, 2.0, 6.0, 2.0, 0.0])
    x = np.linspace(0.0, 4.0, 400_001)

    def cdf(c: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        at_edges = np.cumsum(c)[:-1] / c.sum()
        out: npt.NDArray[np.float64] = np.interp(x, edges, at_edges)
        return out

    gap = np.abs(cdf(a) - cdf(b))
    numeric = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(x)))
    assert wasserstein(a.tolist(), b.tolist(), edges.tolist()) == pytest.approx(numeric, rel=1e-6)


# --- CBPE, Benjamini-Hochberg ----------------------------------------------------------


def test_cbpe_on_a_calibrated_stream_matches_the_true_accuracy() -> None:
    rng = np.random.default_rng(5)
    n = 20_000
    p = np.clip(rng.beta(0.3, 2.0, n), 0.0, 1.0)
    labels = rng.random(n) < p  # calibrated: a frame with p is defective with probability p
    edges = [float(v) for v in np.linspace(0.0, 1.0, 21)]
    idx = np.searchsorted(np.asarray(edges), p, side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1)
    sums = np.bincount(idx, weights=p, minlength=len(edges) + 1)
    p_sum: list[float | None] = [
        float(s) if c >= 10 else None for s, c in zip(sums, counts, strict=True)
    ]
    true_accuracy = float(np.mean((p >= 0.5) == labels))
    assert cbpe(counts.tolist(), p_sum, edges, 0.5) == pytest.approx(true_accuracy, abs=0.01)


def test_cbpe_by_hand_and_withheld_sums() -> None:
    edges = [0.0, 0.5, 1.0]
    # 100 frames at mean p 0.1 (not failed, 90 right), 50 at mean p 0.8 (failed, 40 right).
    assert cbpe([0, 100, 50, 0], [None, 10.0, 40.0, None], edges, 0.5) == pytest.approx(130 / 150)
    # A withheld sum counts at the bin's midpoint: 0.25 and 0.75.
    assert cbpe([0, 8, 4, 0], [None, None, None, None], edges, 0.5) == pytest.approx(
        (8 * 0.75 + 4 * 0.75) / 12
    )
    assert math.isnan(cbpe([0, 0, 0, 0], [None] * 4, edges, 0.5))
    with pytest.raises(ValueError):
        cbpe([1, 2], [None, None], edges, 0.5)


def test_benjamini_hochberg() -> None:
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005, 0.2], 0.05) == [
        True,
        True,
        True,
        True,
        False,
    ]
    # Step-up: 0.03 > 0.05 / 2 alone, but the larger 0.04 <= 2 * 0.05 / 2 carries it.
    assert benjamini_hochberg([0.03, 0.04], 0.05) == [True, True]
    assert benjamini_hochberg([0.5, 0.04], 0.05) == [False, False]
    assert benjamini_hochberg([], 0.05) == []
    with pytest.raises(ValueError):
        benjamini_hochberg([0.1], 1.5)


def test_chi_square_is_calibrated_under_the_null_and_ks_is_conservative() -> None:
    # Window and reference both drawn from one histogram with sparse tails, like the
    # contrast histogram of the reference bundles.
    ref = np.array([0, 0, 1, 307, 1330, 1118, 243, 1, 0, 0], dtype=np.float64)
    rng = np.random.default_rng(8)
    chi2_p, ks_p = [], []
    for _ in range(3000):
        w = rng.multinomial(500, ref / ref.sum()).tolist()
        r = rng.multinomial(3000, ref / ref.sum()).tolist()
        chi2_p.append(chi_square(w, r)[2])
        ks_p.append(ks_from_histograms(w, r)[1])
    assert 0.04 < float(np.mean(np.asarray(chi2_p) < 0.05)) < 0.06
    assert float(np.mean(np.asarray(ks_p) < 0.05)) <= 0.05
