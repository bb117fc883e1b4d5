"""The printed reports: they fit an 80-column console, sizes and notes say what they mean."""

from __future__ import annotations

import io

from rich.console import Console

from tnonnx.progress import Stages
from tnonnx.report import InspectReport, LatencyInfo, LayerRow, RewriteReport, Totals, _bytes, _growth
from tnonnx.validate import OutputAgreement, ValidationResult

PREFIX = "/encoder/layer.11/attention/output/dense_with_a_long_exported_scope"


def rows() -> list[LayerRow]:
    out = []
    for i, name in enumerate(("fc1/Gemm", "fc2/Gemm", "proj/MatMul")):
        r = LayerRow(f"{PREFIX}/{name}", "Gemm", [768, 3072], 2359296, 2359296 * 128)
        if i < 2:
            r.format, r.ranks, r.params_after, r.macs_after = "tt", [1, 16, 16, 1], 90000, 2359296 * 200
            r.weight_error, r.output_error, r.emission = 1.7, 0.05, "features-first"
            r.ms_before, r.ms_after, r.ms_measured = 0.512, 0.731, True
        else:
            r.reason = "kept dense by the --budget allocator: every candidate is slower than the dense layer"
        out.append(r)
    return out


def render(report, width: int | None = 80) -> list[str]:
    buffer = io.StringIO()
    report.render(Console(width=width, file=buffer, soft_wrap=False))
    return buffer.getvalue().splitlines()


def rewrite_report(spec: str = "tol 0.05") -> RewriteReport:
    totals = Totals(7077888, 2718912, 28_000_000, 11_000_000, 10**9, 2 * 10**9, ms_before=1.0, ms_after=1.2)
    validation = ValidationResult([OutputAgreement("logits", (32, 10), 0.1, 0.01, 0.02, 0.999, 30.0, 0.97)],
                                  samples=32, min_cosine=0.99, random_feeds=True)
    return RewriteReport("tt", spec, "auto", 128, rows(), totals, validation=validation, fit="aware",
                         latency=LatencyInfo("x 128x768, 2 thread(s)", 2, True))


def test_rewrite_table_fits_80_columns():
    lines = render(rewrite_report())
    assert max(map(len, lines)) <= 80, "\n".join(l for l in lines if len(l) > 80)
    text = "\n".join(lines)
    for end in ("/fc1/Gemm", "/fc2/Gemm", "/proj/MatMul"):  # the distinctive end of each name survives, on one line
        assert any(end in l and "…" in l for l in lines), text
    assert "left out at 80 columns: MACs, ms" in " ".join(text.split())
    assert "random samples" in text and "made-up inputs" in " ".join(text.split())


def test_wide_console_keeps_every_column():
    lines = render(rewrite_report(), width=250)
    header = next(l for l in lines if "layer" in l and "format" in l)
    for col in ("MACs", "ms", "weight err", "output err", "weight"):
        assert col in header
    assert not any("left out at" in l for l in lines)
    assert any(f"{PREFIX}/fc1/Gemm" in l for l in lines)


def test_inspect_table_fits_80_columns():
    report = InspectReport(rows(), Totals(7077888, 7077888, 28_000_000, 28_000_000, 10**9, 10**9), batch=1)
    lines = render(report)
    assert max(map(len, lines)) <= 80
    assert all(any(end in l for l in lines) for end in ("/fc1/Gemm", "/fc2/Gemm", "/proj/MatMul"))
    assert any("left out at 80 columns" in l for l in lines) and any("inspect --json" in l for l in lines)


def test_weight_errors_above_one_are_explained():
    text = " ".join(render(rewrite_report(), width=250))
    assert "weight err above 1" in text and "targets each layer's outputs" in text


def test_tol_says_it_forced_more_macs():
    row = rows()[0]
    assert _growth(row, "rank 8") == "MACs up 1.56x"
    note = _growth(row, "tol 0.05")
    assert note.startswith("MACs up 1.56x: --tol 0.05 needs ranks that cost more than the dense layer")
    assert any("MACs up 1.56x: --tol 0.05 needs ranks" in line for line in render(rewrite_report(), width=400))


def test_sizes_are_binary_units():
    assert _bytes(1000) == "1000 B" and _bytes(2048) == "2.00 KiB"
    assert _bytes(3 * 2**20) == "3.00 MiB" and _bytes(5 * 2**30) == "5.00 GiB"


def test_progress_from_python_is_not_tied_to_a_tty():
    assert not Stages.of(False).shown
    stages = Stages.of(True)  # a rich progress bar on stderr, even when stderr is not a terminal
    assert stages.shown
    with stages.stage("fit", 3, "layers") as stage:
        for _ in range(3):
            stage.advance()
    assert list(stages.seconds) == ["fit"] and stage.done == 3
