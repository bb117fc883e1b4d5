"""Write the calibration split ``fashion_calib.npz`` beside the test split.

    python models/make_calib.py [--data-dir DIR] [--out-dir models] [--per-class 200] [--seed 0]

Calibration data for ``tnonnx rewrite --calib`` (data-aware fitting, the budget's
sensitivities, fine-tuning) must be representative of what the model sees and must not
be the data it is evaluated on. ``fashion_test.npz`` holds the first 2000 images of the
Fashion-MNIST *test* split; this file holds images of the *training* split only, so the
two never share an image.

Which images: ``--per-class`` (default 200) training images of each of the 10 classes,
2000 in all, drawn without replacement by ``numpy.random.default_rng(--seed)`` (default
0): for class c = 0..9 in order, ``rng.choice(indices of class c, per_class,
replace=False)``; the union is sorted by training index. The indices (0-based positions
in ``train-images-idx3-ubyte``) are stored in the file as ``train_indices``.

Writes ``fashion_calib.npz`` (``np.savez_compressed``): ``input`` float32
N x 1 x 28 x 28, normalised like ``fashion_test.npz`` and the model's input
(``(pixel / 255 - 0.2860) / 0.3530``), ``labels`` int64 N, ``train_indices`` int64 N.
The same data directory, size and seed give the same arrays.

Data: the idx files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``), or ``--data-dir`` / ``FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.train_lenet import DEFAULT_DATA_DIR, load_split, normalise

PER_CLASS = 200
SEED = 0
FILE_NAME = "fashion_calib.npz"


def calib_indices(labels: np.ndarray, per_class: int = PER_CLASS, seed: int = SEED) -> np.ndarray:
    """Sorted training indices: `per_class` of each class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has only {len(members)} training images, fewer than {per_class}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def make_calib(data_dir: Path, per_class: int = PER_CLASS, seed: int = SEED) -> dict[str, np.ndarray]:
    """The arrays of the calibration file (``input``, ``labels``, ``train_indices``)."""
    images, labels = load_split(Path(data_dir), "train")
    idx = calib_indices(labels, per_class, seed)
    return {"input": normalise(images[idx]), "labels": labels[idx].astype(np.int64), "train_indices": idx}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the Fashion-MNIST calibration split (training images).")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DATA_DIR)))
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--per-class", type=int, default=PER_CLASS)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    arrays = make_calib(args.data_dir, args.per_class, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / FILE_NAME
    np.savez_compressed(path, **arrays)
    counts = np.bincount(arrays["labels"], minlength=10)
    print(f"wrote {path} ({path.stat().st_size} B): input {arrays['input'].shape} {arrays['input'].dtype}, "
          f"labels per class {counts.tolist()}, training indices {arrays['train_indices'][0]}.."
          f"{arrays['train_indices'][-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
