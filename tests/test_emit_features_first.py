"""The features-first emission (emit_layout.py) computes what the rows-first chain does:
exactly the dense weight at full rank, the same function for nonlinear chains, in numpy,
torch and ONNX Runtime alike, with any number of batch axes."""

import functools
import warnings

import numpy as np
import pytest
import torch

from tnonnx.emit import Builder, Chain, Core, NumpyOps, TorchOps, best_order, run_chain
from tnonnx.emit_layout import layout_candidates, plan_features_first, run_chain_features_first
from tnonnx.formats import FORMATS, RankSpec
from tnonnx.formats.base import ChainFactorization

from onnx_builders import make_model, run, value

N, M = 24, 36
SHAPES = {1: (5, N), 2: (2, 3, N), 3: (2, 1, 3, N)}
LINEAR = ["tt", "tr", "ht", "tucker", "svd", "cp", "stt", "str", "sttu"]
NONLINEAR = ["ntt", "ntr"]


@functools.lru_cache(maxsize=None)
def _fit(name, order=None):
    weight = np.random.default_rng(0).standard_normal((N, M))
    # ntt/ntr: a few distillation steps on random inputs are enough to test the emission
    options = {"iters": 3, "act": "tanh", "samples": 64} if name in NONLINEAR else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ntt/ntr without calibration data
        return FORMATS[name].fit_dense(weight, RankSpec(rank=64), order=order, **options), weight


def _x(batch_rank, seed=1):
    return np.random.default_rng(seed).standard_normal(SHAPES[batch_rank])


def _onnx(fact, batch_rank, x):
    b = Builder("layer", np.float32, np.float32)
    fact.emit_features_first(b, "x", batch_rank)
    b.rename_output("y")
    assert not any(n.op_type == "Transpose" and n.input[0] in {i.name for i in b.initializers} for n in b.nodes)
    out_shape = list(x.shape[:-1]) + [fact.chain.out_features]
    model = make_model(b.nodes, [value("x", list(x.shape))], [value("y", out_shape)], b.initializers)
    (y,) = run(model, {"x": x.astype(np.float32)})
    return y, model


@pytest.mark.parametrize("batch_rank", [1, 2, 3])
@pytest.mark.parametrize("name", LINEAR)
def test_exact_at_full_rank(name, batch_rank):
    fact, weight = _fit(name)
    if name in ("tt", "tr", "ht", "tucker", "svd"):  # no projection: full rank is the weight itself
        assert fact.relative_error(weight) < 1e-8
    x = _x(batch_rank)
    y = run_chain_features_first(NumpyOps(batch_rank), x, fact.chain, fact.cores)
    np.testing.assert_allclose(y, x @ fact.to_dense(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("batch_rank", [1, 3])
@pytest.mark.parametrize("name", LINEAR + NONLINEAR)
def test_numpy_torch_and_onnx_agree_with_the_rows_first_chain(name, batch_rank):
    fact, _ = _fit(name)
    x = _x(batch_rank, seed=2)
    ref = run_chain(NumpyOps(batch_rank), x, fact.chain, fact.cores)
    scale = np.abs(ref).max()
    y = run_chain_features_first(NumpyOps(batch_rank), x, fact.chain, fact.cores)
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9 * scale)
    with torch.no_grad():  # the format's module is float32
        xt = torch.from_numpy(x.astype(np.float32))
        y_module = fact.torch_module()(xt).numpy()
        y_torch = run_chain_features_first(TorchOps(batch_rank), xt, fact.chain,
                                           {k: torch.from_numpy(v.astype(np.float32)) for k, v in fact.cores.items()})
    np.testing.assert_allclose(y_torch.numpy(), y_module, rtol=1e-5, atol=1e-5 * scale)
    y_onnx, _ = _onnx(fact, batch_rank, x)
    np.testing.assert_allclose(y_onnx, y, rtol=1e-4, atol=1e-5 * scale)


def test_a_nonlinear_chain_keeps_its_order():
    fact, _ = _fit("ntt", order=3)
    assert [s.core.key for s in plan_features_first(fact.chain).steps] == [c.key for c in fact.chain.steps]


def _network(name):
    """Labels held by three or more cores (kept open: a batched MatMul)."""
    if name == "cp":
        sizes = dict(n0=4, n1=3, n2=5, m0=2, m1=6, m2=3, r=5)
        cores = [Core(f"A{k}", (f"n{k}", "r")) for k in range(3)] + [Core(f"B{k}", (f"m{k}", "r")) for k in range(3)]
    else:  # a ring whose bond `a` is also held by a middle core
        sizes = dict(n0=4, n1=3, n2=5, m0=2, m1=6, m2=3, a=3, b=2, c=4)
        cores = [Core("G0", ("a", "n0", "m0", "b")), Core("G1", ("a", "b", "n1", "m1", "c")),
                 Core("G2", ("c", "n2", "m2", "a"))]
    rng = np.random.default_rng(3)
    arrays = {c.key: rng.standard_normal([sizes[l] for l in c.labels]) for c in cores}
    ins, outs = ("n0", "n1", "n2"), ("m0", "m1", "m2")
    return ChainFactorization(name, Chain(ins, outs, sizes, best_order(cores, ins, outs, sizes)), arrays, ())


@pytest.mark.parametrize("name", ["cp", "ring3"])
@pytest.mark.parametrize("batch_rank", [1, 2])
def test_kept_labels(name, batch_rank):
    fact = _network(name)
    assert any(step.keep for step in plan_features_first(fact.chain).steps)
    x = np.random.default_rng(4).standard_normal((2, 3, 60)[-batch_rank - 1:])
    y = run_chain_features_first(NumpyOps(batch_rank), x, fact.chain, fact.cores)
    np.testing.assert_allclose(y, x @ fact.to_dense(), rtol=1e-9, atol=1e-9)
    y_onnx, _ = _onnx(fact, batch_rank, x)
    np.testing.assert_allclose(y_onnx, y, rtol=1e-4, atol=1e-4)


def test_batch_rank_one_needs_no_shape_arithmetic():
    fact, _ = _fit("tt", order=3)
    _, model = _onnx(fact, 1, _x(1))
    ops = [n.op_type for n in model.graph.node]
    assert "Shape" not in ops and ops.count("Transpose") == 2  # in and out, none between the cores


@pytest.mark.parametrize("name", ["tt", "tucker", "cp"])
def test_every_candidate_layout_is_exact(name):
    fact, _ = _fit(name)
    x = _x(2)
    layouts = layout_candidates(fact.chain)
    assert len(layouts) >= 1 and layouts[0] is not None
    for layout in layouts:
        y = run_chain_features_first(NumpyOps(2), x, fact.chain, fact.cores, layout)
        np.testing.assert_allclose(y, x @ fact.to_dense(), rtol=1e-9, atol=1e-9)
