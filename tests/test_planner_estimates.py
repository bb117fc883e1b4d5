"""The planner's cheap estimates (tnonnx/estimate.py) and its lazy timing: what is not fitted
or not timed must not change what is chosen."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tnonnx import activations
from tnonnx import choose
from tnonnx import planner as planning
from tnonnx.planner import Planner
from tnonnx.patches import im2col
from tnonnx import fit as fitting
from tnonnx import estimate
from tnonnx.formats import RankSpec
from tnonnx.formats.base import ConvGeometry
from tnonnx.graph import Layer
from tnonnx.plan import Fitter, LayerPlan, fit_error

SPECS = [RankSpec(rank=r) for r in (1, 2, 4, 8, 16, 32)]


def _decaying(n: int, m: int, seed: int, scale: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, min(n, m))))
    v, _ = np.linalg.qr(rng.standard_normal((m, min(n, m))))
    return (u * np.exp(-np.arange(min(n, m)) / scale)) @ v.T


def _dense(n=64, m=48, seed=0) -> Layer:
    return Layer("mm", "MatMul", None, None, kind="dense", weight=_decaying(n, m, seed), weight_key="mm")


def _inputs(n: int, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 8.0)
    return rng.standard_normal((rows, n)) @ mix


def _conv() -> tuple[Layer, fitting.LayerData]:
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((12, 6, 3, 3))
    geometry = ConvGeometry((3, 3), {"pads": [1, 1, 1, 1]}, in_spatial=(8, 8), out_spatial=(8, 8))
    layer = Layer("conv", "Conv", None, None, kind="conv", weight=kernel, weight_key="conv", geometry=geometry)
    maps = rng.standard_normal((4, 6, 8, 8)).astype(np.float32)
    rows = im2col(maps, (3, 3), {"pads": [1, 1, 1, 1]}).astype(np.float64)
    return layer, fitting.layer_data(layer, activations.Capture(rows.T @ rows, rows.shape[0]))


def _fitted(layer, fitter, specs, fmt="svd", final=False):
    out = []
    for spec in specs:
        fact = fitter.fit(layer, fmt, spec, final=final)
        if fact.params() >= layer.params:
            break
        out.append((fact.params(), fit_error(fact) ** 2))
    return out


@pytest.mark.parametrize("case", ["dense data-free", "dense aware", "dense held-out aware", "conv data-free",
                                  "conv aware", "table aware", "dense weighed aware", "dense weighed held-out aware"])
def test_svd_estimates_are_what_the_fits_measure(case):
    if case.startswith("table"):  # an embedding table weighted by index counts, some rows never used
        from tnonnx.embedding import EmbeddingData

        layer = Layer("embed", "Gather", None, None, kind="embedding", weight=_decaying(80, 24, 4), weight_key="t")
        counts = np.random.default_rng(5).poisson(3.0, 80) * (np.arange(80) % 3 != 0)
        data = EmbeddingData(counts, layer.weight)
    elif case.startswith("dense"):
        layer = _dense()
        x, held = _inputs(64, 300, seed=1), _inputs(64, 100, seed=2)
        capture = activations.Capture(x.T @ x, 300)
        if "held-out" in case:  # errors judged on the held-out rows
            capture.held_gram, capture.held_count = held.T @ held, 100
        data = fitting.layer_data(layer, capture)
        if "weighed" in case:  # outputs weighed as an attention partner's moments weigh them
            mix = np.random.default_rng(6).standard_normal((48, 48)) * np.exp(-np.arange(48) / 6.0)
            data.weigh_outputs(mix @ mix.T)
    else:
        layer, data = _conv()
    fitter = Fitter(data={layer.name: data} if case.endswith("aware") else {})
    options = choose.candidate_options(LayerPlan(layer, "svd", RankSpec()), fitter, [("svd", s) for s in SPECS])
    assert not fitter.cache  # read off the spectrum: nothing fitted
    expected = _fitted(layer, fitter, SPECS)
    assert [o.params for o in options] == [p for p, _ in expected]
    np.testing.assert_allclose([o.error for o in options], [e for _, e in expected], rtol=1e-6, atol=1e-12)
    for o in options:
        fact = fitter.fit(layer, "svd", o.spec, final=False)
        assert o.macs_ratio == pytest.approx(choose._macs_ratio(fact, layer))


def test_cheap_estimates_rank_candidates_in_the_full_fits_order():
    """The planner ranks candidates by svd's spectrum (exact) and tt's unrefined fit, which
    the final fit refines on the data: an upper bound of the refined error. On a clear case
    (errors far apart) both orders agree."""
    layer = _dense(64, 64, seed=4)
    x = _inputs(64, 400, seed=5)
    fitter = Fitter(data={layer.name: fitting.layer_data(layer, activations.Capture(x.T @ x, 400))})
    trials = [("svd", RankSpec(rank=r)) for r in (1, 4, 16)] + [("tt", RankSpec(rank=1))]
    options = choose.candidate_options(LayerPlan(layer, "svd", RankSpec(), order=2), fitter, trials)
    cheap = [o.error for o in options]
    full = [fit_error(fitter.fit(layer, o.format, o.spec, order=2, final=True)) ** 2 for o in options]
    assert [o.format for o in options] == ["svd"] * 3 + ["tt"]
    assert list(np.argsort(cheap)) == list(np.argsort(full)) == [2, 1, 0, 3]
    assert all(f <= c + 1e-12 for c, f in zip(cheap, full))


def test_a_slow_format_is_fitted_only_where_its_proxy_may_win():
    assert estimate.slow("tr") == "tt" and estimate.slow("tt") is None and estimate.slow("svd") is None
    others = [(10, 0.5), (20, 0.1), (40, 0.01)]
    assert estimate.may_win(20, 0.15, others)  # within the margin of svd's 0.1 at 20 parameters
    assert not estimate.may_win(40, 0.05, others)  # five times the best at 40
    assert estimate.may_win(5, 0.9, others)  # nothing as small to compare with


def test_tr_is_skipped_where_tt_is_far_from_the_front():
    """A weight of exact matrix rank 2 in a shape tt's modes do not follow: svd is exact at
    rank 2, tt at small caps is far off, so tr is not fitted at those caps."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 2)) @ rng.standard_normal((2, 64))
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w, weight_key="mm")
    fitter, counts = Fitter(), {}
    trials = [(f, RankSpec(rank=r)) for f in ("svd", "tt", "tr") for r in (1, 2, 4)]
    options = choose.candidate_options(LayerPlan(layer, "svd", RankSpec()), fitter, trials, counts)
    assert counts["skipped"] >= 1 and not [o for o in options if o.format == "tr" and o.spec.rank == 1]
    assert not any(key[1] == "tr" and key[2].rank == 1 for key in fitter.cache)


def _option(fmt, params, error, rank=1):
    return choose.Option(fmt, RankSpec(rank=rank), params, error)


def test_timing_only_the_front_chooses_what_timing_everything_chooses(monkeypatch):
    """Fixed timings: some options on the (parameters, error) front are slower than dense, so
    options they dominate come onto the front. Timing lazily gives the same front as timing
    all and then applying the floor, with fewer timings."""
    ms = {("svd", 10): 0.5, ("svd", 20): 2.0, ("svd", 40): 0.7, ("tt", 12): 0.4, ("tt", 30): 0.6,
          ("tt", 25): 3.0, ("tr", 50): 0.9, ("svd", 60): 0.8}
    errors = {("svd", 10): 0.5, ("svd", 20): 0.2, ("svd", 40): 0.05, ("tt", 12): 0.55, ("tt", 30): 0.3,
              ("tt", 25): 0.1, ("tr", 50): 0.08, ("svd", 60): 0.01}
    options = [_option(f, p, errors[(f, p)], rank=i + 1) for i, (f, p) in enumerate(errors)]
    timed = []

    def fake_time(group, opts, fitter, timer, emit):
        timed.extend(opts)
        dense = choose.Option(None, None, 100, 0.0, ms=1.0)
        return [dense] + [dataclasses.replace(o, ms=ms[(o.format, o.params)]) for o in opts]

    monkeypatch.setattr(planning, "time_options", fake_time)  # as the planner looks it up
    plan = LayerPlan(Layer("mm", "MatMul", None, None, kind="dense", weight=np.zeros((10, 10)), weight_key="mm"),
                     "svd", RankSpec())
    planner = Planner([plan], Fitter(), ("svd",), 2.0, choose.SpeedRules(None, True, "auto"), None, None, None)
    lazy = planner._timed_front([plan], options)
    everything = fake_time(None, options, None, None, None)
    kept, _ = choose.apply_floor(everything)
    expected = choose.pareto(kept, by_time=False)
    key = lambda o: (str(o.format), o.params)  # noqa: E731
    assert sorted(map(key, lazy)) == sorted(map(key, expected))
    assert len(timed) - len(options) < len(options)  # fewer options timed than all of them


def test_errors_are_measured_when_first_asked_for():
    """Fitter.fit(measure=False) (the planner's timing) leaves the errors unset; a later
    fit of the same key measures them, equal to an eager fit's."""
    layer = _dense()
    data = fitting.layer_data(layer, activations.Capture(*_gram(_inputs(64, 200, seed=5))))
    lazy, eager = Fitter(None, {"mm": data}), Fitter(None, {"mm": data})
    fact = lazy.fit(layer, "svd", RankSpec(rank=6), final=False, measure=False)
    assert fact.weight_error is None and fact.output_error is None and not fact.measured
    again = lazy.fit(layer, "svd", RankSpec(rank=6), final=False)
    want = eager.fit(layer, "svd", RankSpec(rank=6), final=False)
    assert again is fact and fact.measured
    assert (fact.weight_error, fact.output_error, fact.held_out_error) == pytest.approx(
        (want.weight_error, want.output_error, want.held_out_error))
    assert fact.output_error > 0


def _gram(x: np.ndarray) -> tuple[np.ndarray, int]:
    return x.T @ x, x.shape[0]


@pytest.mark.parametrize("fmt", ["tt", "ht", "tucker"])
def test_output_errors_through_the_kernel_are_the_chain_pushed_errors(fmt):
    """LayerData's errors compose the chain's kernel once and take one product with the
    basis: the same number as pushing the basis rows through the cores."""
    layer = _dense()
    data = fitting.layer_data(layer, activations.Capture(*_gram(_inputs(64, 200, seed=5))))
    fact = Fitter(None, {"mm": data}).fit(layer, fmt, RankSpec(rank=3), final=False, measure=False)
    pushed = fitting._relative(fact.apply(data.basis), data.target)
    assert data.output_error(fact) == pytest.approx(pushed, rel=1e-10)
    assert data.output_error(fact, fact.to_dense()) == pytest.approx(pushed, rel=1e-10)


@pytest.mark.parametrize("width", [1024, 4096, 8192])
def test_the_ladder_reaches_the_svd_rank_that_halves_a_wide_layer(width):
    """--budget 2x on a square layer of `width` wants svd rank width / 4; a ladder ending at
    512 held a 4096-wide layer at 4x fewer parameters (rank 512) whatever the budget."""
    caps = [spec.rank for _, spec in choose.ladder(("svd",), simd=True)]
    half = width * width // (2 * 2 * width)  # r (n + m) <= n m / 2
    best = max(c for c in caps if c <= half)
    assert best >= half / 1.5


def test_tr_trials_past_tts_last_cap_are_not_counted_as_skipped():
    """Once tt has stopped (here: predicted far slower than dense from rank 2 on), the
    ladder's larger caps, up to 8192, are not tr trials "skipped where tt at the same cap was
    far from the best": there is no tt at those caps."""
    class TTSlowFromRank2:
        def slower(self, layer, fact, emissions):
            return fact.format == "tt" and max(fact.ranks) >= 2

    w = np.random.default_rng(7).standard_normal((64, 64))
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w, weight_key="mm")
    counts = {}
    choose.candidate_options(LayerPlan(layer, "svd", RankSpec()), Fitter(), choose.ladder(("svd", "tt", "tr")),
                             counts, prune=TTSlowFromRank2())
    assert counts["predicted slower"] == 1
    assert counts.get("skipped", 0) <= 1  # at most tr at cap 1, the one cap tt was fitted at
