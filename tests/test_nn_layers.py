"""tnonnx.nn: factorised torch layers of every format equal the ONNX subgraph tnonnx emits,
from_linear/from_conv at full rank reproduce the layer, training lowers a loss, and the
torch.onnx export runs in onnxruntime and is counted by `tnonnx inspect`."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tnonnx.errors import TnonnxError
from tnonnx.formats import FORMATS
from tnonnx.nn import FactorizedConv, FactorizedLinear, factorize

from onnx_builders import randn, run, single_layer_model

TRAINING_FORMATS = ["svd", "tt", "tr", "ht", "tucker", "cp", "stt", "str", "sttu", "ntt", "ntr", "adtn"]
STRUCTURED = [f for f in TRAINING_FORMATS if getattr(FORMATS[f], "STRUCTURED", False)]
NONLINEAR = [f for f in TRAINING_FORMATS if getattr(FORMATS[f], "NONLINEAR", False)]
FULL = 10**6
CONVS = [  # (dim, in, out, kernel, stride, padding, dilation, groups)
    (2, 6, 16, 5, 1, 2, 1, 1),
    (1, 8, 12, 3, 2, 1, 1, 1),
    (3, 4, 8, 3, 1, 1, 1, 1),
    (2, 8, 16, 3, 2, 1, 2, 1),
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small layers run many times slower on two contended threads than on one."""
    from tnonnx.fit import torch_threads

    with torch_threads(1):
        yield


def emitted(layer, conv=None):
    """The ONNX subgraph `tnonnx rewrite` emits for the layer's current cores and bias,
    as a one-layer model."""
    import onnx

    from tnonnx.api import emit_layer
    from tnonnx.emit import Builder
    from tnonnx.graph import find_layers

    fact = layer.factorization()
    if conv is None:
        model = single_layer_model((layer.in_features, layer.out_features))
    else:
        shape = (layer.out_channels, layer.in_channels // layer.groups) + layer.kernel_size
        attrs = dict(layer.geometry.attrs, group=layer.groups) if layer.groups > 1 else layer.geometry.attrs
        model = single_layer_model(shape, attrs)
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = layer.in_channels
    new = onnx.ModelProto()
    new.CopyFrom(model)
    found = find_layers(new)[0]
    found.bias = None if layer.bias is None else layer.bias.detach().double().numpy()
    b = Builder("layer/" + fact.format, np.float32, np.float32)
    emit_layer(b, found, fact)
    del new.graph.node[:]
    new.graph.node.extend(b.nodes)
    del new.graph.initializer[:]
    new.graph.initializer.extend(b.initializers)
    return new


def close(a, b, scale=None):
    scale = max(1.0, float(np.abs(b).max())) if scale is None else scale
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("fmt", TRAINING_FORMATS)
def test_linear_equals_emitted_subgraph_and_keeps_variance(fmt):
    layer = FactorizedLinear(48, 60, format=fmt, ratio=4, seed=1)
    assert layer.core_params() <= 48 * 60 / 4 * 1.01 or fmt in STRUCTURED
    x = randn(3, 5, 48, seed=2)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    (y_onnx,) = run(emitted(layer), {"x": x})
    close(y_onnx, y)
    # initialised to keep the variance of a unit-variance input (LeCun), bias zero
    assert 0.5 < float(y.std()) < 2.0, y.std()


@pytest.mark.parametrize("fmt", TRAINING_FORMATS)
@pytest.mark.parametrize("case", CONVS)
def test_conv_equals_emitted_subgraph(fmt, case):
    dim, cin, cout, k, stride, padding, dilation, groups = case
    layer = FactorizedConv(cin, cout, k, stride, padding, dilation, groups, dim=dim, format=fmt, rank=3, seed=3)
    with torch.no_grad():
        layer.bias.normal_()
    x = randn(2, cin, *(9,) * dim, seed=4)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    (y_onnx,) = run(emitted(layer, conv=True), {"x": x})
    close(y_onnx, y)


@pytest.mark.parametrize("fmt", ["tt", "svd", "tucker"])
def test_grouped_conv_equals_emitted_subgraph(fmt):
    layer = FactorizedConv(8, 12, (3, 3), padding=1, groups=2, format=fmt, rank=4, seed=5)
    x = randn(2, 8, 7, 7, seed=6)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    (y_onnx,) = run(emitted(layer, conv=True), {"x": x})
    close(y_onnx, y)
    assert 0.4 < float(y.std()) < 2.5


# adtn: tests/test_format_adtn.py (its fit is iterative at any depth)
@pytest.mark.parametrize("fmt", [f for f in TRAINING_FORMATS if f not in NONLINEAR and f != "adtn"])
def test_from_linear_and_from_conv_at_full_rank(fmt):
    torch.manual_seed(0)
    dense = nn.Linear(24, 30)
    conv = nn.Conv2d(6, 16, 3, stride=2, padding=1)
    x, xc = torch.randn(4, 24), torch.randn(2, 6, 8, 8)
    lin = FactorizedLinear.from_linear(dense, format=fmt, rank=FULL)
    fconv = FactorizedConv.from_conv(conv, format=fmt, rank=FULL)
    with torch.no_grad():
        if fmt in STRUCTURED:  # a semi-tensor product represents only weights of its structure:
            # the layer computes the format's own fit of the weight
            w = lin.factorization().to_dense()
            close(lin(x).numpy(), (x.double().numpy() @ w + dense.bias.numpy()))
        else:
            close(lin(x).numpy(), dense(x).numpy())
            close(fconv(xc).numpy(), conv(xc).numpy())
        close(fconv(xc).numpy(), nn.functional.conv2d(xc, torch.as_tensor(
            fconv.factorization().to_dense(), dtype=torch.float32), fconv.bias, 2, 1).numpy())


@pytest.mark.parametrize("fmt", NONLINEAR)
def test_nonlinear_from_linear_near_the_layer(fmt):
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    x = torch.randn(64, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = FactorizedLinear.from_linear(dense, format=fmt, rank=FULL, act="tanh", iters=3)
    with torch.no_grad():
        err = float((lin(x) - dense(x)).norm() / dense(x).norm())
    assert err < 0.05, err  # tanh's near-linear start: about a per cent


@pytest.mark.parametrize("fmt", TRAINING_FORMATS)
def test_a_few_steps_lower_a_loss(fmt):
    torch.manual_seed(0)
    teacher = nn.Linear(32, 16)
    layer = FactorizedLinear(32, 16, format=fmt, rank=4, seed=0)
    x = torch.randn(128, 32)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)

    def loss():
        return ((layer(x) - target) ** 2).mean()

    first = float(loss().detach())
    for _ in range(20):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert float(loss().detach()) < 0.9 * first


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


def test_factorize_replaces_selected_layers_and_leaves_the_model():
    net = Net()
    small = factorize(net, format="tt", ratio=3, exclude="out")
    assert isinstance(small.conv, FactorizedConv) and isinstance(small.fc, FactorizedLinear)
    assert isinstance(small.out, nn.Linear) and isinstance(net.fc, nn.Linear)
    full = factorize(net, format="tucker", rank=FULL)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        close(full(x).numpy(), net(x).numpy())
    scratch = factorize(net, format="ht", rank=2, pretrained=False, include="fc")
    assert isinstance(scratch.fc, FactorizedLinear) and isinstance(scratch.conv, nn.Conv2d)
    with pytest.raises(TnonnxError, match="no Linear or Conv"):
        factorize(net, format="tt", rank=2, include="nothing")
    with pytest.raises(TnonnxError, match="exactly one"):
        FactorizedLinear(8, 8, format="tt")
    with pytest.raises(TnonnxError, match="format 'xx'"):
        FactorizedLinear(8, 8, format="xx", rank=2)


@pytest.mark.parametrize("fmt,dynamo", [(f, False) for f in TRAINING_FORMATS if f != "adtn"] + [("tt", True), ("sttu", True),
                                                                                  ("ntr", True)])
def test_torch_onnx_export_runs_and_is_counted(fmt, dynamo, tmp_path):
    from tnonnx import inspect

    torch.manual_seed(0)
    net = factorize(Net(), format=fmt, rank=3, pretrained=False, exclude="out").eval()
    x = torch.randn(2, 4, 8, 8)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False, input_names=["x"], output_names=["y"])
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "b"}})
    with torch.no_grad():
        want = net(x).numpy()
    import onnx

    (got,) = run(onnx.load(str(path)), {"x": x.numpy()})
    close(got, want)
    params = sum(p.numel() for p in net.parameters())
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1)
    assert inspect(str(path)).totals.params_before == stored
    # the legacy exporter stores the cores as they are; the dynamo exporter's optimiser folds
    # the constant parts of the stage weights (a merged train can be larger than its cores)
    assert stored == params if not dynamo else params <= stored < sum(p.numel() for p in Net().parameters())


def _two_layers() -> nn.Module:
    """fc1's weight has rank 2, fc2's is full rank: a budget should squeeze fc1, not fc2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64))
    return model


def test_factorize_budget_allocates_ranks_across_layers():
    model = _two_layers()
    out = factorize(model, format="svd", budget="4x")
    cores = lambda layer: sum(p.numel() for n, p in layer.named_parameters() if n != "bias")  # noqa: E731
    assert cores(out[0]) + cores(out[2]) <= 2 * 64 * 64 / 4
    # uniform ratio 4 is rank 8 each: the rank-2 weight gives up what it does not need to fc2
    assert out[0].ranks[0] < 8 < out[2].ranks[0]
    x = torch.randn(16, 64)
    with torch.no_grad():
        exact = float((out[0](x) - model[0](x)).norm() / model[0](x).norm())
    assert exact < 1e-5
    uniform = factorize(model, format="svd", ratio=4)
    with torch.no_grad():
        err = lambda m: float((m(x) - model(x)).norm() / model(x).norm())  # noqa: E731
        assert err(out) < err(uniform)


def test_factorize_budget_rules():
    model = _two_layers()
    with pytest.raises(TnonnxError, match="budget= takes the place of rank="):
        factorize(model, format="svd", budget=4, rank=2)
    with pytest.raises(TnonnxError, match="must be a reduction factor above 1"):
        factorize(model, format="svd", budget=0.5)
    scratch = factorize(model, format="svd", budget=4, pretrained=False)
    assert [scratch[i].ranks for i in (0, 2)] == [factorize(model, format="svd", ratio=4, pretrained=False)[i].ranks
                                                      for i in (0, 2)]
