"""Train LeNet-5 on Fashion-MNIST with ADMM towards tensor-train ranks, factorise, fine-tune,
export to ONNX and check the export with `tnonnx validate`.

    python examples/admm_lenet_fashion.py [--data-dir DIR] [--train 10000] [--out-dir out]

Data: the idx files of the Debian package dataset-fashion-mnist (default directory
/usr/share/datasets/fashion-mnist). Writes dense.onnx, small.onnx and test.npz into
--out-dir and exits with `tnonnx validate`'s exit code (0: accuracy within --max-drop points
of the dense network's on 2000 test images).
"""

import argparse
import copy
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tnonnx.nn import ADMM


def read_idx(path):
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(data_dir, split, count):
    x = read_idx(Path(data_dir) / f"{split}-images-idx3-ubyte.gz")[:count].astype(np.float32)[:, None] / 255
    y = read_idx(Path(data_dir) / f"{split}-labels-idx1-ubyte.gz")[:count].astype(np.int64)
    return torch.from_numpy((x - 0.2860) / 0.3530), torch.from_numpy(y)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def train(net, x, y, epochs, lr, admm=None):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if admm is not None:
                loss = loss + admm.penalty()  # rho/2 ||W - Z + U||^2
            opt.zero_grad()
            loss.backward()
            opt.step()
        if admm is not None:
            admm.step()  # once per epoch: Z <- projection of W + U, U <- U + W - Z
            print(f"ADMM epoch {epoch}: distance to the rank set", {k: round(v, 3) for k, v in admm.distance().items()})


def accuracy(net, x, y):
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=4.0, help="parameter reduction of conv2, fc1, fc2")
    ap.add_argument("--max-drop", type=float, default=2.0, help="accuracy points validate allows to lose")
    ap.add_argument("--out-dir", default="out")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = load(args.data_dir, "train", args.train)
    xt, yt = load(args.data_dir, "t10k", 2000)

    net = LeNet5()
    train(net, x, y, args.epochs, 2e-3)
    print("dense accuracy", accuracy(net, xt, yt))
    dense = copy.deepcopy(net)  # the reference for `tnonnx validate`

    # pull conv2, fc1 and fc2 towards TT ranks --ratio times smaller, then factorise and fine-tune
    admm = ADMM(net, format="tt", ratio=args.ratio, rho=1e-2, include="conv2|fc1|fc2")
    train(net, x, y, args.epochs, 1e-3, admm=admm)
    small = admm.factorize()
    print("factorised accuracy", accuracy(small, xt, yt))
    train(small, x, y, args.epochs, 1e-3)
    print("fine-tuned accuracy", accuracy(small, xt, yt))

    for model, name in ((dense, "dense.onnx"), (small, "small.onnx")):
        torch.onnx.export(model.eval(), (xt[:1],), str(out / name), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    np.savez(out / "test.npz", input=xt.numpy(), labels=yt.numpy())
    subprocess.run([sys.executable, "-m", "tnonnx", "inspect", str(out / "small.onnx")], check=True)
    return subprocess.run([sys.executable, "-m", "tnonnx", "validate", str(out / "dense.onnx"), str(out / "small.onnx"),
                           "--inputs", str(out / "test.npz"), "--max-accuracy-drop", str(args.max_drop), "--batch", "500"]).returncode


if __name__ == "__main__":
    sys.exit(main())
