"""Fits recover known exponents and rates from synthetic data, and their intervals cover the truth."""

import numpy as np
import pytest

from analysis import fits, laws


def synthetic(b, seeds=8, levels=(10, 20, 40, 80, 160, 320), noise=0.1, floor=0.0, rng=None):
    rng = rng or np.random.default_rng(0)
    x = np.repeat(np.array(levels, float)[None], seeds, 0)
    y = laws.power_law_floor(x, 2.0, b, floor) * np.exp(noise * rng.standard_normal(x.shape))
    seed = np.repeat(np.arange(seeds)[:, None], len(levels), 1)
    return x.ravel(), y.ravel(), seed.ravel()


def test_power_law_slope_recovers_the_exponent():
    est = fits.power_law_slope(*synthetic(-1.0))
    assert est.ci_low < -1.0 < est.ci_high and abs(est.estimate + 1) < 0.05
    assert est.n_points == 6 and est.window == (10.0, 320.0)


def test_interval_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = [fits.power_law_slope(*synthetic(-0.5, seeds=10, rng=rng), rng=rng) for _ in range(120)]
    rate = np.mean([e.ci_low <= -0.5 <= e.ci_high for e in covered])
    assert 0.85 <= rate <= 0.995, rate  # nominal 0.95; a percentile bootstrap over 10 seeds runs a little narrow


def test_interval_is_near_nominal_with_few_seeds():
    """The quickstart has 4 seeds: a percentile bootstrap over 4 seeds covers about 80%."""
    rng = np.random.default_rng(8)
    hits = [(lambda e: e.ci_low <= -0.5 <= e.ci_high)(fits.power_law_slope(*synthetic(-0.5, seeds=4, rng=rng), rng=rng)) for _ in range(150)]
    assert 0.88 <= np.mean(hits) <= 0.995, np.mean(hits)


def test_a_seed_missing_a_level_is_left_out_whole():
    for fit, floor in ((fits.power_law_slope, 0.0), (fits.power_law_floor_slope, 0.01)):
        x, y, s = synthetic(-0.5, seeds=4, levels=(16, 64, 256, 1024, 4096), noise=0.03, floor=floor)
        keep = ~((s == 0) & (x == 64))  # seed 0 lost one point (excluded upstream)
        est = fit(x[keep], y[keep], s[keep])
        assert est.ci_low < -0.5 < est.ci_high
    two = s < 2
    with pytest.raises(fits.FitError, match="2 seeds with a value at every x level, got 1 of 2"):
        fits.power_law_floor_slope(x[keep & two], y[keep & two], s[keep & two])


def test_floor_aware_fit_sees_through_the_floor():
    x, y, s = synthetic(-0.5, levels=(4, 16, 64, 256, 1024, 4096), noise=0.03, floor=0.02)
    plain = fits.power_law_slope(x, y, s)
    floored = fits.power_law_floor_slope(x, y, s)
    assert plain.estimate > -0.45  # the floor flattens a plain log-log slope
    assert floored.ci_low < -0.5 < floored.ci_high


def test_rate_recovers_rho_above_the_noise_floor():
    rng = np.random.default_rng(2)
    t = np.arange(0, 600, 10)
    clean = laws.linear_rate(t, 0.0, 0.97)
    noisy = clean * np.exp(0.02 * rng.standard_normal(len(t))) + 1e-9 * np.abs(rng.standard_normal(len(t)))
    est = fits.rate(t, noisy, floor=1e-7)
    assert est.ci_low <= 0.97 <= est.ci_high and abs(est.estimate - 0.97) < 1e-3
    assert est.window[1] < 600 and est.r2 > 0.99  # stops before the floor
    gap = fits.rate(t, clean**2, squared=True)  # a loss gap contracts by rho^2
    assert gap.estimate == pytest.approx(0.97, abs=1e-9)


def test_too_little_data_is_an_error_not_a_made_up_interval():
    with pytest.raises(fits.FitError, match="distinct x"):
        fits.power_law_slope([1, 2, 1, 2], [1, 2, 1, 2], [0, 0, 1, 1])
    with pytest.raises(fits.FitError, match="2 seeds"):
        fits.power_law_slope([1, 2, 3], [1, 2, 3], [0, 0, 0])
    with pytest.raises(fits.FitError, match="3 points"):
        fits.rate([0, 1, 2, 3], [1, 1e-20, 1e-20, 1e-20], floor=1e-13)


@pytest.mark.parametrize(
    "theory, lo, hi, expected",
    [(-1.0, -1.2, -0.9, "consistent"), (-1.0, -1.5, -1.2, "steeper"), (-1.0, -0.8, -0.6, "shallower"), (0.5, 0.7, 0.9, "steeper"), (0.5, 0.1, 0.3, "shallower")],
)
def test_verdict(theory, lo, hi, expected):
    assert fits.verdict(theory, lo, hi) == expected


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


def test_floor_fit_interval_covers_the_truth_over_repeated_draws():
    rng = np.random.default_rng(4)
    levels = (16, 32, 64, 128, 256, 512, 1024, 4096)
    hits = []
    for _ in range(30):
        x, y, s = synthetic(-0.5, seeds=8, levels=levels, noise=0.05, floor=0.01, rng=rng)
        est = fits.power_law_floor_slope(x, y, s, rng=rng)
        hits.append(est.ci_low <= -0.5 <= est.ci_high)
    assert np.mean(hits) >= 0.8, np.mean(hits)  # nominal 0.95; 30 draws, a percentile bootstrap over 8 seeds


def test_log_ratio_and_the_comparison_verdict():
    rng = np.random.default_rng(6)
    seed = np.arange(10)
    base = np.exp(rng.standard_normal(10))
    better = fits.log_ratio(0.5 * base * np.exp(0.05 * rng.standard_normal(10)), base, seed)
    assert better.ci_high < 0 and abs(better.estimate - np.log(0.5)) < 0.05 and fits.verdict_compare(better.ci_low) == "consistent"
    worse = fits.log_ratio(2 * base, base, seed)
    assert worse.estimate == pytest.approx(np.log(2)) and fits.verdict_compare(worse.ci_low) == "worse"
    same = fits.log_ratio(base * np.exp(0.1 * rng.standard_normal(10)), base, seed)
    assert same.ci_low < 0 < same.ci_high and fits.verdict_compare(same.ci_low) == "consistent"
    with pytest.raises(fits.FitError, match="2 seeds"):
        fits.log_ratio([1.0], [2.0], [0])


@pytest.mark.parametrize(
    "theory, lo, hi, expected",
    [(0.96, 0.95, 0.955, "steeper"), (0.96, 0.958, 0.962, "consistent"), (0.96, 0.965, 0.97, "shallower"), (1.0, 0.996, 0.999, "steeper")],
)
def test_rate_verdict(theory, lo, hi, expected):
    """rho below the prediction converges faster: `steeper`, also when the prediction is 1."""
    assert fits.rate_verdict(theory, lo, hi) == expected


def test_an_exact_power_law_is_consistent_despite_rounding():
    x = np.repeat([10.0, 20.0, 40.0, 80.0], 3)
    seed = np.tile([0, 1, 2], 4)
    est = fits.power_law_slope(x, 3.0 / x, seed)
    assert est.estimate != -1.0 and abs(est.estimate + 1) < 1e-12  # rounding, and a zero-width interval
    assert fits.verdict(-1.0, est.ci_low, est.ci_high) == "consistent"



def test_excess_over_a_measured_floor_recovers_the_exponent():
    rng = np.random.default_rng(9)
    x, y, s = synthetic(-0.5, seeds=6, levels=(16, 32, 64, 128, 256, 1024), noise=0.02, floor=0.0, rng=rng)
    floor = 0.05 + 0.01 * s  # each seed's own M = inf value
    est = fits.power_law_excess_slope(x, y + floor, floor, s)
    assert est.ci_low < -0.5 < est.ci_high and abs(est.estimate + 0.5) < 0.03
    free = fits.power_law_floor_slope(x, y + floor, s)  # the same data with the floor fitted instead
    assert free.ci_high - free.ci_low > est.ci_high - est.ci_low  # knowing the floor sharpens the fit
    with pytest.raises(fits.FitError, match="not positive"):
        fits.power_law_excess_slope(x, y + floor, floor + 10, s)
