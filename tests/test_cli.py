"""The CLI contract for good and bad input.

Bad input: exit code 2, one line on stderr saying what and where, no traceback unless
--debug, no output (nor temporary) file left behind, the input model untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnx_builders import init, make_model, randn, run, value
from tnonnx import model as tmodel
from tnonnx.cli import main
from tnonnx.errors import TnonnxError

N_IN, N_OUT = 64, 48


# --- models -----------------------------------------------------------------------------

def dense_model(w=None) -> onnx.ModelProto:
    w = randn(N_IN, N_OUT) if w is None else w
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                      [value("x", ["N", N_IN])], [value("y", ["N", N_OUT])], [init("W", w)])


def unchecked_model(opset: int, ir: int) -> onnx.ModelProto:
    """A MatMul model declaring any opset (no checker: onnx may not know the version)."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "t",
                              [value("x", ["N", N_IN])], [value("y", ["N", N_OUT])], [init("W", randn(N_IN, N_OUT))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def two_domain_model() -> onnx.ModelProto:
    """Default-domain and com.microsoft opset imports: cutting the file between the two
    imports leaves a prefix that protobuf parses."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("FusedMatMul", ["h", "W2"], ["y"], name="fused", domain="com.microsoft")],
        "t", [value("x", ["N", 8])], [value("y", ["N", 6])], [init("W", randn(8, 6)), init("W2", randn(6, 6, seed=1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def good(tmp_path) -> Path:
    return save(dense_model(), tmp_path / "model.onnx")


# --- helpers ------------------------------------------------------------------------------

def cli(*args, cwd: Path | None = None):
    """Run the CLI in-process; stderr kept apart from stdout."""
    runner = CliRunner()
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: bytes and mtime (so 'unchanged' and 'nothing new' are checkable)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_bad_input(result, *fragments: str, starts: str | None = None) -> str:
    """Exit 2, exactly one line on stderr ("tnonnx: error: ..."), no traceback anywhere."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("tnonnx: error: "), line
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    if starts is not None:
        assert line[len("tnonnx: error: "):].startswith(starts), line
    return line


def assert_untouched(folder: Path, before: dict) -> None:
    """Nothing written, nothing changed, no temporary file left behind."""
    assert snapshot(folder) == before


# --- 1-3: the model file is missing, a directory, not ONNX -----------------------------

def test_missing_model_real_exit_code_and_stderr(tmp_path):
    """Through a real process: the exit status and stderr the shell sees."""
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "tnonnx.cli", "rewrite", "nope.onnx"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "tnonnx: error: model 'nope.onnx': no such file\n"
    assert done.stdout == ""
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("command", ["rewrite", "inspect", "validate-ref", "validate-cand"])
def test_missing_model(tmp_path, good, command):
    before = snapshot(tmp_path)
    missing = tmp_path / "missing.onnx"
    args = {"rewrite": ["rewrite", missing], "inspect": ["inspect", missing],
            "validate-ref": ["validate", missing, good], "validate-cand": ["validate", good, missing]}[command]
    what = "candidate" if command == "validate-cand" else "reference" if command == "validate-ref" else "model"
    assert_bad_input(cli(*args), f"{what} '{missing}'", "no such file")
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("command", ["rewrite", "inspect", "validate"])
def test_model_is_a_directory(tmp_path, good, command):
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    before = snapshot(tmp_path)
    args = [command, folder] + ([good] if command == "validate" else [])
    assert_bad_input(cli(*args), f"'{folder}'", "is a directory")
    assert_untouched(tmp_path, before)


def test_rewrite_current_directory(tmp_path):
    """`tnonnx rewrite .` (an empty file name) is bad input, not an internal error."""
    assert_bad_input(cli("rewrite", ".", cwd=tmp_path), "'.'", "is a directory")


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", "random"], ids=["text", "empty", "random"])
@pytest.mark.parametrize("command", ["rewrite", "inspect", "validate"])
def test_not_onnx(tmp_path, good, command, content):
    if content == "random":
        content = np.random.default_rng(0).bytes(4096)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    before = snapshot(tmp_path)
    args = [command, bad] + ([good] if command == "validate" else [])
    line = assert_bad_input(cli(*args), f"'{bad}'")
    assert "empty" in line or "not an ONNX model" in line
    assert_untouched(tmp_path, before)


# --- 4: truncated files ---------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_model(tmp_path, fraction):
    data = dense_model().SerializeToString()
    cut = save(onnx.ModelProto(), tmp_path / "cut.onnx")
    cut.write_bytes(data[: int(len(data) * fraction)])
    before = snapshot(tmp_path)
    for command in ("rewrite", "inspect"):
        assert_bad_input(cli(command, cut), f"model '{cut}'")
    assert_untouched(tmp_path, before)


def test_truncated_at_field_boundary_cli(tmp_path):
    """A cut between two opset imports parses; the checker must still reject it (not exit 3)."""
    model = two_domain_model()
    data = model.SerializeToString()
    head = onnx.ModelProto()
    head.CopyFrom(model)
    del head.opset_import[1]
    prefix = head.SerializeToString()
    assert data.startswith(prefix)  # so the cut file is exactly this prefix
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(prefix)
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", cut), f"model '{cut}'", "com.microsoft")
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("build", [dense_model, two_domain_model], ids=["dense", "two-domains"])
def test_every_prefix_is_rejected(tmp_path, build):
    """Every proper prefix of a model file is a TnonnxError from load(), never another exception."""
    data = build().SerializeToString()
    path = tmp_path / "cut.onnx"
    step = max(1, len(data) // 400)
    cuts = sorted(set(range(1, len(data), step)) | set(range(len(data) - 64, len(data))))
    for n in cuts:
        path.write_bytes(data[:n])
        with pytest.raises(TnonnxError):
            tmodel.load(path)
    path.write_bytes(data)
    tmodel.load(path)  # and the whole file loads


# --- 5: opsets --------------------------------------------------------------------------

@pytest.mark.parametrize("opset,ir", [(30, 11)])  # older opsets are upgraded: test_old_exports.py
@pytest.mark.parametrize("command", ["rewrite", "inspect", "validate"])
def test_unsupported_opset(tmp_path, good, command, opset, ir):
    path = save(unchecked_model(opset, ir), tmp_path / f"op{opset}.onnx")
    before = snapshot(tmp_path)
    args = [command, path] + ([good] if command == "validate" else [])
    assert_bad_input(cli(*args), f"'{path}'", f"opset {opset} is not supported")
    assert_untouched(tmp_path, before)


# --- 6: nothing to rewrite ----------------------------------------------------------------

def test_nothing_to_rewrite_relu_only(tmp_path):
    path = save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [value("x", ["N", 4])],
                           [value("y", ["N", 4])]), tmp_path / "relu.onnx")
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", path), starts="nothing to rewrite")
    assert_untouched(tmp_path, before)
    result = cli("inspect", path)  # inspecting is fine: it lists no candidate
    assert result.exit_code == 0, result.stderr


def test_nothing_to_rewrite_computed_operands(tmp_path):
    path = save(make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                           [value("a", ["N", 4]), value("b", [4, 3])], [value("y", ["N", 3])]), tmp_path / "dyn.onnx")
    before = snapshot(tmp_path)
    line = assert_bad_input(cli("rewrite", path), starts="nothing to rewrite")
    assert "computed" in line
    assert_untouched(tmp_path, before)


def test_nothing_selected(tmp_path, good):
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", good, "--ops", "Conv"), "--ops", starts="nothing to rewrite")
    assert_bad_input(cli("rewrite", good, "--exclude", "mm"), "--exclude", starts="nothing to rewrite")
    assert_untouched(tmp_path, before)


# --- 7: output path is the input ----------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dotted", "absolute", "symlink", "hardlink"])
def test_output_is_input(tmp_path, spelling):
    save(dense_model(), tmp_path / "model.onnx")
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        (tmp_path / "link.onnx").symlink_to("model.onnx")
    if spelling == "hardlink":
        os.link(tmp_path / "model.onnx", tmp_path / "hard.onnx")
    out = {"same": "model.onnx", "dotted": "sub/../model.onnx", "absolute": str(tmp_path / "model.onnx"),
           "symlink": "link.onnx", "hardlink": "hard.onnx"}[spelling]
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", "./model.onnx", "-o", out, cwd=tmp_path), "is the input model")
    assert_untouched(tmp_path, before)


def test_report_over_the_model(tmp_path, good):
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", good, "--report", good), "report")
    assert_untouched(tmp_path, before)
    assert_bad_input(cli("validate", good, good, "--json", good), "--json")
    assert_untouched(tmp_path, before)


# --- 8: bad option values ---------------------------------------------------------------

BAD_OPTIONS = {
    "rank 0": (["--rank", "0"], "--rank 0"),
    "rank negative": (["--rank", "-3"], "--rank -3"),
    "rank not a number": (["--rank", "abc"], "--rank"),
    "tol 2": (["--tol", "2"], "--tol 2"),
    "tol 0": (["--tol", "0"], "--tol 0"),
    "ratio 0.5": (["--ratio", "0.5"], "--ratio 0.5"),
    "rank and tol": (["--rank", "4", "--tol", "0.1"], "one of --rank, --tol, --ratio"),
    "tol and ratio": (["--tol", "0.1", "--ratio", "4"], "one of --rank, --tol, --ratio"),
    "shape no colon": (["--shape", "x"], "--shape 'x'"),
    "shape bad dims": (["--shape", "x:1xa"], "--shape 'x:1xa'"),
    "shape unknown input": (["--shape", "nope:1x64"], "nope"),
    "shape wrong rank": (["--shape", "x:1x64x2"], "--shape x"),
    "modes one side": (["--modes", "8x8"], "--modes '8x8'"),
    "modes not numbers": (["--modes", "8x8,4xq"], "--modes '8x8,4xq'"),
    "modes uneven": (["--modes", "8x8,6x8x1"], "same number"),
    "modes no layer": (["--modes", "3x3,3x3"], "--modes 3x3,3x3: matches no selected dense layer"),
    "order 0": (["--order", "0"], "--order"),
    "min-params negative": (["--min-params", "-1"], "--min-params"),
    "batch 0": (["--batch", "0"], "--batch 0"),
    "min-cosine 2": (["--min-cosine", "2"], "--min-cosine 2: must be in [-1, 1]"),
    "atol negative": (["--atol", "-1"], "--atol -1: must be >= 0"),
    "rtol negative": (["--rtol", "-1"], "--rtol -1: must be >= 0"),
    "threads -2": (["--threads", "-2"], "--threads -2: must be >= 1"),
    "threads 0": (["--threads", "0"], "--threads 0: must be >= 1"),
    "max-accuracy-drop negative": (["--max-accuracy-drop", "-1"], "--max-accuracy-drop -1"),
    "ops unknown": (["--ops", "MatMul,Foo"], "--ops MatMul,Foo: unknown op Foo; choose from MatMul, Gemm, Conv, ConvTranspose"),
    "calib missing": (["--fit", "aware", "--calib", "nope.npz"], "--calib 'nope.npz': no such file"),
    "format unknown": (["--format", "nope"], "--format"),
    "unknown option": (["--bogus"], "--bogus"),
    "include bad regex": (["--include", "("], "--include '('"),
    "exclude bad regex": (["--exclude", "[a-"], "--exclude '[a-'"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option(tmp_path, good, name):
    args, fragment = BAD_OPTIONS[name]
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", good, *args), fragment)
    assert_untouched(tmp_path, before)


@pytest.fixture
def feeds(tmp_path) -> dict:
    np.savez(tmp_path / "ok.npz", x=randn(3, N_IN))
    np.savez(tmp_path / "lacking.npz", z=randn(3, N_IN))
    np.savez(tmp_path / "wrong.npz", x=randn(3, 5))
    (tmp_path / "text.npz").write_text("not a zip\n")
    (tmp_path / "folder.npz").mkdir()
    return {k: tmp_path / f"{k}.npz" for k in ("ok", "lacking", "wrong", "text", "folder")} | {
        "missing": tmp_path / "missing.npz"}


@pytest.mark.parametrize("which,fragment", [("missing", "no such file"), ("lacking", "missing model input(s) x"),
                                            ("wrong", "shape"), ("text", "not an .npz"), ("folder", "folder without .npz files")])
@pytest.mark.parametrize("command", ["rewrite", "validate"])
def test_bad_inputs_file(tmp_path, good, feeds, command, which, fragment):
    before = snapshot(tmp_path)
    args = ["rewrite", good] if command == "rewrite" else ["validate", good, good]
    assert_bad_input(cli(*args, "--inputs", feeds[which]), fragment)
    assert_untouched(tmp_path, before)


# --- 9: where the output goes ---------------------------------------------------------------

def test_output_in_missing_folder_is_created(tmp_path, good):
    out = tmp_path / "new" / "deeper" / "small.onnx"
    report = tmp_path / "reports" / "r.json"
    result = cli("rewrite", good, "-o", out, "--report", report, "--min-cosine", "0")  # writing, not accuracy
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and report.is_file()
    json.loads(report.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx"]


def test_output_under_a_file(tmp_path, good):
    before = snapshot(tmp_path)
    assert_bad_input(cli("rewrite", good, "-o", good / "x.onnx"), "is not a folder")
    assert_bad_input(cli("rewrite", good, "--report", good / "r.json"), "report", "is not a folder")
    assert_untouched(tmp_path, before)


def test_output_is_a_directory(tmp_path, good):
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    result = cli("rewrite", good, "-o", tmp_path / "out")
    assert_bad_input(result, "directory")
    assert_untouched(tmp_path, before)


# --- 10: --debug ---------------------------------------------------------------------------

def test_debug_shows_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tnonnx.cli", "rewrite", "--debug", "nope.onnx"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "TnonnxError" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "tnonnx: error: model 'nope.onnx': no such file"
    assert sorted(os.listdir(tmp_path)) == []


# --- success paths ------------------------------------------------------------------------------

def test_rewrite_success(tmp_path, good):
    original = snapshot(tmp_path)
    report = tmp_path / "report.json"
    result = cli("rewrite", good, "--rank", "4", "--report", report, "--min-cosine", "0")  # writing, not accuracy
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "model.tt.onnx"  # the default: <stem>.<format>.onnx beside the input
    assert f"wrote {out}" in result.stdout
    assert "tnonnx rewrite" in result.stdout and "mm" in result.stdout and "validation" in result.stdout
    # atomic write: only the model, its rewrite and the report; no temporary files
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.tt.onnx", "report.json"]
    assert snapshot(tmp_path)["model.onnx"] == original["model.onnx"]
    # an ordinary file's permissions (not mkstemp's 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["format"] == "tt"
    assert [r["name"] for r in data["layers"]] == ["mm"] and data["layers"][0]["ranks"]
    assert data["validation"]["ok"] is True
    # the output runs, with the same interface
    new = onnx.load(str(out))
    x = randn(2, N_IN, seed=3)
    (y,) = run(new, {"x": x})
    assert y.shape == (2, N_OUT)


def test_rewrite_validation_failure_still_writes(tmp_path, good):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    result = cli("rewrite", good, "--rank", "1", "--min-cosine", "0.9999999", "-o", out, "--report", report)
    assert result.exit_code == 1, result.stderr
    assert out.is_file()
    assert "FAIL" in result.stdout and "cosine" in result.stdout
    data = json.loads(report.read_text())
    assert data["validation"]["ok"] is False
    assert any("output 'y'" in f and "cosine" in f for f in data["validation"]["failures"])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_validate_exit_codes(tmp_path, good):
    w = onnx.numpy_helper.to_array(dense_model().graph.initializer[0]).copy()
    w += 0.5 * randn(*w.shape, seed=7)
    other = save(dense_model(w), tmp_path / "other.onnx")
    before = snapshot(tmp_path)

    same = cli("validate", good, good, "--min-cosine", "0.9999")
    assert same.exit_code == 0, same.stderr
    assert "validation passed" in same.stdout

    out = tmp_path / "v.json"
    differs = cli("validate", good, other, "--min-cosine", "0.9999", "--json", out)
    assert differs.exit_code == 1, differs.stderr
    assert "FAIL" in differs.stdout
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["failures"]
    after = snapshot(tmp_path)
    del after["v.json"]
    assert after == before  # neither model touched


def test_inspect_json(good):
    result = cli("inspect", good, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["layers"]] == ["mm"]
    assert data["layers"][0]["params_before"] == N_IN * N_OUT
    assert data["totals"]["macs_before"] == N_IN * N_OUT


def test_no_command_prints_help():
    result = cli()
    assert "Usage:" in result.output and "rewrite" in result.output


def test_inspect_says_when_there_is_nothing_to_rewrite(tmp_path):
    from onnx_builders import make_model, value
    from onnx import helper

    path = tmp_path / "relu.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2, 3])], [value("y", [2, 3])]), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0 and "nothing tnonnx can rewrite" in result.output


def test_bench_in_new_processes(tmp_path, good):
    """--processes 2: the median process's speed-up, each process's listed; a file that is
    not a model is refused in one line before any process starts."""
    result = cli("bench", good, good, "--processes", "2", "--repeats", "3", "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert "the median of 2 processes (each: " in " ".join(result.stdout.split())
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_bad_input(cli("bench", good, tmp_path / "junk.onnx", "--processes", "2"), "junk.onnx")


def test_bench_rejects_zero_repeats(tmp_path):
    result = CliRunner().invoke(main, ["bench", "a.onnx", "b.onnx", "--repeats", "0"])
    assert result.exit_code == 2


# --- a new user's first hour -----------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["validate", "{m}", "{m}", "--min-cosine", "2"], "--min-cosine 2: must be in [-1, 1]"),
    (["validate", "{m}", "{m}", "--batch", "0"], "--batch 0"),
    (["validate", "{m}", "{m}", "--atol", "-1"], "--atol -1"),
    (["bench", "{m}", "{m}", "--threads", "0"], "--threads 0: must be >= 1"),
    (["bench", "{m}", "{m}", "--threads", "-2"], "--threads -2"),
    (["bench", "{m}", "{m}", "--batch", "0"], "--batch 0"),
    (["inspect", "{m}", "--batch", "0"], "--batch 0"),
])
def test_other_commands_check_options(good, args, fragment):
    assert_bad_input(cli(*[a.format(m=good) for a in args]), fragment)


def test_calib_file_errors_name_calib(tmp_path, good):
    np.savez(tmp_path / "lacking.npz", z=randn(3, N_IN))
    line = assert_bad_input(cli("rewrite", good, "--fit", "aware", "--calib", tmp_path / "lacking.npz"))
    assert "--calib" in line and "inputs '" not in line


def test_batch_help_says_what_it_does_per_command():
    helps = {c: " ".join(cli(c, "--help").stdout.split()) for c in ("inspect", "rewrite", "validate", "bench")}
    assert "MACs are counted" in helps["inspect"]
    assert "Deployment batch size" in helps["rewrite"] and "random feeds" in helps["rewrite"]
    assert "feeds the models are run on" in helps["validate"]
    assert "Batch size timed" in helps["bench"]
    assert "--max-accuracy-drop" in helps["rewrite"] and "--max-accuracy-drop" in helps["validate"]


def test_internal_errors_are_cut_at_a_word():
    from tnonnx.calibrate import clip

    text = "operands could not be broadcast together " * 20
    cut = clip(text, 100)
    assert len(cut) <= 101 and cut.endswith("…") and text.startswith(cut[:-1])
    assert cut[:-1].endswith("together") or cut[:-1].endswith("broadcast") or text[len(cut) - 1] == " "
    assert clip("short\nsecond line") == "short"


def test_max_accuracy_drop_without_labels_uses_agreement(tmp_path, good):
    result = cli("rewrite", good, "--rank", "1", "--max-accuracy-drop", "0", "-o", tmp_path / "s.onnx")
    assert result.exit_code == 1, result.stderr
    out = " ".join(result.stdout.split())
    assert "top-1 agreement with the original" in out and "no labels" in out
    assert "random samples" in out and "made-up inputs" in out  # random feeds are said plainly
    assert (tmp_path / "s.onnx").is_file()  # still written


def test_max_accuracy_drop_with_labels_uses_accuracy(tmp_path, good):
    x = randn(40, N_IN, seed=5)
    labels = np.argmax(x @ onnx.numpy_helper.to_array(onnx.load(str(good)).graph.initializer[0]), axis=1)
    np.savez(tmp_path / "test.npz", x=x, labels=labels)
    ok = cli("validate", good, good, "--inputs", tmp_path / "test.npz", "--max-accuracy-drop", "0")
    assert ok.exit_code == 0 and "on accuracy" in ok.stdout and "made-up" not in ok.stdout
    small = tmp_path / "s.onnx"
    result = cli("rewrite", good, "--rank", "1", "--inputs", tmp_path / "test.npz", "--max-accuracy-drop", "0.5",
                 "-o", small)
    assert result.exit_code == 1
    assert "accuracy dropped" in " ".join(result.stdout.split())


def test_report_json_is_complete(tmp_path, good):
    import hashlib

    report = tmp_path / "r.json"
    result = cli("rewrite", good, "--format", "svd", "--rank", "4", "--calib-random", "8", "--fit", "aware",
                 "--batch", "2", "--threads", "1", "--ops", "MatMul", "--report", report, "--min-cosine", "0")
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["input"] == {"path": str(good), "sha256": hashlib.sha256(good.read_bytes()).hexdigest()}
    assert set(data["versions"]) == {"tnonnx", "onnx", "onnxruntime"} and all(data["versions"].values())
    s = data["settings"]
    assert s["format"] == "svd" and s["rank_rule"]["rank"] == 4 and s["ops"] == ["MatMul"]
    assert s["calibration"] == {"source": "random 8", "samples": 8} and s["fit"] == "aware"
    assert s["finetune"]["epochs"] == 0 and "hidden_weight" in s["finetune"]
    assert s["deployment"] == {"batch": 2, "shapes": {}, "threads": 1}
    assert s["speedup"] is None and s["allow_slower"] is False and s["emit"] == "auto"
    assert {"modes", "order", "include", "exclude", "min_params"} <= set(s)
    assert data["latency"] is not None and data["validation"]["feeds"] == "random"


def test_modes_echoed_in_the_users_notation(tmp_path, good):
    report = tmp_path / "r.json"
    result = cli("rewrite", good, "--modes", "8x8,6x8", "--report", report, "--min-cosine", "0")
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["settings"]["modes"] == "8x8,6x8"


def test_inspect_json_has_no_after_fields(good):
    data = json.loads(cli("inspect", good, "--json").stdout)
    after = {"format", "ranks", "params_after", "macs_after", "weight_error", "output_error", "ms_before",
             "ms_after", "ms_predicted", "ms_measured", "emission", "shared_with"}
    assert not after & set(data["layers"][0]) and set(data["totals"]) == {"params_before", "bytes_before",
                                                                         "macs_before", "params_rewritable"}
    assert data["input"]["sha256"] and data["versions"]["onnx"]


def test_depthwise_conv_shows_its_weight(tmp_path):
    w = randn(4, 1, 3, 3)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="dw", group=4)],
                       [value("x", [1, 4, 8, 8])], [value("y", [1, 4, 6, 6])], [init("W", w)])
    data = json.loads(cli("inspect", save(model, tmp_path / "dw.onnx"), "--json").stdout)
    (row,) = data["layers"]
    assert row["weight_shape"] == [4, 1, 3, 3] and row["params_before"] == 36 and "depthwise" in row["reason"]


def test_assumed_sequence_length_is_stated(tmp_path):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [value("x", ["N", "seq", N_IN])], [value("y", ["N", "seq", N_OUT])], [init("W", randn(N_IN, N_OUT))])
    path = save(model, tmp_path / "seq.onnx")
    out = " ".join(cli("inspect", path).stdout.split())
    assert "assumed seq = 64 for input x (axis 1); set it with --shape x:1x64x64" in out
    assert "assumed" not in cli("inspect", path, "--shape", "x:1x16x64").stdout
    assert json.loads(cli("inspect", path, "--json").stdout)["notes"][0].startswith("assumed seq = 64")


def test_batch_scales_macs(good):
    one = json.loads(cli("inspect", good, "--json").stdout)["totals"]["macs_before"]
    four = json.loads(cli("inspect", good, "--json", "--batch", "4").stdout)["totals"]["macs_before"]
    assert four == 4 * one == 4 * N_IN * N_OUT


def test_piped_output_honours_columns(monkeypatch):
    from tnonnx.cli import _console

    monkeypatch.setenv("COLUMNS", "80")
    assert _console().width == 80
    monkeypatch.delenv("COLUMNS")
    assert _console().width == 200  # piped, no COLUMNS: wide, so logs are not folded


def test_modes_repeated_give_each_shape_its_own(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from tnonnx.graph import find_layers
    from tnonnx.plan import Selection, make_plan, rank_spec
    from tnonnx.tensorize import modes_list

    # an FFN pair: 64 -> 96 -> 64; each direction takes the pair whose products are its shape
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((64, 96)).astype(np.float32), rng.standard_normal((96, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ffn.onnx")
    report = tmp_path / "r.json"
    result = cli("rewrite", path, "--format", "tt", "--rank", "4", "--modes", "8x8,8x12", "--modes", "12x8,8x8",
                 "--report", report, "--min-cosine", "0", "--no-timing")
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["settings"]["modes"] == "8x8,8x12;12x8,8x8"
    layers = find_layers(onnx.load(path))
    plans = make_plan(layers, "tt", rank_spec(rank=4), Selection(), modes_list("8x8,8x12;12x8,8x8"))
    assert {p.layer.name: p.modes for p in plans} == {"up": ((8, 8), (8, 12)), "down": ((12, 8), (8, 8))}
    result = cli("rewrite", path, "--format", "tt", "--modes", "8x8,8x12", "--modes", "4x4,4x4",
                 "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2 and "--modes 4x4,4x4: matches no selected dense layer" in result.stderr


def test_no_keep_columns_leaves_each_layers_emission_as_it_is(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # a pair of features-first layers with a ReLU between: kept in columns by default
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((32, 48)).astype(np.float32), rng.standard_normal((48, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "pair.onnx")
    transposes = {}
    for flag in ("--keep-columns", "--no-keep-columns"):
        out, report = tmp_path / f"{flag}.onnx", tmp_path / f"{flag}.json"
        result = cli("rewrite", path, "--format", "tt", "--rank", "64", "--force", "--emit", "features-first", flag,
                     "-o", out, "--report", report, "--no-timing")
        assert result.exit_code == 0, result.stderr
        data = json.loads(report.read_text())
        assert data["settings"]["keep_columns"] == (flag == "--keep-columns")
        assert any("keep their columns layout" in n for n in data["notes"]) == (flag == "--keep-columns")
        transposes[flag] = sum(n.op_type == "Transpose" for n in onnx.load(out).graph.node)
    assert transposes["--keep-columns"] == transposes["--no-keep-columns"] - 2


def test_calib_takes_a_folder_of_batches_with_their_own_lengths(tmp_path):
    """Sentences padded per batch, not all to the longest: each .npz keeps its shapes."""
    w = randn(8, 6, seed=2)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [value("x", ["b", "s", 8])],
                       [value("y", ["b", "s", 6])], [init("W", w)])
    path = save(model, tmp_path / "seq.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, length in enumerate((3, 7)):
        np.savez(folder / f"{i}.npz", x=randn(4, length, 8, seed=10 + i))
    result = cli("rewrite", path, "-o", tmp_path / "out.onnx", "--format", "svd", "--rank", "2", "--fit", "aware",
                 "--calib", folder, "--no-timing", "--min-cosine", "0")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.onnx").is_file()
