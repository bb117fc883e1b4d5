"""The `tnonnx` command: parse options, call the API, print. No logic of its own."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console

from . import api, bench, calibrate, plot, settings, model as model_io
from .emit import ACTIVATIONS
from .errors import TnonnxError
from .finetune import HIDDEN_WEIGHT, PRECISIONS
from .formats import FORMATS, is_nonlinear, nonlinear_formats
from .deploy import INT8_MODES
from .quantize import QUANT_MODES
from .targets import TARGETS
from .report import render_validation
from .validate import validate as compare_models
from .validate import with_default_threshold


def _console() -> Console:
    # the terminal's width; piped: $COLUMNS when set, else a wide fixed width so logs are not folded
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200,
                   soft_wrap=False)


def handles_errors(fn):
    """Bad input: one line on stderr and exit 2 (a traceback only with --debug)."""

    @click.option("--debug", is_flag=True, help="Show tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TnonnxError as exc:
            if debug:  # the traceback, then the same exit code as without --debug
                traceback.print_exc()
            click.echo(f"tnonnx: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # an internal error: still one line unless --debug
            if debug:
                traceback.print_exc()
                sys.exit(3)
            first = calibrate.clip(exc, 300)
            click.echo(f"tnonnx: internal error: {type(exc).__name__}: {first} (rerun with --debug)", err=True)
            sys.exit(3)

    return wrapper


def _bounded(low=None, high=None):
    """A click callback refusing values outside [low, high] in one line (exit 2)."""

    def check(ctx, param, value):
        if value is None or ((low is None or value >= low) and (high is None or value <= high)):
            return value
        rule = f"in [{low:g}, {high:g}]" if low is not None and high is not None else (
            f">= {low:g}" if low is not None else f"<= {high:g}")
        raise click.UsageError(f"{max(param.opts, key=len)} {value:g}: must be {rule}", ctx)

    return check


BATCH_HELP = {
    "inspect": "Batch size the MACs are counted at.",
    "rewrite": "Deployment batch size: what layers and models are timed at, MACs in the report, and the batch "
               "of random feeds.",
    "validate": "Batch size of the feeds the models are run on (random feeds: at least 32 samples, in batches "
                "of this size).",
    "bench": "Batch size timed.",
}


def batch_option(command: str):
    return click.option("--batch", type=int, default=1, show_default=True, callback=_bounded(1),
                        help=BATCH_HELP[command])


def threads_option(help_text: str):
    return click.option("--threads", type=int, default=None, callback=_bounded(1), help=help_text)


def shape_option(fn):
    return click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
                        help="Concrete shape for an input with symbolic dims, e.g. input:1x3x224x224.")(fn)


def _check_side_output(path, what: str, taken, taken_text: str) -> None:
    """A file written beside the model (--report, --plot, --json): none of the files `taken`,
    and a path that can be written."""
    if any(model_io.same_file(path, p) for p in taken):
        raise TnonnxError(f"{what} '{path}' is {taken_text}; choose another path")
    model_io.check_output_path(path, what)


def input_options(command: str):
    def decorate(fn):
        fn = click.option("--inputs", type=click.Path(), default=None,
                          help="Feeds as .npz (arrays named after the model inputs; 'labels' gives accuracy), or a "
                               "folder of .npz files, each with its own shapes. "
                               "Without it, random feeds from the model's input shapes (and the report says so).")(fn)
        return batch_option(command)(shape_option(fn))

    return decorate


def threshold_options(fn):
    fn = click.option("--atol", type=float, default=None, callback=_bounded(0),
                      help="Absolute tolerance (with --rtol: like np.allclose).")(fn)
    fn = click.option("--rtol", type=float, default=None, callback=_bounded(0), help="Relative tolerance.")(fn)
    fn = click.option("--min-cosine", type=float, default=None, callback=_bounded(-1, 1),
                      help="Minimum cosine similarity per output, in [-1, 1].")(fn)
    fn = click.option("--max-accuracy-drop", type=float, default=None, metavar="POINTS", callback=_bounded(0, 100),
                      help="Fail when accuracy drops more than POINTS percentage points (labels in --inputs); "
                           "without labels, when top-1 agreement with the original is below 1 - POINTS/100.")(fn)
    return fn


class _OneLineUsageError(click.UsageError):
    """Bad usage as one line on stderr (exit 2), pointing at --help instead of printing usage."""

    def show(self, file=None):
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"tnonnx: error: {self.format_message()}{hint}", err=True)


_KEEP_USAGE = (_OneLineUsageError, getattr(click.exceptions, "NoArgsIsHelpError", _OneLineUsageError))


class _Main(click.Group):
    """The group, with click's usage errors (bad option values, unknown options) in one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if isinstance(exc, _KEEP_USAGE):
                raise
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if isinstance(exc, _KEEP_USAGE):
                raise
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tnonnx")
def main():
    """Compress ONNX models by rewriting MatMul/Gemm/Conv layers as tensor networks."""


@main.command()
@click.argument("model", type=click.Path())
@batch_option("inspect")
@shape_option
@click.option("--recurrent", type=click.Choice(settings.RECURRENT_MODES), default="fused", show_default=True,
              help="scan: list LSTM/GRU/RNN nodes as `rewrite --recurrent scan` writes them (W and R as MatMuls).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@handles_errors
def inspect(model, batch, shapes, recurrent, as_json):
    """List the candidate layers: op, weight shape, parameters, MACs, share of the model."""
    report = api.inspect(model, batch=batch, shapes=calibrate.parse_shapes(shapes), recurrent=recurrent)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        report.render(_console())


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output path (default: <stem>.<format>.onnx beside the input).")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS) + ["auto"]), default="tt", show_default=True,
              help="auto: per layer, the format with the lowest weight error under the rank rule.")
@click.option("--rank", type=str, default=None, callback=lambda ctx, param, v: _rank(v),
              help="Rank cap (default 8 when no rank rule is given), or vbmf (svd, tucker, cp).")
@click.option("--tol", type=float, default=None, help="Relative Frobenius error allowed per layer.")
@click.option("--ratio", type=float, default=None, help="Parameter reduction per layer, e.g. 10.")
@click.option("--budget", type=str, default=None, metavar="Nx",
              help="Parameter reduction of all selected layers together, e.g. 3x, allocated across layers by error per parameter.")
@click.option("--conv-layout", type=click.Choice(["cp4", "cp3"]), default=None,
              help="CP convolutions: 1x1, kh x 1, 1 x kw, 1x1 (cp4) or 1x1, depthwise, 1x1 (cp3).")
@click.option("--stp-t", type=click.IntRange(min=1), default=None, help="Semi-tensor formats: the identity factor t (default 2).")
@click.option("--modes", multiple=True, metavar="IN,OUT",
              help="Tensorization override, e.g. 8x8x6,4x8x12: for the dense layers of that shape. "
                   "Repeat it for layers of other shapes.")
@click.option("--order", type=click.IntRange(min=1), default=None, help="Number of cores per dense layer (default: automatic).")
@click.option("--emit", type=click.Choice(settings.EMIT_MODES), default="auto", show_default=True,
              help="How chains are emitted: auto picks per layer the faster of matmul (rows first) and "
                   "features-first (rows trailing, cores from the left), measured at the deployment shape.")
@click.option("--keep-columns/--no-keep-columns", default=True, show_default=True,
              help="Two features-first layers with only elementwise ops between them (bias, activation) keep the "
                   "columns layout across those ops: the Transposes between them cancel.")
@threads_option("onnxruntime intra-op threads of the deployment (default: onnxruntime's own, all cores); "
                "every timing uses it.")
@click.option("--speedup", type=float, default=None, metavar="X",
              help="The rewritten model must run at least X times as fast as the original at the deployment "
                   "shape (--batch, --shape, --threads); layers are chosen (or kept dense) to meet it.")
@click.option("--allow-slower", is_flag=True,
              help="Let --format auto / --budget emit layers measured slower than their dense layer.")
@click.option("--keep-best", is_flag=True, help="With --speedup: write the best plan found even when it misses.")
@click.option("--timing/--no-timing", default=True, show_default=True,
              help="Time candidates and models in onnxruntime (--no-timing: predict from the cost model).")
@click.option("--timing-cache/--no-timing-cache", default=True, show_default=True,
              help="Reuse per-layer timings from $TNONNX_CACHE_DIR (default ~/.cache/tnonnx/timings.json).")
@click.option("--ops", default=None,
              help="Op types to rewrite: MatMul, Gemm, Conv, ConvTranspose, Gather (embedding tables), LSTM, GRU, "
                   "RNN (their input weights). Default: all of them with --budget or --format auto (the planner "
                   "decides per layer), else MatMul,Gemm,Conv,ConvTranspose.")
@click.option("--recurrent", type=click.Choice(settings.RECURRENT_MODES), default="fused", show_default=True,
              help="scan: write LSTM/GRU/RNN nodes as MatMul + Scan first, so that their recurrent weights "
                   "are rewritten too (as MatMul layers); fused: keep the nodes, hoist only W.")
@click.option("--include", default=None, help="Regex: only nodes whose name matches.")
@click.option("--exclude", default=None, help="Regex: skip nodes whose name matches.")
@click.option("--min-params", type=click.IntRange(min=0), default=0, show_default=True, help="Skip smaller weights.")
@click.option("--force", is_flag=True, help="Rewrite layers even where nothing is saved.")
@click.option("--fit", "fit_mode", type=click.Choice(settings.FIT_MODES), default="data-free", show_default=True,
              help="aware: fit each layer's outputs on calibration data (closed form for svd, refined cores for the "
                   "other formats); sequential: the same, each layer fed the outputs of the layers already rewritten; "
                   "blockwise: aware, then each block (between residual additions and normalisations) trained, "
                   "its new cores with its other weights, to the original block's outputs, fed by the blocks "
                   "already refined.")
@click.option("--finetune", type=click.IntRange(min=0), default=0, metavar="EPOCHS",
              help="Then train the rewritten layers' cores end to end to the original model's outputs and the "
                   "inputs of the rewritten layers on the calibration data for EPOCHS epochs.")
@click.option("--finetune-hidden", type=click.FloatRange(min=0), default=HIDDEN_WEIGHT, show_default=True,
              metavar="WEIGHT", help="Weight of the rewritten layers' inputs against the outputs in --finetune "
                                     "(0: outputs only).")
@click.option("--admm", is_flag=True,
              help="With --finetune N: first train the dense model's selected weights for N epochs towards the "
                   "format's rank set (ADMM, Yin et al.: distilled to the original's outputs under a penalty "
                   "pulling each weight to its truncation, projected once per epoch), then fit the layers to those "
                   "weights and fine-tune N epochs. One linear format and --rank/--ratio/--tol.")
@click.option("--admm-rho", type=float, default=None, metavar="RHO",
              help="--admm's penalty weight, relative to each weight's squared norm (default 1.0).")
@click.option("--train-precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Arithmetic of the training steps of --finetune, --fit blockwise and --admm: bf16 runs their "
                   "matrix products in bfloat16 (torch autocast; the trained weights, the passes that judge them "
                   "and the output stay float32); auto: bf16 where the CPU multiplies bfloat16 in hardware "
                   "(AVX512-BF16, AMX, Arm BF16) and at least 1M parameters are trained, else fp32.")
@click.option("--act", type=click.Choice(ACTIVATIONS), default=None,
              help="Nonlinear formats (ntt, ntr): the activation between cores (default relu).")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration feeds (.npz named after the model inputs) for --fit aware/sequential, or a folder of "
                   ".npz files, one batch or more each, each with its own shapes (sentences padded per batch).")
@click.option("--calib-random", type=click.IntRange(min=1), default=None, metavar="N",
              help="N random calibration samples from the model's input shapes.")
@click.option("--target", "target_name", type=click.Choice(TARGETS), default="cpu", show_default=True,
              help="Where the model runs: cpu (as is), gpu (fp16 with fp32 inputs/outputs; needs calibration data), "
                   "edge (standard ops, rank <= 4, fixed --shape, plus <output>.ort and its required-operators config).")
@click.option("--quantize", type=click.Choice(QUANT_MODES), default=None,
              help="Then quantize with onnxruntime's quantizers: int8 (dynamic; static QDQ per-channel with --calib, "
                   "always for gpu/edge) or int4 (MatMulNBits where a factor spans a block, ranks rounded to whole "
                   "blocks, else int8).")
@click.option("--int8", "int8", type=click.Choice(INT8_MODES), default=None,
              help="With --quantize on cpu: static (QDQ per-channel, activation ranges from the calibration data; the "
                   "default with --calib) or dynamic (activations quantized at run time; the default without).")
@click.option("--short-names", is_flag=True, default=False,
              help="Rename the output's nodes and internal tensors to short ids (inputs and outputs keep theirs): "
                   "in a small quantized model the names are a third of the file.")
@click.option("--max-model-bytes", type=click.IntRange(min=1), default=None, metavar="BYTES",
              help="Fail, writing nothing, when the output (or its .ort) is larger; the largest tensors are listed.")
@click.option("--workers", type=int, default=None, callback=_bounded(1), metavar="N",
              help="Processes fitting layers side by side, one BLAS thread each (default: the cores available).")
@click.option("--quiet", is_flag=True, help="No progress on stderr (it is drawn only on a terminal anyway).")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare with the original.")
@input_options("rewrite")
@threshold_options
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw the report as a PNG: per layer parameters, MACs, times and error before/after "
                   "(needs matplotlib: pip install 'tnonnx[plot]').")
@handles_errors
def rewrite(model, output, fmt, rank, tol, ratio, budget, conv_layout, stp_t, modes, order, emit, keep_columns,
            threads, speedup,
            allow_slower, keep_best, timing, timing_cache, ops, recurrent, include,
            exclude, min_params, force, fit_mode, finetune, finetune_hidden, admm, admm_rho, train_precision, act, calib, calib_random,
            target_name, quantize, int8, short_names, max_model_bytes, workers, quiet, validate, inputs, shapes, batch,
            atol, rtol,
            min_cosine, max_accuracy_drop, report_path, plot_path):
    """Rewrite MODEL's layers in a factorised format, validate, and save."""
    source = model_io.check_path(model)
    target = Path(output) if output else source.with_name(f"{source.stem}.{fmt}.onnx")
    if model_io.same_file(source, target):
        raise TnonnxError(f"output '{target}' is the input model; choose another path with -o")
    model_io.check_output_path(target)
    if report_path:
        _check_side_output(report_path, "report", (source, target), "the input or output model")
    if plot_path:
        _check_side_output(plot_path, "--plot", (source, target) + ((report_path,) if report_path else ()),
                           "the input or output model or the report")
        plot.require_matplotlib()  # fail now, not after the rewrite
    if act is not None and not is_nonlinear(fmt):
        raise TnonnxError(f"--act applies to the nonlinear formats ({', '.join(nonlinear_formats())}), "
                          f"not --format {fmt}")
    options = {k: v for k, v in (("conv_layout", conv_layout), ("stp_t", stp_t), ("act", act)) if v is not None}
    progress = sys.stderr.isatty() and not quiet
    chosen = settings.RewriteSettings.of(
        format=fmt, rank=rank, tol=tol, ratio=ratio, budget=budget, format_options=options,
        modes=";".join(modes) or None, order=order, emit=emit, batch=batch, ops=ops, recurrent=recurrent,
        include=include, exclude=exclude, min_params=min_params, force=force, validate=validate, inputs=inputs,
        shapes=calibrate.parse_shapes(shapes), atol=atol, rtol=rtol, min_cosine=min_cosine,
        max_accuracy_drop=max_accuracy_drop, fit=fit_mode, calib=_calibration(calib, calib_random),
        finetune=finetune, finetune_hidden=finetune_hidden, admm=admm, admm_rho=admm_rho,
        train_precision=train_precision, threads=threads, speedup=speedup, allow_slower=allow_slower,
        keep_best=keep_best, timing=timing, timing_cache=timing_cache, target=target_name, quantize=quantize,
        int8=int8, short_names=short_names, max_model_bytes=max_model_bytes, workers=workers,
        keep_columns=keep_columns)
    new, report = api.rewrite_with(model, chosen, progress=progress)
    api.save(new, target, progress=progress)
    files = report.deploy.target.files if report.deploy is not None else {}
    for suffix, content in files.items():  # the edge target's .ort and required-operators config
        side = target.with_name(target.stem + suffix)
        model_io.write_bytes(side, content if isinstance(content, bytes) else content.encode())
        click.echo(f"wrote {side}")
    report.output_path = str(target)
    report.render(_console())
    click.echo(f"wrote {target}")
    if report_path:
        _write(report_path, "report", report.write_json)
    if plot_path:
        _write(plot_path, "--plot", lambda p: plot.plot_report(report.to_dict(), p))
        click.echo(f"wrote {plot_path}")
    if not report.ok:
        sys.exit(1)


def _calibration(path: str | None, random_samples: int | None):
    if path is not None and random_samples is not None:
        raise TnonnxError("give one of --calib, --calib-random")
    return path if path is not None else random_samples


def _rank(text: str | None):
    if text is None or text == "vbmf":
        return text
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a whole number or 'vbmf'") from None


def _write(path, what: str, write) -> None:
    """Write a side file (report, JSON) with `write(path)`; its folders are created."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise TnonnxError(f"{what} '{path}': cannot write it ({exc.strerror or exc})") from None


@main.command("validate")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@input_options("validate")
@threshold_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random feeds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON.")
@handles_errors
def validate_cmd(reference, candidate, inputs, shapes, batch, atol, rtol, min_cosine, max_accuracy_drop, seed,
                 json_path):
    """Run REFERENCE and CANDIDATE on the same feeds and compare; exit 1 on mismatch.

    With no threshold given, --min-cosine 0.99 applies."""
    min_cosine = with_default_threshold(atol, rtol, min_cosine, max_accuracy_drop)
    if json_path:
        _check_side_output(json_path, "--json", (reference, candidate), "one of the models")
    result = compare_models(reference, candidate, inputs=inputs, shapes=calibrate.parse_shapes(shapes),
                            batch=batch, seed=seed, atol=atol, rtol=rtol, min_cosine=min_cosine,
                            max_accuracy_drop=max_accuracy_drop)
    render_validation(result, _console())
    if json_path:
        _write(json_path, "--json", lambda p: Path(p).write_text(json.dumps(result.to_dict(), indent=2)))
    if not result.ok:
        sys.exit(1)


@main.command("bench")
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@batch_option("bench")
@shape_option
@threads_option("onnxruntime intra-op threads (default: onnxruntime's own).")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw p50/p90/p99 of both models as a PNG (needs matplotlib: pip install 'tnonnx[plot]').")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time in this many new processes, one after another, and give the median speed-up "
                   "(on machines whose two-thread speed drops for a process or for minutes).")
@handles_errors
def bench_cmd(reference, candidate, batch, shapes, threads, repeats, warmup, plot_path, processes):
    """Latency of two models side by side on the same random feeds."""
    if plot_path:
        _check_side_output(plot_path, "--plot", (reference, candidate), "one of the models")
        plot.require_matplotlib()
    options = dict(batch=batch, shapes=calibrate.parse_shapes(shapes), threads=threads, warmup=warmup,
                   repeats=repeats)
    if processes > 1:
        for path, what in ((reference, "reference"), (candidate, "candidate")):  # one line here, as compare says it
            model_io.load(path, what=what)
        result = bench.compare_in_processes(reference, candidate, processes, **options)
    else:
        result = bench.compare(reference, candidate, **options)
    console = _console()
    for key in ("reference", "candidate"):
        r = result[key]
        console.print(f"{key:9s} p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  mean {r['mean_ms']:.3f} ms "
                      f"({r['runs']} runs, batch {batch})")
    load = result.get("other_load")
    load = f"; other work kept {load:.2f} cores busy meanwhile" if load is not None else ""
    if processes > 1:
        console.print(f"speed-up (p50): {result['speedup']:.2f}x, the median of {processes} processes (each: "
                      f"{', '.join(f'{x:.2f}x' for x in result['speedups'])}; the times above are that process's)"
                      + load)
    else:
        console.print(f"speed-up (p50): {result['speedup']:.2f}x" + load)
    if plot_path:
        _write(plot_path, "--plot", lambda p: plot.plot_bench(result, p))
        click.echo(f"wrote {plot_path}")


@main.command("build-ops")
@click.option("--include-dir", type=click.Path(file_okay=False), default=None,
              help="ONNX Runtime C/C++ headers (default: $ORT_INCLUDE_DIR, else Debian's libonnxruntime-dev, downloaded).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where to build (default: build/custom_ops of the checkout).")
@click.option("--force", is_flag=True, help="Rebuild even if the library is up to date.")
@click.option("--native", is_flag=True, help="Optimise for this machine's CPU (-march=native; not portable).")
@handles_errors
def build_ops(include_dir, out_dir, force, native):
    """Build the C++ custom-op library that --emit custom models need; print its path."""
    from . import custom_ops

    path = custom_ops.build(include_dir=include_dir, out_dir=out_dir, force=force, native=native,
                            log=lambda message: click.echo(message, err=True))
    click.echo(str(path))


if __name__ == "__main__":
    main()
