"""The contraction engine on networks of every shape the formats use: a ring (TR), a
hyperedge (CP's rank held by every factor), a central core (Tucker), a tree (HT)."""


import numpy as np
import pytest
import torch

from tnonnx import macs
from tnonnx.emit import Builder, Chain, Core, TorchOps, best_order, emit_chain, emit_chain_einsum, run_chain
from tnonnx.formats.base import ChainFactorization

from onnx_builders import make_model, run, value


def _ring():
    sizes = dict(n0=4, n1=3, n2=5, m0=2, m1=6, m2=3, a=3, b=2, c=4)
    cores = [Core("G0", ("a", "n0", "m0", "b")), Core("G1", ("b", "n1", "m1", "c")), Core("G2", ("c", "n2", "m2", "a"))]
    return sizes, cores


def _cp():
    sizes = dict(n0=4, n1=3, n2=5, m0=2, m1=6, m2=3, r=5)
    cores = [Core(f"A{k}", (f"n{k}", "r")) for k in range(3)] + [Core(f"B{k}", (f"m{k}", "r")) for k in range(3)]
    return sizes, cores


def _tucker():
    sizes = dict(n0=4, n1=6, m0=5, m1=3, p0=2, p1=3, q0=3, q1=2)
    cores = [Core("U0", ("n0", "p0")), Core("U1", ("n1", "p1")), Core("C", ("p0", "p1", "q0", "q1")),
             Core("V0", ("m0", "q0")), Core("V1", ("m1", "q1"))]
    return sizes, cores


def _tree():
    sizes = dict(n0=3, m0=2, n1=4, m1=3, n2=2, m2=5, n3=3, m3=2, u0=2, u1=3, u2=2, u3=3, s=4, t=3)
    cores = [Core(f"L{k}", (f"n{k}", f"m{k}", f"u{k}")) for k in range(4)]
    cores += [Core("B01", ("u0", "u1", "s")), Core("B23", ("u2", "u3", "t")), Core("root", ("s", "t"))]
    return sizes, cores


NETWORKS = {"ring": _ring, "cp": _cp, "tucker": _tucker, "tree": _tree}


def _factorization(name):
    sizes, cores = NETWORKS[name]()
    rng = np.random.default_rng(0)
    arrays = {c.key: rng.standard_normal([sizes[l] for l in c.labels]) for c in cores}
    ins = tuple(l for l in sizes if l.startswith("n"))
    outs = tuple(l for l in sizes if l.startswith("m"))
    chain = Chain(ins, outs, sizes, best_order(cores, ins, outs, sizes))
    return ChainFactorization(name, chain, arrays, ()), cores


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_engine_matches_the_dense_weight(name):
    fact, _ = _factorization(name)
    x = np.random.default_rng(1).standard_normal((2, 3, fact.chain.in_features))
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        y = run_chain(TorchOps(2), torch.from_numpy(x), fact.chain, {k: torch.from_numpy(v) for k, v in fact.cores.items()})
    np.testing.assert_allclose(y.numpy(), fact.apply(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("emitter", [emit_chain, emit_chain_einsum])
def test_onnx_emission_matches_and_macs_are_counted(name, emitter):
    fact, _ = _factorization(name)
    n, m = fact.chain.in_features, fact.chain.out_features
    b = Builder("layer", np.float32, np.float32)
    emitter(b, "x", fact.chain, fact.cores, 2)
    b.rename_output("y")
    model = make_model(b.nodes, [value("x", [2, 3, n])], [value("y", [2, 3, m])], b.initializers)
    x = np.random.default_rng(2).standard_normal((2, 3, n)).astype(np.float32)
    (out,) = run(model, {"x": x})
    np.testing.assert_allclose(out, fact.apply(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    if emitter is emit_chain:
        assert macs.count(model, {"x": (2, 3, n)}).total == 6 * fact.chain.macs_per_row()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_best_order_is_no_worse_than_the_listed_order(name):
    fact, cores = _factorization(name)
    listed = Chain(fact.chain.in_labels, fact.chain.out_labels, fact.chain.sizes, cores)
    assert fact.chain.macs_per_row() <= listed.macs_per_row()


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_activation_between_steps_is_the_same_in_every_backend(activation):
    fact, _ = _factorization("ring")
    dense = fact.to_dense()
    fact.chain.activation = activation
    n, m = fact.chain.in_features, fact.chain.out_features
    x = np.random.default_rng(3).standard_normal((4, n))
    ref = fact.apply(x)
    assert not np.allclose(ref, x @ dense)  # nonlinear: no longer the dense product
    with torch.no_grad():
        y = run_chain(TorchOps(1), torch.from_numpy(x), fact.chain, {k: torch.from_numpy(v) for k, v in fact.cores.items()})
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-10)
    b = Builder("layer", np.float32, np.float32)
    emit_chain(b, "x", fact.chain, fact.cores, 1)
    b.rename_output("y")
    model = make_model(b.nodes, [value("x", [4, n])], [value("y", [4, m])], b.initializers)
    (out,) = run(model, {"x": x.astype(np.float32)})
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
