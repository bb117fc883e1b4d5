"""Layer fits in worker processes (--workers) give the serial run's cores; failures in a
worker are one line; the stages' progress, time left and wall times (fixed clocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import tnonnx
from onnx_builders import init, make_model, randn, run, value
from tnonnx import api, calibrate, progress
from tnonnx.formats import RankSpec
from tnonnx.graph import find_layers
from tnonnx.plan import Fitter
from tnonnx.cli import main
from tnonnx.progress import Stage, Stages, duration, time_left
from tnonnx.workers import WorkerFailed, Workers

WIDTH, DEPTH = 32, 4
ROOT = Path(__file__).resolve().parents[1]


def mlp(seed: int = 0) -> onnx.ModelProto:
    """DEPTH MatMul + Relu layers of WIDTH x WIDTH: independent fits."""
    nodes, inits, x = [], [], "x"
    for i in range(DEPTH):
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}")]
        inits.append(init(f"W{i}", randn(WIDTH, WIDTH, seed=seed + i)))
        x = f"a{i}"
    return make_model(nodes, [value("x", ["b", WIDTH])], [value(x, ["b", WIDTH])], inits)


def calib(seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((96, WIDTH)).astype(np.float32)}


def cores(model: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _both(**options):
    serial, serial_report = tnonnx.rewrite(mlp(), workers=1, validate=False, timing=False, **options)
    parallel, report = tnonnx.rewrite(mlp(), workers=2, validate=False, timing=False, **options)
    return serial, serial_report, parallel, report


@pytest.mark.parametrize("options", [
    dict(format="tt", rank=4, fit="aware"),  # refined cores: the final fits in the workers
    dict(format="auto", budget="3x", fit="aware", allow_slower=True),  # the planner's candidates in the workers
])
def test_the_parallel_fit_gives_the_serial_cores(options):
    serial, serial_report, parallel, report = _both(calib=calib(), **options)
    assert any(n.startswith("workers: ") and "fitted in 2 worker processes" in n for n in report.notes)
    assert not any(n.startswith("workers: ") for n in serial_report.notes)
    assert [(r.format, r.ranks) for r in report.rows] == [(r.format, r.ranks) for r in serial_report.rows]
    want, got = cores(serial), cores(parallel)
    assert want.keys() == got.keys() and len(want) > DEPTH
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    x = calib(seed=2)["x"]
    assert np.array_equal(run(serial, {"x": x})[0], run(parallel, {"x": x})[0])


def test_a_real_model_with_convolutions_gets_the_serial_cores():
    """LeNet-5: its fully connected layers are fitted in the workers, its convolutions (whose
    factorisations cannot be pickled) in the parent; the cores are the serial run's."""
    with np.load(ROOT / "models" / "fashion_calib.npz") as f:
        data = {"input": f["input"][:128]}
    options = dict(format="auto", budget="4x", fit="aware", calib=data, allow_slower=True, validate=False,
                   timing=False)
    serial, serial_report = tnonnx.rewrite(ROOT / "models" / "lenet5_fashion.onnx", workers=1, **options)
    parallel, report = tnonnx.rewrite(ROOT / "models" / "lenet5_fashion.onnx", workers=2, **options)
    assert any("fitted in 2 worker processes" in n for n in report.notes)
    assert [(r.format, r.ranks) for r in report.rows] == [(r.format, r.ranks) for r in serial_report.rows]
    want, got = cores(serial), cores(parallel)
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_refining_leaves_the_cached_decomposition_alone():
    """Training the cores once wrote into tucker's cached rung, so a second fit of the same
    layer (or a worker's, with its own cache) started elsewhere and ended elsewhere."""
    model = mlp()
    layers = find_layers(model)
    batches, _ = calibrate.feed_batches(calib(), model, batch=1, shapes=None, what="--calib")
    data = api.layer_data(model, layers, batches)
    first, again = (Fitter(None, data).fit(layers[0], "tucker", RankSpec(rank=4)) for _ in range(2))
    assert first.cores.keys() == again.cores.keys()
    for name in first.cores:
        assert np.array_equal(first.cores[name], again.cores[name]), name


def test_small_fits_stay_in_this_process_by_default():
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=4, validate=False, timing=False)
    assert report.settings["workers"] is None
    assert not any(n.startswith("workers: ") for n in report.notes)  # far below workers.MIN_PARAMS
    assert Workers().count == len(os.sched_getaffinity(0))


def test_svd_candidates_stay_in_this_process_unless_workers_are_asked_for(monkeypatch):
    """svd's budget candidates come off one SVD per layer: below workers.SVD_POOL_FLOPS the
    default does not start workers for them, whatever the parameter count; --workers does."""
    import tnonnx.workers as workers

    monkeypatch.setattr(workers, "MIN_PARAMS", 1)
    options = dict(format="svd", budget="2x", fit="aware", calib=calib(), allow_slower=True, validate=False,
                   timing=False)
    _, default = tnonnx.rewrite(mlp(), **options)
    assert not any(n.startswith("workers: ") for n in default.notes)
    _, asked = tnonnx.rewrite(mlp(), workers=2, **options)
    assert any("candidates fitted in 2 worker processes" in n for n in asked.notes)
    monkeypatch.setattr(workers, "SVD_POOL_FLOPS", 1.0)
    _, large = tnonnx.rewrite(mlp(), **options)
    assert any("candidates fitted in" in n for n in large.notes)
    assert [(r.format, r.ranks) for r in default.rows] == [(r.format, r.ranks) for r in asked.rows]


def test_a_fit_failing_in_a_worker_is_one_line():
    with pytest.raises(WorkerFailed, match=r"^fitting mm\d in svd failed in a worker process: AttributeError: ") as exc:
        tnonnx.rewrite(mlp(), format="svd", rank=4, format_options={"data": "not calibration data"}, workers=2,
                       validate=False, timing=False)
    assert "\n" not in str(exc.value) and exc.value.exit_code == 3


class _DiesWhenUnpickled:
    def __reduce__(self):
        return (os._exit, (1,))


def test_a_worker_that_dies_is_one_line():
    with pytest.raises(WorkerFailed, match=r"^a worker process died while fitting mm\d in svd"):
        tnonnx.rewrite(mlp(), format="svd", rank=4, format_options={"x": _DiesWhenUnpickled()}, workers=2,
                       validate=False, timing=False)


UNGUARDED_SCRIPT = """
import sys
from tnonnx.workers import Workers, WorkerFailed
try:
    Workers(2).map(abs, [-1, -2, -3], lambda i: i, lambda i, r: None, lambda i: f"job {i}")
except WorkerFailed as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_script_without_a_main_guard_is_told_so(tmp_path):
    """Worker processes re-import the calling script; one without an `if __name__ ==
    "__main__":` guard starts its pool again in each, which kills them. The one line names
    the guard (a user's first script, as the experiments in bench/ are not)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "a worker process died" in done.stdout and 'if __name__ == "__main__":' in done.stdout


def test_workers_and_quiet_on_the_command_line(tmp_path):
    source = tmp_path / "mlp.onnx"
    onnx.save(mlp(), source)
    runner = CliRunner()
    bad = runner.invoke(main, ["rewrite", str(source), "--workers", "0", "-o", str(tmp_path / "out.onnx")])
    assert bad.exit_code == 2 and "--workers 0: must be >= 1" in bad.output
    report = tmp_path / "report.json"
    good = runner.invoke(main, ["rewrite", str(source), "--format", "svd", "--rank", "4", "--workers", "2", "--quiet",
                                "--no-timing", "--min-cosine", "0.1", "-o", str(tmp_path / "out.onnx"), "--report", str(report)])
    assert good.exit_code == 0, good.output
    stages = json.loads(report.read_text())["stages"]
    assert list(stages) == ["fit", "latency", "validate"] and all(t >= 0 for t in stages.values())
    assert "time by stage: fit " in good.output


# ------------------------------------------------------------------ progress, on fixed clocks


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A display that keeps what would be drawn."""

    def __init__(self):
        self.lines, self.ended = [], []

    def start(self, stage):
        self.lines.append(stage.describe())

    def update(self, stage):
        self.lines.append(stage.describe())

    def end(self, stage):
        self.lines.append(stage.describe())
        self.ended.append(stage)


def test_time_left_is_the_rate_so_far():
    assert time_left(10.0, 2, 8) == 30.0
    assert time_left(10.0, 0.5, 2) == 30.0
    assert time_left(4.0, 0, 8) is None  # no rate yet
    assert time_left(4.0, 8, 8) == 0.0
    assert [duration(s) for s in (None, 0, 7.4, 65, 3725)] == ["?", "0:00", "0:07", "1:05", "1:02:05"]


def test_a_stage_reports_its_progress_and_time_left():
    clock, shown = Clock(), Recorder()
    stages = Stages(clock=clock, display=shown)
    with stages.stage("fit", 4, "layers") as stage:
        clock.now += 3
        stage.advance()
        clock.now += 9
        stage.advance(0.5)
        stage.advance(2.5)
        assert stage.left == 0.0
        clock.now += 1
    assert shown.lines == ["fit: 0/4 layers, 0:00, about ? left", "fit: 1/4 layers, 0:03, about 0:09 left",
                           "fit: 1/4 layers, 0:12, about 0:20 left", "fit: 4/4 layers, 0:12, about 0:00 left",
                           "fit: 4/4 layers, 0:13"]
    assert stages.seconds == {"fit": 13.0}
    stage = Stage("x", 2, "", clock)
    stage.advance(5)
    assert stage.done == 2  # never past its total


def test_stage_times_add_up_and_survive_errors():
    clock = Clock()
    stages = Stages(clock=clock)
    for seconds in (2.0, 3.5):
        with stages.stage("fit"):
            clock.now += seconds
    with pytest.raises(RuntimeError), stages.stage("validate"):
        clock.now += 1.0
        raise RuntimeError
    assert stages.seconds == {"fit": 5.5, "validate": 1.0}
    assert progress.stage_times(stages.seconds) == "time by stage: fit 5.50 s, validate 1.00 s"


def test_the_rewrite_reports_every_stage_it_ran():
    ticks = iter(range(10**6))
    shown = Recorder()
    stages = Stages(clock=lambda: float(next(ticks)), display=shown)
    _, report = tnonnx.rewrite(mlp(), format="svd", budget="2x", fit="blockwise", calib=calib(), finetune=1, allow_slower=True,
                               finetune_hidden=0, timing=False, progress=stages)
    names = [s.name for s in shown.ended]
    assert names == ["capture", "allocate", "fit", "refine", "finetune", "latency", "validate"]
    for stage in shown.ended[:5]:  # stages with units of work end with all of it done
        assert stage.done == stage.total > 0, stage.name
    assert shown.ended[2].total == sum(r.format is not None for r in report.rows)
    assert report.stages == {s.name: s.ended - s.started for s in shown.ended}
    assert report.to_dict()["stages"] == {k: round(v, 3) for k, v in report.stages.items()}


def test_a_worker_leaves_when_its_parent_is_gone():
    """The watch a worker starts on its parent (workers._watch): it keeps watching while the
    parent lives and leaves once it is gone; no clock involved (sleep and exit injected)."""
    import subprocess
    import sys

    from tnonnx import workers

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid names no process now
    left, naps = [], []
    workers._watch(finished.pid, sleep=naps.append, leave=left.append)
    assert left == [1] and naps == []

    class Stop(Exception):
        pass

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            raise Stop
    with pytest.raises(Stop):  # this process lives: the watch naps on and never leaves
        workers._watch(os.getpid(), interval=0.5, sleep=nap, leave=left.append)
    assert naps == [0.5, 0.5, 0.5] and left == [1]


def test_a_worker_dying_before_a_job_is_sent_is_the_same_one_line(monkeypatch):
    # the pool breaks while map is still sending jobs (a worker died on an earlier one):
    # submit raises, and that too is WorkerFailed naming a job in flight
    from concurrent import futures

    class BreaksOnSecondSubmit:
        submitted = 0

        def submit(self, fn, *args):
            self.submitted += 1
            if self.submitted > 1:
                raise futures.process.BrokenProcessPool("a child process terminated abruptly")
            return futures.Future()

        def shutdown(self, **kwargs):
            pass

    workers = Workers(2)
    monkeypatch.setattr(workers, "_start", lambda: BreaksOnSecondSubmit())
    with pytest.raises(WorkerFailed, match=r"^a worker process died while fitting job 0 \(out of memory\? or, "):
        workers.map(lambda x: x, [0, 1, 2], lambda i: i, lambda i, r: None, lambda i: f"job {i}")
