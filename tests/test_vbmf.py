"""EVBMF rank estimation (tnonnx.formats.vbmf): recovers the rank of low-rank matrices in
Gaussian noise, estimates the noise variance, finds nothing in pure noise, and gives the
Tucker-2 channel ranks of a structured kernel (Kim et al. 2016)."""

import math

import numpy as np
import pytest

from tnonnx.formats import vbmf


def _low_rank_plus_noise(l, m, rank, sigma, seed, strength=1.0):
    rng = np.random.default_rng(seed)
    signal = strength * rng.standard_normal((l, rank)) @ rng.standard_normal((rank, m)) / math.sqrt(rank)
    return signal + sigma * rng.standard_normal((l, m))


def test_tau_bar_solves_the_threshold_equation():
    assert vbmf._tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)  # the constant of the paper at alpha = 1
    for alpha in (0.05, 0.3, 0.7, 1.0):
        tau = vbmf._tau_bar(alpha)
        assert tau > math.sqrt(alpha)
        assert math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("l,m,rank,sigma", [(100, 200, 10, 0.1), (200, 100, 10, 0.1), (64, 576, 12, 0.5),
                                            (50, 50, 5, 0.5), (300, 80, 20, 0.3), (40, 700, 3, 0.2)])
def test_recovers_the_rank_and_the_noise(l, m, rank, sigma):
    y = _low_rank_plus_noise(l, m, rank, sigma, seed=rank + l)
    assert vbmf.vbmf_rank(y) == rank
    r, sigma2, threshold = vbmf.evbmf(np.linalg.svd(y, compute_uv=False), y.shape)
    assert r == rank and sigma2 == pytest.approx(sigma**2, rel=0.15)


def test_weak_components_below_the_threshold_are_dropped():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((80, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((160, 6)))
    strengths = np.array([60.0, 40.0, 30.0, 20.0, 1.0, 0.5])  # noise spectrum edge ~ sqrt(80) + sqrt(160) ~ 21.6 * 0.1
    y = (u * strengths) @ v.T + 0.1 * rng.standard_normal((80, 160))
    assert vbmf.vbmf_rank(y) == 4


def test_pure_noise_has_no_rank_and_usable_ranks_are_at_least_one():
    y = np.random.default_rng(2).standard_normal((60, 90))
    assert vbmf.vbmf_rank(y) == 0
    assert vbmf.vbmf_rank_for_matrix(y) == 1
    assert vbmf.vbmf_rank(np.zeros((5, 7))) == 0


def test_known_noise_variance_and_spectrum_entry_points():
    y = _low_rank_plus_noise(70, 120, 8, 0.2, seed=3)
    s = np.linalg.svd(y, compute_uv=False)
    assert vbmf.vbmf_rank(y, sigma2=0.04) == 8
    assert vbmf.vbmf_rank_from_singular_values(s, 70, 120) == vbmf.vbmf_rank_for_matrix(y) == 8
    assert vbmf.vbmf_rank(y.T) == 8


def test_conv_channel_ranks():
    rng = np.random.default_rng(4)
    core = rng.standard_normal((7, 5, 3, 3))
    k = np.einsum("abij,ta,sb->tsij", core, rng.standard_normal((64, 7)), rng.standard_normal((48, 5)))
    k += 0.02 * np.linalg.norm(k) / math.sqrt(k.size) * rng.standard_normal(k.shape)
    assert vbmf.vbmf_ranks_for_conv(k) == (7, 5)
    assert vbmf.vbmf_ranks_for_conv(k[:, :, :, :1]) == (7, 5)  # any kernel rank (here 1-D 3x1)
