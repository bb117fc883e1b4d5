"""The latency-aware planner, driven by fixed timings: nothing here is timed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from onnx import helper
from rich.console import Console

import tnonnx
from tnonnx import latency, macs
from tnonnx.errors import TnonnxError
from tnonnx.formats import RankSpec
from tnonnx.choose import Option, Unreachable, apply_floor, choose

from onnx_builders import init, make_model, rel_err, run, value


def mlp(width: int = 256, depth: int = 3, rank: int = 16, rows: int = 64):
    """MatMuls whose weights are nearly rank `rank` (so svd at that rank keeps the function)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((width, rank)) @ rng.standard_normal((rank, width)) / width
        w += 1e-4 * rng.standard_normal((width, width))
        inits.append(init(f"W{i}", w.astype(np.float32)))
        y = "y" if i == depth - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [y], name=f"fc{i}"))
        x = y
    return make_model(nodes, [value("x", ["batch", width])], [value("y", ["batch", width])], inits)


def mac_ms(model, feeds) -> float:
    """A timer proportional to MACs, plus a small cost per node: factorised layers with
    fewer MACs come out faster."""
    cost = macs.count(model, {k: v.shape for k, v in feeds.items()})
    return cost.total * 1e-6 + 1e-3 * len(model.graph.node)


def matmul_count_ms(model, feeds) -> float:
    """Every MatMul takes 1 ms whatever its size: a two-factor layer is slower than dense."""
    return float(sum(n.op_type == "MatMul" for n in model.graph.node))


# ------------------------------------------------------------------ the allocator


def _opt(fmt, params, error, ms):
    return Option(fmt, None if fmt is None else RankSpec(rank=1), params, error, ms=ms)


def test_choose_without_a_time_limit_spends_parameters_where_the_error_drops_most():
    options = {"a": [_opt(None, 100, 0.0, 1.0), _opt("svd", 10, 0.5, 0.5), _opt("svd", 20, 0.1, 0.6)],
               "b": [_opt(None, 100, 0.0, 1.0), _opt("svd", 10, 0.3, 0.5), _opt("svd", 20, 0.29, 0.6)]}
    choice = choose(options, max_params=30)
    assert (choice["a"].params, choice["b"].params) == (20, 10)


def test_choose_meets_a_time_limit_at_the_least_error():
    options = {"a": [_opt(None, 100, 0.0, 4.0), _opt("tt", 10, 0.2, 1.0), _opt("svd", 30, 0.05, 3.0)],
               "b": [_opt(None, 100, 0.0, 4.0), _opt("tt", 10, 0.3, 1.0)]}
    choice = choose(options, max_ms=5.0)
    assert sum(o.ms for o in choice.values()) <= 5.0
    assert choice["a"].format == "tt" and choice["b"].format is None  # dense b is exact and still fits
    with pytest.raises(Unreachable, match="fastest choice"):
        choose(options, max_ms=1.5)


def test_floor_drops_candidates_slower_than_dense():
    kept, dropped = apply_floor([_opt(None, 100, 0.0, 1.0), _opt("svd", 10, 0.5, 1.5), _opt("tt", 10, 0.5, 0.5)])
    assert dropped == 1 and [o.format for o in kept] == [None, "tt"]


# ------------------------------------------------------------------ the pipeline


def test_speedup_is_met_when_the_fixed_timings_make_it_reachable():
    model = mlp()
    timer = latency.CallableTimer(mac_ms)
    small, report = tnonnx.rewrite(model, format="svd", rank=16, batch=64, speedup=2.0, timer=timer)
    assert report.totals.ms_before / report.totals.ms_after >= 2.0
    # least error: layers stay dense where the target allows it
    assert any(r.format is None and "targets are met" in r.reason for r in report.rows)
    assert any(r.format == "svd" for r in report.rows)
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    assert rel_err(run(model, {"x": x})[0], run(small, {"x": x})[0]) < 1e-2


def test_speedup_out_of_reach_is_refused_with_the_shortfall():
    # the fastest plan is built and measured: the shortfall is the measured one
    with pytest.raises(TnonnxError, match=r"--speedup 50: not reached; the best plan found runs \d+\.\d+x") as exc:
        tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=50, timer=latency.CallableTimer(mac_ms))
    assert exc.value.exit_code == 2


def test_a_whole_model_that_misses_after_replanning_is_refused_or_kept_with_keep_best():
    original = mac_ms(mlp(), {"x": np.zeros((64, 256), np.float32)})

    def layers_fast_model_not(model, feeds):  # the layers promise, the whole model never delivers
        return mac_ms(model, feeds) if model.graph.name == "layer" else original

    timer = latency.CallableTimer(layers_fast_model_not)
    with pytest.raises(TnonnxError, match=r"--speedup 2: not reached; the best plan found runs 1.00x"):
        tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=2, timer=timer)
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=2, timer=timer, keep_best=True)
    assert any("written because of --keep-best" in n for n in report.notes)


def test_the_floor_keeps_layers_dense_that_are_timed_slower():
    timer = latency.CallableTimer(matmul_count_ms)
    with pytest.raises(TnonnxError, match="slower than the dense layer"):
        tnonnx.rewrite(mlp(), format="auto", rank=16, batch=64, timer=timer)
    with pytest.raises(TnonnxError, match="--allow-slower lifts this rule"):
        tnonnx.rewrite(mlp(), format="svd", budget=2, batch=64, timer=timer)
    # asked for: done, and the report says it is slower and what would avoid it
    _, report = tnonnx.rewrite(mlp(), format="svd", budget=2, batch=64, timer=timer, allow_slower=True)
    assert any("SLOWER" in n and "--speedup" in n for n in report.notes)
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=timer)
    assert any("SLOWER" in n and "--format auto or --budget" in n for n in report.notes)


def test_auto_and_budget_use_candidates_timed_faster():
    timer = latency.CallableTimer(mac_ms)
    _, report = tnonnx.rewrite(mlp(), format="auto", rank=16, batch=64, timer=timer)
    rewritten = [r for r in report.rows if r.format]
    assert rewritten and all(r.ms_after <= r.ms_before for r in rewritten)
    assert report.totals.ms_after < report.totals.ms_before


def test_timings_are_cached_and_missed_when_threads_or_shape_change():
    timer = latency.CallableTimer(mac_ms)
    tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=timer)
    first = timer.calls
    assert first > 2  # layers and candidates, beside the two whole-model runs
    timer.calls = 0
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=timer)
    assert timer.calls == 0  # the layers and the whole models (the same plan) all cached
    assert report.latency.cache_hits > 0 and report.latency.timed == 0
    for changed in (dict(batch=64, threads=2), dict(batch=8)):
        timer.calls = 0
        tnonnx.rewrite(mlp(), format="svd", rank=16, timer=timer, **changed)
        assert timer.calls == first
    timer.calls = 0
    tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=timer, timing_cache=False)
    assert timer.calls == first


def test_whole_models_are_cached_as_the_group_timed_together(tmp_path):
    timer = latency.CallableTimer(mac_ms)
    original, other = mlp(), mlp(depth=2)
    feeds = {"x": np.zeros((4, 256), np.float32)}
    cache = latency.TimingCache(tmp_path / "t.json")
    clock = latency.Clock(timer, cache)
    alone = clock.models([original], feeds)
    assert timer.calls == 1 and not clock.last_cached
    # a group holding a model timed before is timed again, all of it: its times come from one run
    assert clock.models([original, other], feeds) == [alone[0], mac_ms(other, feeds)]
    assert timer.calls == 3
    assert clock.models([original, other], feeds) and timer.calls == 3  # within the run: cached
    assert not clock.last_cached
    cache.save()
    later = latency.Clock(timer, latency.TimingCache(tmp_path / "t.json"))
    assert later.models([original, other], feeds) == [alone[0], mac_ms(other, feeds)] and timer.calls == 3
    assert later.last_cached  # taken by an earlier run: the report says so
    report = tnonnx.rewrite(original, format="svd", rank=8, batch=64, timer=timer)[1]
    report.latency.totals_cached = True
    buffer = io.StringIO()
    report.render(Console(width=200, file=buffer))
    assert "earlier run of the same plan" in buffer.getvalue()


class _FakeSession:
    """Advances a fake clock by its run time and counts its runs."""

    def __init__(self, clock, ms):
        self.clock, self.ms, self.runs = clock, ms, 0

    def run(self, outputs, feeds):
        self.clock.now += self.ms / 1e3
        self.runs += 1


class _FakeClock:
    now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("ms, runs", [(500.0, 1 + 1 + 7), (1.0, 3 + 1 + 25 * (1 + 2))])
def test_slow_models_are_warmed_once_and_timed_without_switch_runs(ms, runs):
    clock = _FakeClock()
    fakes = [_FakeSession(clock, ms), _FakeSession(clock, 2 * ms)]

    class Sessions:
        def get(self, model, **kwargs):
            return fakes[model]

    timer = latency.OrtTimer(clock=clock)
    got = timer([0, 1], {}, None, sessions=Sessions())
    assert got == pytest.approx([ms, 2 * ms])
    # slow: one warm-up run, one single run, one timed run per round for min_rounds (the
    # budget is spent); fast: the full warm-up, then per round an untimed switch run and
    # round_ms / ms timed runs, up to max_rounds
    assert [f.runs for f in fakes] == [runs, runs]


def test_the_cache_file_lives_where_documented(tmp_path, monkeypatch):
    monkeypatch.setenv("TNONNX_CACHE_DIR", str(tmp_path))
    tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=latency.CallableTimer(mac_ms))
    entries = json.loads((tmp_path / "timings.json").read_text())
    assert entries and all(isinstance(v, float) for v in entries.values())
    monkeypatch.delenv("TNONNX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert latency.cache_dir() == tmp_path / "xdg" / "tnonnx"


def test_the_report_carries_measured_and_predicted_times():
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, threads=1,
                               timer=latency.CallableTimer(mac_ms))
    data = report.to_dict()
    assert data["latency"]["measured"] is True and data["latency"]["threads"] == 1
    assert "x 64x256" in data["latency"]["deployment"]
    assert data["totals"]["ms_before"] > data["totals"]["ms_after"] > 0
    rows = [r for r in data["layers"] if r["format"]]
    assert rows and all(r["ms_before"] and r["ms_after"] and r["ms_predicted"] for r in rows)
    # without timing, everything is the cost model's prediction and says so
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timing=False)
    assert report.latency.measured is False and report.latency.timed > 0


def test_other_load_is_the_machines_cpu_time_less_this_process_over_the_timing_windows():
    """Fixed readings: the machine busy 3.0 s and this process 1.2 s over 2 s of timing is
    0.9 cores of other work; a window without a machine reading makes the figure unknown."""
    readings = iter([(10.0, 5.0), (13.0, 6.2), (20.0, 7.0), (20.5, 7.5)])
    load = latency.OtherLoad()
    load.add(next(readings), next(readings), 2.0)
    assert load.cores == pytest.approx(0.9)
    load.add(next(readings), next(readings), 1.0)  # 0.5 s busy, all of it this process
    assert load.cores == pytest.approx(0.6)
    load.add((None, 0.0), (None, 1.0), 1.0)
    assert load.cores is None
    assert latency.OtherLoad().cores is None  # nothing timed yet
    busy = latency.machine_busy_seconds()
    assert busy is None or busy > 0


def test_the_report_states_the_other_load_while_timing(monkeypatch):
    """A clock whose machine readings show one other core busy: the report says so; the
    cost model (nothing timed) states none."""
    state = {"machine": 0.0, "own": 0.0}

    def timer(model, feeds):  # each timed model: 1 s of wall, the machine 1.5 s busy, this process 0.5 s
        state["machine"] += 1.5
        state["own"] += 0.5
        return mac_ms(model, feeds)

    wall = iter(float(i) for i in range(10**6))
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(wall))
    monkeypatch.setattr(latency, "machine_busy_seconds", lambda: state["machine"])
    monkeypatch.setattr(latency, "own_cpu_seconds", lambda: state["own"])
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, threads=1,
                               timer=latency.CallableTimer(timer), timing_cache=False)
    assert report.latency.other_load is not None and report.to_dict()["latency"]["other_load"] > 0
    buffer = io.StringIO()
    report.render(Console(width=300, file=buffer))
    assert "cores busy while timing" in buffer.getvalue()
    _, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timing=False)
    assert report.latency.other_load is None


@pytest.mark.parametrize("bad, message", [(dict(threads=0), "--threads 0"), (dict(speedup=0), "--speedup 0"),
                                          (dict(budget="two"), "--budget two")])
def test_bad_speed_options_are_one_line_errors(bad, message):
    with pytest.raises(TnonnxError, match=message):
        tnonnx.rewrite(mlp(), format="svd", rank=16, **bad)


def test_budget_is_taken_as_the_cli_writes_it():
    _, a = tnonnx.rewrite(mlp(), format="svd", budget="4x", allow_slower=True, validate=False)
    _, b = tnonnx.rewrite(mlp(), format="svd", budget=4.0, allow_slower=True, validate=False)
    assert a.totals.params_after == b.totals.params_after


def test_speedup_budgets_use_ranks_in_multiples_of_the_simd_width():
    _, report = tnonnx.rewrite(mlp(), format="svd", budget=4, speedup=1.5, batch=64,
                               timer=latency.CallableTimer(mac_ms))
    ranks = [r.ranks[0] for r in report.rows if r.format]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert report.totals.ms_before / report.totals.ms_after >= 1.5


def test_a_model_that_cannot_be_timed_is_still_rewritten():
    def fails(model, feeds):
        raise RuntimeError("onnxruntime refuses")

    small, report = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, timer=latency.CallableTimer(fails))
    assert report.totals.ms_before is None and any("latency not measured" in n for n in report.notes)
    assert all(not r.ms_measured for r in report.rows)
    with pytest.raises(TnonnxError, match="could not be timed"):
        tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=2, timer=latency.CallableTimer(fails))


def test_meet_speedup_tightens_on_a_miss_and_relaxes_a_large_surplus():
    from tnonnx.choose import meet_speedup

    # a plan is its slack here; measure maps it to the whole model's time
    built = []

    def build(slack):
        built.append(slack)
        return slack

    # a miss (12 ms against 10), then the tightened plan meets it: kept
    assert meet_speedup(build, lambda plan: 12.0 if plan == 0 else 9.5, 10.0) == 2.0
    # far faster than needed: one relaxed plan, kept because it still meets the target
    built.clear()
    assert meet_speedup(build, lambda plan: 5.0 if plan == 0 else 9.0, 10.0) == -5.0
    # the fully relaxed plan misses, half of the surplus is kept
    built.clear()
    assert meet_speedup(build, lambda plan: 5.0 if plan == 0 else (11.0 if plan == -5.0 else 8.0), 10.0) == -2.5
    # the full and the half relaxations miss, a quarter of the surplus is kept
    built.clear()
    assert meet_speedup(build, lambda plan: 5.0 if plan == 0 else (8.0 if plan == -1.25 else 11.0), 10.0) == -1.25
    # every relaxed plan misses: the kept plan is rebuilt (the layers' plans are shared) and returned
    built.clear()
    assert meet_speedup(build, lambda plan: 5.0 if plan == 0 else 11.0, 10.0) == 0.0
    assert built == [0.0, -5.0, -2.5, -1.25, 0.0]
    # a miss by a hair asks for at least 2% of the target: a plan that saves that much meets it
    built.clear()
    assert meet_speedup(build, lambda plan: 10.01 if plan < 0.2 else 9.9, 10.0) == pytest.approx(0.2)
    assert built == [0.0, pytest.approx(0.2)]
    # no tighter plan exists: the last one is rebuilt and kept for the caller's verdict
    def build_or_fail(slack):
        if slack > 0:
            raise TnonnxError("unreachable")
        return slack
    assert meet_speedup(build_or_fail, lambda plan: 12.0, 10.0) == 0.0


def test_fastest_within_a_parameter_limit():
    from tnonnx.choose import fastest

    options = {"a": [_opt(None, 100, 0.0, 4.0), _opt("tt", 10, 0.2, 1.0), _opt("svd", 30, 0.05, 0.5)],
               "b": [_opt(None, 100, 0.0, 4.0), _opt("tt", 10, 0.3, 2.0), _opt("svd", 40, 0.1, 1.0)]}
    picked = fastest(options)
    assert [picked[k].format for k in "ab"] == ["svd", "svd"]
    picked = fastest(options, max_params=50)  # both svd would need 70: b svd + a tt is the fastest that fits
    assert sum(o.params for o in picked.values()) <= 50
    assert sum(o.ms for o in picked.values()) == 2.0
    with pytest.raises(Unreachable):
        fastest(options, max_params=15)


# ------------------------------------------------------------------ pruning before the errors


def _pruning_setup(rows: int):
    from tnonnx.graph import find_layers
    from tnonnx.latency import Clock, Deployment
    from tnonnx.layer_fits import emit_layer
    from tnonnx.layer_timing import LayerTimer

    model = mlp(width=256, depth=1, rows=rows)
    layer = find_layers(model)[0]
    timer = LayerTimer(model, [layer], Deployment.of(rows), Clock(latency.CallableTimer(mac_ms)), emit_layer, 17)
    return layer, timer.pruner([layer])


def test_the_pruner_says_what_the_cost_model_would_never_time():
    """A TT at the largest cap costs more MACs than the dense layer at 64 rows: predicted
    far slower in every emission. A rank-4 svd is not. The pruner works the same on a
    worker's copy of the layer (pickled, no node)."""
    import pickle

    from tnonnx.choose import emissions_for
    from tnonnx.plan import Fitter
    from tnonnx.workers import portable

    layer, pruner = _pruning_setup(64)
    fitter = Fitter()
    big = fitter.fit(layer, "tt", RankSpec(rank=64), final=False, measure=False)
    small = fitter.fit(layer, "svd", RankSpec(rank=4), final=False, measure=False)
    assert pruner.slower(layer, big, emissions_for(big, "auto", layer))
    assert not pruner.slower(layer, small, emissions_for(small, "auto", layer))
    copy = pickle.loads(pickle.dumps(pruner))
    assert copy.slower(portable(layer), big, emissions_for(big, "auto", layer))


def test_candidates_predicted_far_slower_are_left_out_unmeasured_with_their_larger_ranks():
    """With a pruner, candidate_options keeps exactly the unpruned options the cost model
    does not predict PRUNE_FACTOR slower than dense (those LayerTimer would not time and the
    floor would drop), fits no larger cap of a pruned format, and tallies the pruned trial."""
    from tnonnx.choose import candidate_options, emissions_for
    from tnonnx.plan import Fitter, LayerPlan

    layer, pruner = _pruning_setup(64)
    trials = [(f, RankSpec(rank=r)) for f in ("svd", "tt", "tucker") for r in (1, 2, 4, 8, 16, 32, 64, 128)]
    plan = LayerPlan(layer, "svd", RankSpec())
    free_fitter, pruned_fitter, counts = Fitter(), Fitter(), {}
    everything = candidate_options(plan, free_fitter, trials)
    kept = candidate_options(plan, pruned_fitter, trials, counts, pruner, "auto")

    def fast(o):
        fact = free_fitter.fit(layer, o.format, o.spec, final=False)
        return not pruner.slower(layer, fact, emissions_for(fact, "auto", layer))

    key = lambda o: (o.format, o.spec.rank)  # noqa: E731
    first_slow = {}
    for o in everything:
        if not fast(o):
            first_slow.setdefault(o.format, o.spec.rank)
    assert first_slow, "the case must have candidates predicted far slower"
    assert [key(o) for o in kept] == [key(o) for o in everything if o.format not in first_slow
                                      or o.spec.rank < first_slow[o.format]]
    assert counts["predicted slower"] == len(first_slow)
    for fmt, rank in first_slow.items():
        assert not any(k[1] == fmt and k[2].rank > rank for k in pruned_fitter.cache)
        pruned = pruned_fitter.cache[pruned_fitter.key(layer, fmt, RankSpec(rank=rank), final=False)]
        assert not pruned.measured


def test_auto_reports_the_candidates_it_did_not_measure():
    _, report = tnonnx.rewrite(mlp(), format="auto", budget=2, batch=64, timer=latency.CallableTimer(mac_ms))
    assert any("predicted more than 2x slower by the cost model" in n for n in report.notes), report.notes


def test_speedup_plans_are_judged_against_the_original_timed_beside_them():
    """The machine gets three times slower after the original's first timing (load arriving):
    the plan is still judged by its ratio to the original timed beside it, so the plan and
    the verdict are those of a steady machine, not a re-plan to lower ranks or a refusal."""
    whole = []

    def load_arrives(model, feeds):
        if model.graph.name == "layer":
            return mac_ms(model, feeds)
        whole.append(model)
        return mac_ms(model, feeds) * (1.0 if len(whole) == 1 else 3.0)

    _, steady = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=2.0, timer=latency.CallableTimer(mac_ms))
    _, loaded = tnonnx.rewrite(mlp(), format="svd", rank=16, batch=64, speedup=2.0,
                               timer=latency.CallableTimer(load_arrives))
    assert [(r.name, r.format, r.ranks) for r in loaded.rows] == [(r.name, r.format, r.ranks) for r in steady.rows]
    assert loaded.totals.ms_before / loaded.totals.ms_after >= 2.0


def test_the_cost_model_charges_nothing_for_what_onnxruntime_folds_at_load():
    """An adtn layer decodes its weight in the graph from initializers only: onnxruntime folds
    that at session load, so the prediction is about the dense layer's, not the decode's."""
    from onnx_builders import single_layer_model

    original = single_layer_model((256, 128))
    new, _ = tnonnx.rewrite(original, format="adtn", rank=3, validate=False, timing=False,
                            format_options={"iters": 0})
    decode = [n for n in new.graph.node if n.op_type != "MatMul" or n.input[0] != "x"]
    assert len(decode) > 20
    folded = macs.folded_outputs(new.graph)
    assert all(o in folded for n in decode for o in n.output)
    assert "y" not in folded and not folded & {o for o in original.graph.node[0].output}
    feeds = {"x": np.zeros((1, 5, 256), np.float32)}
    timer = latency.CostModelTimer()
    dense_ms, adtn_ms = timer([original, new], feeds, 2)
    assert adtn_ms < 1.2 * dense_ms  # (the decode's 2^15-entry states, counted per run, made it 50x)


def test_the_cache_file_keeps_the_most_recently_used_timings(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "MAX_CACHE_ENTRIES", 3)
    cache = latency.TimingCache(tmp_path / "t.json")
    for key in "abcd":
        cache.put(key, 1.0)
    assert cache.get("a") == 1.0  # used again: newest
    cache.save()
    assert list(json.loads((tmp_path / "t.json").read_text())) == ["c", "d", "a"]
    assert cache.get_group(["c", "x"]) is None and cache.get_group(["d", "c"]) == [1.0, 1.0]


def _pair(width: int):
    """x -> MatMul -> Relu -> MatMul -> y, `width` features throughout."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((width, width)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="down")]
    return make_model(nodes, [value("x", ["batch", width])], [value("y", ["batch", width])],
                      [init("w1", w1), init("w2", w2)])


@pytest.mark.parametrize("keep_columns", [True, False])
def test_speedup_times_the_plan_as_it_will_be_written(keep_columns):
    """--speedup judges each plan on the whole model; where two features-first layers keep
    the columns layout between them in the written model, the plan is timed that way too."""
    both = []  # Transposes of each whole model timed with both layers rewritten

    def record(model, feeds):
        names = {n.name.split("/")[0] for n in model.graph.node if "/" in n.name}
        if model.graph.name != "layer" and names >= {"up", "down"}:
            both.append(sum(n.op_type == "Transpose" for n in model.graph.node))
        return mac_ms(model, feeds)

    new, report = tnonnx.rewrite(_pair(256), format="tt", rank=4, emit="features-first", batch=64, speedup=1.3,
                                 keep_columns=keep_columns, validate=False, timer=latency.CallableTimer(record))
    assert all(r.format == "tt" for r in report.rows)
    written = sum(n.op_type == "Transpose" for n in new.graph.node)
    assert written == (2 if keep_columns else 4)
    assert both and set(both) == {written}


def test_speedup_no_candidate_can_meet_says_so():
    """TT at rank 4 on 32 features takes more MACs than the dense pair: under a MAC timer no
    candidate is faster, and the one line names --speedup and why, not a rank."""
    with pytest.raises(TnonnxError, match=r"nothing to rewrite: --speedup 1.2 cannot be met \(no candidate runs "
                                          r"faster than the dense layer at the deployment shape\)"):
        tnonnx.rewrite(_pair(32), format="tt", rank=4, emit="features-first", batch=64, speedup=1.2,
                       validate=False, timer=latency.CallableTimer(mac_ms))


def test_timing_sessions_spin_within_a_run_and_stop_when_it_returns():
    # a pool that sleeps between nodes pays a wake-up per node (factorised layers have more,
    # smaller nodes); one that spins on after a run steals the cores of the next model timed
    opts = latency.session_for(mlp(), threads=2).get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have"):  # never set: the default, spinning, holds
        opts.get_session_config_entry("session.intra_op.allow_spinning")


def test_timings_of_another_timing_method_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TNONNX_CACHE_DIR", str(tmp_path))
    model, feeds = mlp(), {"x": np.zeros((4, 256), np.float32)}
    keys = {latency.TimingCache().key(model, feeds, 2, latency.timer_name(t))
            for t in (latency.OrtTimer(), latency.CallableTimer(mac_ms))}
    assert len(keys) == 2 and latency.timer_name(latency.OrtTimer()) != "OrtTimer"


def test_meet_speedup_re_aims_where_the_layers_timings_and_the_whole_model_disagree():
    from tnonnx.choose import meet_speedup

    # the original takes 20 ms, the target is 10 ms. The layers' timings predict each plan
    # saves its slack plus 10 ms; the whole model saves twice what they predict (the layers
    # were timed while the machine ran slower). The surplus given back in the usual steps
    # would all still be far too fast; the re-aimed slack gives back what the ratio says
    built = []

    def build(slack):
        built.append(slack)
        return slack

    def predict(plan):  # the plan's time as the layers' timings predict it
        return 20.0 - (10.0 + plan)

    def measure(plan):
        return 20.0 - 2 * (10.0 + plan)

    plan = meet_speedup(build, measure, 10.0, before_ms=20.0, predict=predict)
    # predicted saving 10, measured 20: aim at 2% inside the target, (20 - 9.8) / 2 = 5.1 ms
    # of predicted saving, a slack of -4.9
    assert plan == pytest.approx(-4.9) and measure(plan) == pytest.approx(9.8)
    assert built == [0.0, pytest.approx(-4.9)]
    # a miss: the measured saving is half the predicted one, so the next plan asks for twice
    built.clear()
    plan = meet_speedup(build, lambda p: 20.0 - 0.5 * (10.0 + p), 10.0, before_ms=20.0, predict=predict)
    assert built == [0.0, pytest.approx((20.0 - 9.8) * 2 - 10.0)] and plan == built[1]
    assert 20.0 - 0.5 * (10.0 + plan) == pytest.approx(9.8)
    # without predict, the usual steps: the full surplus (10 ms) is given back first
    built.clear()
    meet_speedup(build, measure, 10.0)
    assert built[:2] == [0.0, -10.0]


def test_a_failed_validation_under_the_floor_names_the_way_out():
    # a narrow layer whose factorisations are timed slower (each node costs more than its
    # multiply-adds save) between two wide ones: the wide ones carry the whole budget, at
    # ranks that cannot keep a random full-rank function, and the failure says what would
    # let the narrow layer share it
    rng = np.random.default_rng(0)
    widths = [256, 32, 32, 256]
    nodes, inits, x = [], [], "x"
    for i, (n, m) in enumerate(zip(widths, widths[1:])):
        inits.append(init(f"W{i}", (rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32)))
        y = "y" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [y], name=f"fc{i}"))
        x = y
    model = make_model(nodes, [value("x", ["batch", 256])], [value("y", ["batch", 256])], inits)

    def node_heavy_ms(m, feeds):
        return macs.count(m, {k: v.shape for k, v in feeds.items()}).total * 1e-6 + 0.05 * len(m.graph.node)

    timer = latency.CallableTimer(node_heavy_ms)
    _, report = tnonnx.rewrite(model, format="svd", budget=2, batch=64, timer=timer, min_cosine=0.999)
    assert report.validation.failures and "--allow-slower" in report.validation_hint
    assert report.to_dict()["validation_hint"] == report.validation_hint
    text = io.StringIO()
    report.render(Console(file=text, width=200))
    assert "never-slower rule left out" in text.getvalue()
    # nothing left out, or nothing failed: no hint
    _, report = tnonnx.rewrite(model, format="svd", budget=2, batch=64, timer=timer, min_cosine=0.999,
                               allow_slower=True)
    assert report.validation.failures and report.validation_hint is None
    _, report = tnonnx.rewrite(model, format="svd", budget=2, batch=64, timer=timer, min_cosine=0.0)
    assert not report.validation.failures and report.validation_hint is None
