"""Train LeNet-5 on Fashion-MNIST and write the committed demo files.

    python models/train_lenet.py [--data-dir DIR] [--epochs N] [--out-dir models]

Data: the idx files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``);
another directory can be given with ``--data-dir`` or the environment variable
``FASHION_MNIST_DIR``.

Inputs are normalised as ``(x / 255 - MEAN) / STD`` with MEAN = 0.2860 and
STD = 0.3530 (mean and standard deviation of the Fashion-MNIST training pixels).
The exported ONNX model expects already normalised input.

Writes into ``--out-dir`` (default: this folder):

* ``lenet5_fashion.onnx``: legacy exporter, opset 17, IR <= 10, one file;
  input ``input`` (float32, batch x 1 x 28 x 28, normalised), output ``logits``
  (batch x 10);
* ``fashion_test.npz``: the first 2000 test images (``input``, float32,
  normalised, 2000 x 1 x 28 x 28) and their ``labels`` (int64), compressed.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import reference
from models.export import export_module

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
SEED = 0
N_SAMPLE = 2000
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(shape)


def load_split(data_dir: Path, split: str):
    """Return ``(images uint8 Nx28x28, labels int64 N)`` for split ``train`` or ``t10k``."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28, ``(x/255 - MEAN)/STD``."""
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def torch_accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i:i + batch]))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def onnx_accuracy(path, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), batch):
        (logits,) = sess.run(["logits"], {"input": x[i:i + batch]})
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train(x_train, y_train, epochs: int, batch_size: int = 128, lr: float = 2e-3, log=print):
    seed_everything()
    model, *_ = reference.lenet5()
    return fit_classifier(model, x_train, y_train, epochs, batch_size, lr, log)


def fit_classifier(model, x_train, y_train, epochs: int, batch_size: int, lr: float, log=print,
                   clip: float | None = None, name: str = ""):
    """Adam with a cosine schedule on shuffled minibatches (cross-entropy); `clip`: the
    gradient norm is clipped to it (recurrent networks)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * (len(x_train) // batch_size))
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        perm = torch.randperm(len(xt), generator=gen)
        nb = len(xt) // batch_size
        for b in range(nb):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            total += loss.item()
        log(f"{name}epoch {epoch + 1}/{epochs}: loss {total / nb:.4f} ({time.perf_counter() - t0:.1f} s)")
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train LeNet-5 on Fashion-MNIST and export it.")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DATA_DIR)))
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")
    x_train, x_test = normalise(x_train), normalise(x_test)
    print(f"train {x_train.shape}, test {x_test.shape}; data from {args.data_dir}")

    model = train(x_train, y_train, args.epochs)
    acc = torch_accuracy(model, x_test, y_test)
    print(f"torch test accuracy (10000): {acc:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "lenet5_fashion.onnx"
    _, example, inputs, outputs, axes = reference.lenet5()
    export_module(model, example, onnx_path, inputs, outputs, axes, dynamo=False)
    npz_path = args.out_dir / "fashion_test.npz"
    np.savez_compressed(npz_path, input=x_test[:N_SAMPLE], labels=y_test[:N_SAMPLE])

    acc_sample = onnx_accuracy(onnx_path, x_test[:N_SAMPLE], y_test[:N_SAMPLE])
    acc_full = onnx_accuracy(onnx_path, x_test, y_test)
    print(f"onnx accuracy, first {N_SAMPLE} test images: {acc_sample:.4f}")
    print(f"onnx accuracy, full 10000 test images: {acc_full:.4f}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} B), {npz_path} ({npz_path.stat().st_size} B)")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
