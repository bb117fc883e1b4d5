"""settings.RewriteSettings: the rewrite's settings in small frozen groups, built alike by the
Python API and the CLI, parsed and checked before any model is read."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

import tnonnx
from onnx_builders import init, make_model, value
from tnonnx import api
from tnonnx.cli import main
from tnonnx.errors import TnonnxError
from tnonnx.settings import RewriteSettings


def _model(tmp_path):
    w = np.random.default_rng(0).standard_normal((32, 24)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [value("x", ["b", 32])],
                       [value("y", ["b", 24])], [init("W", w)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_keywords_are_parsed_into_groups():
    s = RewriteSettings.of(format="svd", budget="3x", modes="8x4,4x6", batch=4, shapes={"x": [4, 32]},
                           threads=2, quantize="int4", fit="aware", calib=8, min_cosine=0.9)
    assert s.rule.budget == 3.0 and s.rule.choosing and s.rule.describe() == "budget 3x"
    assert s.rule.modes == (((8, 4), (4, 6)),) and s.rule.modes_text == "8x4,4x6"
    assert s.rule.spec.align == s.delivery.quantization.block_size  # int4 ranks in whole blocks
    assert s.deployment.batch == 4 and s.deployment.shape_map == {"x": (4, 32)} and s.deployment.threads == 2
    assert "Gather" in s.scope.selection.ops  # every rewritable op when tnonnx chooses
    assert s.fitting.mode == "aware" and s.fitting.calib == 8 and s.checks.min_cosine == 0.9 and s.checks.asked
    assert s.delivery.changes_model and not RewriteSettings.of().delivery.changes_model
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rule.format = "tt"


@pytest.mark.parametrize("options, message", [
    (dict(emit="sideways"), "--emit sideways"),
    (dict(threads=0), "--threads 0"),
    (dict(speedup=0), "--speedup 0"),
    (dict(budget="many"), "--budget"),
    (dict(ops="Softmax"), "Softmax"),
    (dict(include="("), "--include '('"),
    (dict(target="gpu"), "--target gpu"),
])
def test_bad_values_are_refused_before_any_model_is_read(options, message):
    with pytest.raises(TnonnxError, match=message.replace("(", r"\(")):
        RewriteSettings.of(**options)
    with pytest.raises(TnonnxError, match=message.replace("(", r"\(")):
        tnonnx.rewrite("no such file.onnx", **options)  # the settings are judged first


@pytest.mark.parametrize("options, message", [
    (dict(fit="bogus"), "--fit bogus"),
    (dict(fit="aware"), "--fit aware needs calibration data"),
    (dict(finetune=-1), "--finetune -1"),
    (dict(admm_rho=1.0), "--admm-rho applies to --admm"),
])
def test_fitting_options_are_judged_before_the_model_is_read(options, message):
    """Like the settings above: a bad --fit is named before the missing file is."""
    with pytest.raises(TnonnxError, match=message):
        tnonnx.rewrite("no such file.onnx", format="svd", rank=4, **options)


def test_unknown_keywords_are_refused():
    with pytest.raises(TypeError, match="colour"):
        tnonnx.rewrite("m.onnx", colour="blue")


def test_the_cli_builds_the_settings_the_api_builds(tmp_path, monkeypatch):
    path = _model(tmp_path)
    seen = {}
    real = api.rewrite_with

    def spy(model, settings, progress=False):
        seen["settings"] = settings
        return real(model, settings, progress=progress)

    monkeypatch.setattr(api, "rewrite_with", spy)
    result = CliRunner().invoke(main, ["rewrite", str(path), "-o", str(tmp_path / "out.onnx"), "--format", "svd",
                                       "--rank", "4", "--batch", "2", "--threads", "1", "--no-timing",
                                       "--min-cosine", "0"])
    assert result.exit_code == 0, result.output
    want = RewriteSettings.of(format="svd", rank=4, batch=2, threads=1, timing=False, min_cosine=0.0,
                              format_options={})
    assert seen["settings"] == want
