"""The fits and verdicts on synthetic curves with known answers, with seed noise (theory.md section 5).

Every verdict rule here is shown to fail where it should: a rule that cannot fail is a defect.
"""

import numpy as np
import pytest

from analysis import fits, laws

BOUND, EQUALITY = dict(tolerance=0.05, limit=0.15), dict(tolerance=0.05, limit=0.15)
N_LEVELS = (50, 100, 200, 400, 800, 1600)


def synthetic(f, seeds=8, levels=N_LEVELS, noise=0.03, rng=None):
    """f(x) times log-normal seed noise: x, y, seed, flat."""
    rng = rng or np.random.default_rng(0)
    x = np.repeat(np.array(levels, float)[None], seeds, 0)
    y = f(x) * np.exp(noise * rng.standard_normal(x.shape))
    seed = np.repeat(np.arange(seeds)[:, None], len(levels), 1)
    return x.ravel(), y.ravel(), seed.ravel()


def bound(theory, est):
    return fits.bound_verdict(theory, est.estimate, est.ci_low, est.ci_high, **BOUND)


@pytest.mark.parametrize("a", [25.0, -25.0, -45.0])
def test_a_curve_with_a_first_correction_is_within_its_bound(a):
    """C/N (1 + a/N) obeys O(1/N) for either sign of a; the plain slope (-0.83 for a = -25) would not say so."""
    est = fits.exponent(*synthetic(lambda N: 3.0 / N * (1 + a / N)))
    assert bound(-1.0, est) == "within", est
    assert abs(est.estimate + 1) < 0.03
    if a < 0:
        plain = fits.power_law_slope(*synthetic(lambda N: 3.0 / N * (1 + a / N)))
        assert bound(-1.0, plain) == "violated" and est.plain == pytest.approx(plain.estimate)


@pytest.mark.parametrize("exponent", [-0.8, -0.5])
def test_a_slower_decay_violates_the_bound(exponent):
    est = fits.exponent(*synthetic(lambda N: 3.0 * N**exponent))
    assert bound(-1.0, est) == "violated" and abs(est.estimate - exponent) < 0.03, est


def test_a_growth_bound_is_judged_the_same_way():
    """O(c^2): c^1.5 is within, c^2.5 violates; over few levels (c = 2 .. 8, 5 of them)."""
    levels = (2, 3, 4, 6, 8)
    assert bound(2.0, fits.exponent(*synthetic(lambda c: 0.1 * c**1.5, levels=levels))) == "within"
    assert bound(2.0, fits.exponent(*synthetic(lambda c: 0.1 * c**2.5, levels=levels))) == "violated"


def test_two_noisy_seeds_are_inconclusive():
    """t_1 = 12.7: two seeds cannot support a verdict, whatever the curve (the old rule called
    [-2.73, 0.76] 'consistent' with -1)."""
    for f in (lambda N: 3.0 / N, lambda N: 3.0 * N**-0.5):
        est = fits.exponent(*synthetic(f, seeds=2, noise=0.1, rng=np.random.default_rng(3)))
        assert (est.ci_high - est.ci_low) / 2 > BOUND["limit"] and bound(-1.0, est) == "inconclusive"
        assert fits.equality_verdict(-1.0, est.estimate, est.ci_low, est.ci_high, **EQUALITY) == "inconclusive"


def test_too_few_levels_for_the_corrected_law_report_the_plain_slope():
    est = fits.exponent(*synthetic(lambda N: 3.0 / N, levels=(100, 200, 400)))
    assert np.isnan(est.estimate) and abs(est.plain + 1) < 0.03 and "needs 4" in est.note
    assert bound(-1.0, est) == "inconclusive"
    plain = fits.exponent(*synthetic(lambda N: 3.0 / N, levels=(100, 200, 400)), correction=None)
    assert plain.estimate == pytest.approx(est.plain) and bound(-1.0, plain) == "within"  # a claim that asks for the plain slope gets it


def test_the_corrected_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(60):
        est = fits.exponent(*synthetic(lambda N: 3.0 / N * (1 - 25 / N), seeds=4, noise=0.05, rng=rng), rng=rng)
        hits.append(est.ci_low <= -1.0 <= est.ci_high)
    assert 0.85 <= np.mean(hits) <= 1.0, np.mean(hits)


def test_power_law_slope_recovers_the_exponent():
    est = fits.power_law_slope(*synthetic(lambda x: 2.0 / x, levels=(10, 20, 40, 80, 160, 320), noise=0.1))
    assert est.ci_low < -1.0 < est.ci_high and abs(est.estimate + 1) < 0.05
    assert est.n_points == 6 and est.window == (10.0, 320.0)


def test_interval_is_near_nominal_with_few_seeds():
    """A percentile bootstrap over 4 seeds covers about 80%; the t interval on its se about 95%."""
    rng = np.random.default_rng(8)
    hits = []
    for _ in range(150):
        est = fits.power_law_slope(*synthetic(lambda x: 2 * x**-0.5, seeds=4, levels=(10, 20, 40, 80, 160, 320), noise=0.1, rng=rng), rng=rng)
        hits.append(est.ci_low <= -0.5 <= est.ci_high)
    assert 0.88 <= np.mean(hits) <= 0.995, np.mean(hits)


def test_a_seed_missing_a_level_is_left_out_whole():
    x, y, s = synthetic(lambda x: 2 * x**-0.5, seeds=4, levels=(16, 64, 256, 1024, 4096))
    keep = ~((s == 0) & (x == 64))  # seed 0 lost one point (excluded upstream)
    est = fits.exponent(x[keep], y[keep], s[keep], correction=0.5)
    assert est.ci_low < -0.5 < est.ci_high
    two = s < 2
    with pytest.raises(fits.FitError, match="2 seeds with a value at every x level, got 1 of 2"):
        fits.exponent(x[keep & two], y[keep & two], s[keep & two])


def test_excess_over_a_measured_floor():
    rng = np.random.default_rng(9)
    x, y, s = synthetic(lambda x: 2 * x**-0.5, seeds=6, levels=(16, 32, 64, 128, 256, 1024), noise=0.02, rng=rng)
    floor = 0.05 + 0.01 * s  # each seed's own M = inf value
    est = fits.exponent(x, y + floor, s, correction=0.5, floor=floor)
    assert bound(-0.5, est) == "within" and abs(est.estimate + 0.5) < 0.05
    raw = fits.exponent(x, y + floor, s, correction=0.5)
    assert bound(-0.5, raw) != "within"  # the floor unsubtracted flattens the curve
    with pytest.raises(fits.FitError, match="excess over the floor is not positive"):
        fits.exponent(x, y + floor, s, floor=floor + 10)


@pytest.mark.parametrize(
    "theory, lo, hi, expected",
    [
        (-1.0, -1.2, -0.96, "within"), (-1.0, -1.2, -0.9, "inconclusive"), (-1.0, -0.9, -0.8, "violated"),
        (-1.0, -1.4, -1.0, "inconclusive"),  # half-width 0.2 > 0.15: too wide to tell, even below the bound
        (2.0, 1.4, 1.6, "within"), (2.0, 2.1, 2.2, "violated"),
    ],
)  # fmt: skip
def test_bound_verdict(theory, lo, hi, expected):
    assert fits.bound_verdict(theory, (lo + hi) / 2, lo, hi, **BOUND) == expected


@pytest.mark.parametrize(
    "theory, lo, hi, expected",
    [
        (-0.5, -0.53, -0.47, "consistent"), (-0.5, -0.6, -0.56, "steeper"), (-0.5, -0.44, -0.4, "shallower"),
        (-0.5, -0.56, -0.5, "inconclusive"),  # reaches past the tolerance on one side: not shown equal
        (0.5, 0.6, 0.7, "steeper"), (0.5, 0.3, 0.4, "shallower"), (-0.5, -0.8, -0.45, "inconclusive"),
    ],
)  # fmt: skip
def test_equality_verdict(theory, lo, hi, expected):
    assert fits.equality_verdict(theory, (lo + hi) / 2, lo, hi, **EQUALITY) == expected


def test_an_exact_power_law_is_consistent_despite_rounding():
    x = np.repeat([10.0, 20.0, 40.0, 80.0], 3)
    seed = np.tile([0, 1, 2], 4)
    est = fits.power_law_slope(x, 3.0 / x, seed)
    assert est.estimate != -1.0 and abs(est.estimate + 1) < 1e-12  # rounding, and a zero-width interval
    assert fits.equality_verdict(-1.0, est.estimate, est.ci_low, est.ci_high, tolerance=0.0, limit=0.1) == "consistent"


def test_an_exact_geometric_curve_gives_its_rate():
    t = np.arange(0, 300, 10)
    gap = fits.rate(t, laws.linear_rate(t, 0.0, 0.97) ** 2, squared=True)  # a loss gap contracts by rho^2
    assert gap.estimate == pytest.approx(0.97, abs=1e-12) and gap.r2 == pytest.approx(1.0)
    assert fits.rate_verdict(0.97, gap.estimate, gap.ci_low, gap.ci_high, tolerance=0.02, limit=0.02) == "consistent"


@pytest.mark.parametrize("rho_true, expected", [(0.96, "consistent"), (0.965, "shallower"), (0.955, "steeper"), (0.9598, "consistent")])
def test_rate_verdict_is_on_the_ratio_of_log_rates(rho_true, expected):
    """|log rho / log rho_H - 1| <= 2%: 0.965 is 12% slower in log rate than 0.96, 0.9598 is 0.5% faster."""
    rng = np.random.default_rng(2)
    t = np.arange(0, 400, 10)
    est = fits.rate(t, laws.linear_rate(t, 0.0, rho_true) * np.exp(0.01 * rng.standard_normal(len(t))), floor=1e-30)
    assert fits.rate_verdict(0.96, est.estimate, est.ci_low, est.ci_high, tolerance=0.02, limit=0.02) == expected


def test_rate_recovers_rho_above_the_noise_floor():
    rng = np.random.default_rng(2)
    t = np.arange(0, 600, 10)
    clean = laws.linear_rate(t, 0.0, 0.97)
    noisy = clean * np.exp(0.02 * rng.standard_normal(len(t))) + 1e-9 * np.abs(rng.standard_normal(len(t)))
    est = fits.rate(t, noisy, floor=1e-7)
    assert est.ci_low <= 0.97 <= est.ci_high and abs(est.estimate - 0.97) < 1e-3
    assert est.window[1] < 600 and est.r2 > 0.99  # stops before the floor


def test_rate_interval_covers_rho_at_about_the_nominal_rate():
    rng = np.random.default_rng(3)
    t = np.arange(0, 300, 5)
    hits = []
    for _ in range(200):
        v = laws.linear_rate(t, 0.0, 0.95) * np.exp(0.05 * rng.standard_normal(len(t)))
        est = fits.rate(t, v, floor=1e-30)
        hits.append(est.ci_low <= 0.95 <= est.ci_high)
    assert 0.9 <= np.mean(hits) <= 1.0, np.mean(hits)  # nominal 0.95, a little more with the late-half hull


def test_rate_interval_takes_in_a_drifting_local_rate():
    """Two modes: before the slow one dominates, the late half of the window is slower than the whole."""
    t = np.arange(0, 200, 5, dtype=float)
    v = laws.linear_rate(t, 0.0, 0.97) + laws.linear_rate(t, 2.0, 0.95)
    est = fits.rate(t, v, floor=1e-30)
    middle = t[t >= est.window[0]][len(t[t >= est.window[0]]) // 2]
    late = fits.rate(t, v, floor=1e-30, start=middle)
    assert est.estimate < late.estimate <= est.ci_high < 0.97  # reaches the late slope (still short of the limit)


def test_a_curve_against_its_prediction():
    t = np.arange(0, 200, 10)
    pred = 0.3 * laws.linear_rate(t, 0.0, 0.9) + 0.7 * laws.linear_rate(t, 0.0, 0.97)
    same = fits.curve_deviation(t, pred * (1 + 1e-9), pred, floor=1e-20)
    assert fits.equality_verdict(0.0, same.estimate, same.ci_low, same.ci_high, tolerance=0.01, limit=np.inf) == "consistent"
    slow = fits.curve_deviation(t, pred * laws.linear_rate(t, 0.0, 1.001), pred, floor=1e-20)  # drifts 20% slower
    assert fits.equality_verdict(0.0, slow.estimate, slow.ci_low, slow.ci_high, tolerance=0.01, limit=np.inf) == "inconclusive"  # agrees early, not late
    fast = fits.curve_deviation(t[1:], pred[1:] * 0.9, pred[1:], floor=1e-20)
    assert fits.equality_verdict(0.0, fast.estimate, fast.ci_low, fast.ci_high, tolerance=0.01, limit=np.inf) == "steeper"


def test_the_largest_increase_of_a_curve_that_should_not_rise():
    M = (16, 32, 64, 128, 256, 1024)
    falling = fits.largest_increase(*synthetic(lambda m: 0.02 + 0.3 / np.sqrt(m), levels=M, noise=0.01))
    assert fits.bound_verdict(0.0, falling.estimate, falling.ci_low, falling.ci_high, tolerance=0.02, limit=0.1) == "within"
    rising = fits.largest_increase(*synthetic(lambda m: 0.02 + 0.3 / np.sqrt(m) + 0.0004 * m, levels=M, noise=0.01))
    assert fits.bound_verdict(0.0, rising.estimate, rising.ci_low, rising.ci_high, tolerance=0.02, limit=0.1) == "violated"


def test_too_little_data_is_an_error_not_a_made_up_interval():
    with pytest.raises(fits.FitError, match="distinct x"):
        fits.exponent([1, 2, 1, 2], [1, 2, 1, 2], [0, 0, 1, 1])
    with pytest.raises(fits.FitError, match="2 seeds"):
        fits.exponent([1, 2, 3], [1, 2, 3], [0, 0, 0])
    with pytest.raises(fits.FitError, match="3 points"):
        fits.rate([0, 1, 2, 3], [1, 1e-20, 1e-20, 1e-20], floor=1e-13)


def test_log_ratio_of_seed_means():
    rng = np.random.default_rng(6)
    seed = np.arange(10)
    base = np.exp(rng.standard_normal(10))
    better = fits.log_ratio(0.5 * base * np.exp(0.05 * rng.standard_normal(10)), base, seed)
    assert better.ci_high < 0 and abs(better.estimate - np.log(0.5)) < 0.05
    worse = fits.log_ratio(2 * base, base, seed)
    assert worse.estimate == pytest.approx(np.log(2)) and fits.bound_verdict(0.0, worse.estimate, worse.ci_low, worse.ci_high, 0.1, 1.0) == "violated"
    near_zero = np.array([-0.01, 0.03, 0.0001, 0.05])  # a baseline at the oracle: its excess is noise around 0
    far = fits.log_ratio(np.full(4, 0.2), near_zero, np.arange(4))
    assert far.estimate == pytest.approx(np.log(0.2 / near_zero.mean()))  # one ratio of means, no seed dropped
    with pytest.raises(fits.FitError, match="2 seeds"):
        fits.log_ratio([1.0], [2.0], [0])
