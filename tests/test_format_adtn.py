"""ADTN: exact parameter count, the emitted decode equals the dense weight, the fit lowers the
weight error, rewrite --format adtn runs in onnxruntime, and the torch layer exports with its gates."""

import warnings

import numpy as np
import onnx
import pytest
import torch

import tnonnx
from tnonnx.emit import Builder
from tnonnx.formats import RankSpec, adtn
from tnonnx.nn import FactorizedConv, FactorizedLinear

from onnx_builders import randn, rel_err, run, single_layer_model, value


@pytest.fixture(autouse=True)
def one_torch_thread():
    from tnonnx.fit import torch_threads

    with torch_threads(1):
        yield


@pytest.mark.parametrize("shape,depth", [((120, 84), 3), ((16, 6, 5, 5), 2), ((3, 5), 1), ((64, 64), 4)])
def test_exact_parameter_count_and_decode_equals_the_emitted_weight(shape, depth):
    w = randn(*shape, seed=1).astype(np.float64)
    fact = adtn.fit_dense(w, RankSpec(rank=depth), iters=0) if len(shape) == 2 else \
        adtn.fit_conv(w, RankSpec(rank=depth), iters=0)
    q = int(np.ceil(np.log2(w.size)))
    assert fact.qubits == q and fact.depth == depth
    assert fact.params() == 16 * depth * (q - 1) + 1 == adtn.param_count(depth, q)
    # the decoded weight computed by the emitted subgraph, alone as a graph output
    b = Builder("adtn", np.float32, np.float32)
    name = fact.emit_weight(b)
    graph = onnx.helper.make_graph(b.nodes, "decode", [], [value(name, list(shape))], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (decoded,) = run(model, {})
    dense = fact.to_dense()
    assert rel_err(dense, decoded) < 1e-5
    # float initializers: the gates and the scale only
    assert sum(int(np.prod(t.dims)) for t in b.initializers if t.data_type == onnx.TensorProto.FLOAT) == fact.params()


def test_rank_rules():
    w = randn(120, 84, seed=2).astype(np.float64)
    q = adtn.qubits(w.size)  # 14
    for ratio in (10, 40):
        fact = adtn.fit_dense(w, RankSpec(ratio=ratio), iters=0)
        assert fact.params() <= w.size / ratio
        assert adtn.param_count(fact.depth + 1, q) > w.size / ratio
    assert adtn.fit_dense(w, RankSpec(ratio=1000), iters=0).depth == 1  # at least one layer
    assert adtn.fit_dense(w, RankSpec(rank=5), depth=2, iters=0).depth == 2
    with pytest.raises(tnonnx.errors.NotApplicable, match="tolerance"):
        adtn.fit_dense(w, RankSpec(tol=0.1))


def test_fit_lowers_the_weight_error_and_keeps_the_best():
    w = randn(32, 16, seed=3).astype(np.float64)
    start = adtn.fit_dense(w, RankSpec(rank=3), iters=0).relative_error(w)
    fitted = adtn.fit_dense(w, RankSpec(rank=3), iters=60)
    assert fitted.relative_error(w) < 0.9 * start
    assert fitted.params() == adtn.param_count(3, 9)


def test_a_structured_weight_is_fitted_closely():
    # a weight the generator can represent (decoded from random gates): the fit recovers it
    teacher = adtn.fit_dense(randn(16, 16, seed=4).astype(np.float64), RankSpec(rank=1), iters=0, seed=5)
    w = teacher.to_dense()
    fitted = adtn.fit_dense(w, RankSpec(rank=2), iters=150)
    other = randn(16, 16, seed=6).astype(np.float64)
    unstructured = adtn.fit_dense(other, RankSpec(rank=2), iters=150)
    assert fitted.relative_error(w) < 0.5 * unstructured.relative_error(other)


def test_rewrite_format_adtn_runs_in_onnxruntime():
    model = single_layer_model((48, 60), seed=6)
    new, report = tnonnx.rewrite(model, format="adtn", ratio=10, validate=False, format_options={"iters": 20})
    onnx.checker.check_model(new)
    x = randn(2, 5, 48, seed=7)
    (y,) = run(new, {"x": x})
    fact_params = report.rows[0].params_after
    assert fact_params <= 48 * 60 / 10
    from tnonnx import macs

    assert macs.count(new, {"x": (2, 5, 48)}).params == fact_params
    assert y.shape == (2, 5, 60) and np.isfinite(y).all()


def _export_runs_as_torch(layer, x, path):
    """torch.onnx.export of the layer runs in onnxruntime with the layer's outputs; the path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # without constant folding the gates stay in the file (folded, they would be the dense weight)
        torch.onnx.export(layer, (x,), str(path), dynamo=False, do_constant_folding=False)
    (got,) = run(onnx.load(str(path)), {onnx.load(str(path)).graph.input[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, layer(x).numpy(), rtol=1e-4, atol=1e-5)
    return path


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_layer_trains_and_exports_its_gates(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "linear":
        layer = FactorizedLinear(64, 32, format="adtn", depth=2)
        x = torch.randn(16, 64)
    else:
        layer = FactorizedConv(8, 16, (3, 3), padding=1, format="adtn", rank=2)
        x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        y0 = layer(x)
    assert 0.4 < float(y0.std()) < 2.5  # initialised to keep the input's variance
    target = torch.randn_like(y0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    with torch.no_grad():
        first = float(((layer(x) - target) ** 2).mean())
    for _ in range(15):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        assert float(((layer(x) - target) ** 2).mean()) < first
    path = _export_runs_as_torch(layer, x, tmp_path / "adtn.onnx")
    assert tnonnx.inspect(str(path)).totals.params_before == sum(p.numel() for p in layer.parameters())


def test_modes_give_each_axis_its_own_binary_digits():
    """--modes 28x28,16x16 on a 784 x 256 weight: the state is a 32 x 32 x 16 x 16 tensor
    whose padding is sliced off; the emitted subgraph decodes the same weight."""
    w = randn(784, 256, seed=3).astype(np.float64)
    fact = adtn.fit_dense(w, RankSpec(rank=2), iters=0, modes=((28, 28), (16, 16)))
    assert fact.layout == (28, 28, 16, 16) and fact.qubits == 18
    assert fact.params() == adtn.param_count(2, 18)
    flat = adtn.fit_dense(w, RankSpec(rank=2), iters=0)
    state_cores = dict(fact.cores, scale=np.ones(1))
    state = adtn.decode(state_cores, (2**18,), 2, 18, fact.act)  # the whole state, unpadded
    want = fact.cores["scale"][0] * state.reshape(32, 32, 16, 16)[:28, :28].reshape(784, 256)
    np.testing.assert_allclose(fact.to_dense(), want, rtol=1e-12)
    # the same gates read flat put other entries of the state into the weight
    assert not np.allclose(adtn.decode(fact.cores, (784, 256), 2, 18, fact.act), fact.to_dense())
    assert flat.layout == ()
    b = Builder("adtn", np.float32, np.float32)
    name = fact.emit_weight(b)
    graph = onnx.helper.make_graph(b.nodes, "decode", [], [value(name, [784, 256])], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (decoded,) = run(model, {})
    assert rel_err(fact.to_dense(), decoded) < 1e-5
    with pytest.raises(tnonnx.errors.TnonnxError, match="do not multiply"):
        adtn.fit_dense(w, RankSpec(rank=2), iters=0, modes=((28, 27), (16, 16)))
    # interleaved: the state holds in1 out1 in2 out2 (32 x 16 x 32 x 16), transposed back
    paired = adtn.fit_dense(w, RankSpec(rank=2), iters=0, modes=((28, 28), (16, 16)), interleave=True)
    assert paired.layout == (28, 16, 28, 16) and paired.perm == (0, 2, 1, 3) and paired.qubits == 18
    state = adtn.decode(dict(paired.cores, scale=np.ones(1)), (2**18,), 2, 18, paired.act)
    want = paired.cores["scale"][0] * state.reshape(32, 16, 32, 16)[:28, :, :28].transpose(0, 2, 1, 3).reshape(784, 256)
    np.testing.assert_allclose(paired.to_dense(), want, rtol=1e-12)
    b = Builder("adtn", np.float32, np.float32)
    name = paired.emit_weight(b)
    graph = onnx.helper.make_graph(b.nodes, "decode", [], [value(name, [784, 256])], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert rel_err(paired.to_dense(), run(model, {})[0]) < 1e-5
    with pytest.raises(tnonnx.errors.TnonnxError, match="interleave needs modes"):
        adtn.fit_dense(w, RankSpec(rank=2), iters=0, interleave=True)


def test_torch_layer_with_modes_exports_what_it_computes(tmp_path):
    torch.manual_seed(0)
    layer = FactorizedLinear(96, 16, format="adtn", depth=2, modes=((12, 8), (4, 4)), interleave=True)
    assert layer.factorization().layout == (12, 4, 8, 4) and layer.factorization().qubits == 4 + 2 + 3 + 2
    x = torch.randn(8, 96)
    _export_runs_as_torch(layer, x, tmp_path / "adtn_modes.onnx")
    # and the rewrite path emits the same function for the trained gates
    fact = layer.factorization()
    np.testing.assert_allclose(fact.to_dense(), layer.layer.weight().detach().double().numpy(), rtol=1e-5, atol=1e-7)
