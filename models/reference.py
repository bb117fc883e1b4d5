"""Small reference networks used to exercise tnonnx.

Every builder returns a tuple ``(module, example, input_names, output_names,
dynamic_axes)``:

* ``module``: a ``torch.nn.Module`` in eval mode, weights drawn from a fixed seed,
* ``example``: an example input tensor (batch 2, so that exporters do not
  specialise the batch axis to 1),
* ``input_names`` / ``output_names``: lists of ONNX graph input/output names,
* ``dynamic_axes``: ``{name: {0: "batch"}}`` for every input and output.

Models (input shape without batch axis -> output):

=====================  ==================  =====================================
name                   input ``input``     notes
=====================  ==================  =====================================
``mlp``                784                 Linear 784-256-128-10, ReLU
``lenet5``             1x28x28             classic LeNet-5 (padding 2 on conv1)
``small_resnet``       3x32x32             ResNet: 3 stages x 2 BasicBlocks,
                                           16/32/64 channels, BatchNorm
``conv_zoo``           2x8x8x8             Conv1d, Conv2d (dilated), Conv3d on
                                           views of one input, one Linear
``transformer_block``  16x128 (seq x d)    pre-norm encoder block, 4 heads,
                                           FFN 512, GELU, explicit q/k/v/out
=====================  ==================  =====================================

All outputs are named ``logits`` (``output`` for the transformer block).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

SEED = 0
BATCH = 2  # example batch size; > 1 so that the batch axis stays symbolic


def _batch_axes(input_names, output_names):
    return {n: {0: "batch"} for n in list(input_names) + list(output_names)}


def _finish(module: nn.Module, example: torch.Tensor, output_name: str = "logits"):
    module.eval()
    inputs, outputs = ["input"], [output_name]
    return module, example, inputs, outputs, _batch_axes(inputs, outputs)


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def mlp():
    """MLP 784-256-128-10 with ReLU; input ``(batch, 784)``."""
    torch.manual_seed(SEED)
    m = MLP()
    x = torch.randn(BATCH, 784)
    return _finish(m, x)


# ------------------------------------------------------------------------ LeNet-5
class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 6x14x14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 16x5x5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def lenet5():
    """LeNet-5 for ``(batch, 1, 28, 28)`` inputs, 10 logits."""
    torch.manual_seed(SEED)
    m = LeNet5()
    x = torch.randn(BATCH, 1, 28, 28)
    return _finish(m, x)


# ------------------------------------------------------------------ small ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _randomise_batchnorm(module: nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics (untrained nets have 0/1)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def small_resnet():
    """ResNet for ``(batch, 3, 32, 32)``: 16/32/64 channels, 2 BasicBlocks per stage."""
    torch.manual_seed(SEED)
    m = SmallResNet()
    _randomise_batchnorm(m)
    x = torch.randn(BATCH, 3, 32, 32)
    return _finish(m, x)


# ---------------------------------------------------------------------- conv zoo
class ConvZoo(nn.Module):
    """Conv1d, Conv2d and Conv3d in one graph, all fed from one input.

    Input ``x``: ``(batch, 2, 8, 8, 8)``.

    * Conv3d(2, 4, k=3, padding=1) on ``x``                      -> (batch, 4, 8, 8, 8)
    * Conv2d(16, 8, k=3, dilation=2, padding=2) on x viewed as
      ``(batch, 16, 8, 8)``                                        -> (batch, 8, 8, 8)
    * Conv1d(16, 8, k=3, stride=2, padding=1) on x viewed as
      ``(batch, 16, 64)``                                          -> (batch, 8, 32)

    The three results are flattened, concatenated (2048 + 512 + 256 = 2816
    features) and fed to one Linear(2816, 10).
    """

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2d = nn.Conv2d(16, 8, 3, padding=2, dilation=2)
        self.conv1d = nn.Conv1d(16, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 512 + 8 * 64 + 8 * 32, 10)

    def forward(self, x):
        x2 = torch.flatten(x, 1, 2)  # (B, 16, 8, 8)
        x1 = torch.flatten(x2, 2, 3)  # (B, 16, 64)
        y3 = F.relu(self.conv3d(x))
        y2 = F.relu(self.conv2d(x2))
        y1 = F.relu(self.conv1d(x1))
        y = torch.cat([torch.flatten(y3, 1), torch.flatten(y2, 1), torch.flatten(y1, 1)], 1)
        return self.fc(y)


def conv_zoo():
    """Conv1d + dilated Conv2d + Conv3d, input ``(batch, 2, 8, 8, 8)``."""
    torch.manual_seed(SEED)
    m = ConvZoo()
    x = torch.randn(BATCH, 2, 8, 8, 8)
    return _finish(m, x)


# ------------------------------------------------------------- transformer block
class TransformerBlock(nn.Module):
    """Pre-norm encoder block with explicit projections.

    Attention is written with ``torch.matmul`` so that the two attention
    MatMuls (QK^T and AV) have no constant operand, while the q/k/v/out and FFN
    projections are ``nn.Linear`` (MatMul with a constant weight).
    """

    def __init__(self, d_model: int = 128, n_heads: int = 4, d_ff: int = 512):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)

    def _heads(self, t):  # (B, S, D) -> (B, H, S, Dh)
        b, s, _ = t.shape
        return t.reshape(b, s, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self._heads(self.q_proj(h)), self._heads(self.k_proj(h)), self._heads(self.v_proj(h))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        att = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, S, Dh)
        b, _, s, _ = att.shape
        att = att.transpose(1, 2).reshape(b, s, self.n_heads * self.d_head)  # (B, S, D)
        x = x + self.out_proj(att)
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return x


def transformer_block():
    """Transformer encoder block, input ``(batch, 16, 128)``, output same shape."""
    torch.manual_seed(SEED)
    m = TransformerBlock()
    # non-trivial LayerNorm affine parameters
    with torch.no_grad():
        for ln in (m.ln1, m.ln2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.1, 0.1)
    x = torch.randn(BATCH, 16, 128)
    return _finish(m, x, output_name="output")


MODELS: dict[str, Callable] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "small_resnet": small_resnet,
    "conv_zoo": conv_zoo,
    "transformer_block": transformer_block,
}


def build(name: str):
    """Return ``(module, example, input_names, output_names, dynamic_axes)`` for *name*."""
    try:
        return MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown reference model {name!r}; choose from {sorted(MODELS)}") from None
