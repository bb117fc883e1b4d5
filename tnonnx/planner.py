"""The planner: format, rank and emission per layer group when tnonnx chooses (--format
auto, --budget, --speedup). Options come from choose.candidate_options (fitted in the
workers when worth it), are weighed by the layers' sensitivity (tnonnx/sensitivity.py),
timed and floored (choose.time_options, apply_floor), then allocated (choose.choose).
See tnonnx/choose.py for the rules, among them the embedding tables' exception to the
never-slower floor."""

from __future__ import annotations

import dataclasses

from . import estimate
from .choose import (Option, SpeedRules, Unreachable, _slower, apply_floor, candidate_options, choose, fastest,
                     ladder, pareto, time_options)
from .errors import TnonnxError
from .layer_timing import PRUNE_FACTOR
from .formats import RankSpec
from .plan import LayerPlan
from .workers import candidates


class Planner:
    """Chooses format, rank and emission per layer group (layers sharing a weight) when
    tnonnx chooses (--format auto, --budget, --speedup): options are fitted and timed once,
    then `plan(slack)` allocates them, `slack` ms tighter on each re-plan."""

    def __init__(self, plans, fitter, formats, budget, rules: SpeedRules, timer, sensitivity, before_ms,
                 align: int = 1):
        self.plans, self.fitter, self.formats, self.budget, self.align = plans, fitter, formats, budget, align
        self.rules, self.timer, self.sensitivity, self.before_ms = rules, timer, sensitivity, before_ms
        self.start = [(p.format, p.spec) for p in plans]
        self.groups: dict[str, list[LayerPlan]] = {}
        for p in plans:
            self.groups.setdefault(p.layer.weight_key, []).append(p)
        self.options: dict | None = None
        self.floored: dict[str, int] = {}
        self.notes: list[str] = []
        self.counts: dict[str, int] = {}  # candidate_options' tally
        self.timed = 0  # options timed by _timed_front
        self.paying: set[str] = set()  # table groups kept with options slower than dense (module docstring)
        self.predicted_ms: float | None = None  # the last plan's model time as the layers' timings predict it

    @property
    def choosing(self) -> bool:
        return self.budget is not None or self.formats != (self.start[0][0],) or self.rules.speedup is not None

    def prepare(self, workers=None, advance=None) -> None:
        """Every group's options, once: candidates fitted (in `workers`, a workers.Workers,
        when given and worth it), weighed by sensitivity and timed. `advance(share)` is
        called with shares of one per group as the work gets done."""
        if self.options is not None or not self.choosing:
            return
        advance = advance or (lambda share: None)
        firsts = [group[0] for group in self.groups.values()]
        prune = self._pruner(firsts)
        tallies: dict[str, dict] = {}  # per group: candidate_options' counts
        found = candidates(self.fitter, firsts, self._trials, workers, tallies, advance, prune, self.rules.emit)
        self.options = {}
        for key, group in self.groups.items():
            options = found.get(key)
            if options is None:
                options = candidate_options(group[0], self.fitter, self._trials(group[0]),
                                            tallies.setdefault(key, {}), prune, self.rules.emit)
            self.options[key] = self._options(group, options)
            advance(0.5 if key in found else 1.0)
        timed, predicted = sum(self.floored.values()), 0
        for key, tally in tallies.items():
            for name, n in tally.items():
                self.counts[name] = self.counts.get(name, 0) + n
            predicted += tally.get("predicted slower", 0)
            self.floored[key] = self.floored.get(key, 0) + tally.get("predicted slower", 0)
        self.notes.append(self._effort())
        if timed or predicted:
            what = [f"{timed} candidate(s) timed slower than their dense layer"] if timed else []
            what += [f"{predicted} predicted more than {PRUNE_FACTOR:g}x slower by the cost model (neither "
                     "measured nor their format's larger ranks fitted)"] if predicted else []
            self.notes.append(f"never slower than dense: {' and '.join(what)} at the deployment shape were not "
                              "considered (--allow-slower)")

    def plan(self, slack: float = 0.0) -> list[LayerPlan]:
        for p, (fmt, spec) in zip(self.plans, self.start):
            p.layer.reason, p.format, p.spec, p.emission = None, fmt, spec, None
        if not self.choosing:
            return list(self.plans)
        self.prepare()
        max_params = self._selected() / self.budget if self.budget is not None else None
        max_ms = self._max_ms(slack) if self.rules.speedup else None
        together = self._dense_ms() if self.paying else None
        if together is not None:
            max_ms = together if max_ms is None else min(max_ms, together)
        options = self.options
        if max_params is None and max_ms is None:  # auto alone: the best candidate, never dense by choice
            options = {k: [o for o in opts if not o.dense] or opts for k, opts in options.items()}
            tol = self.plans[0].spec.tol
            if tol is not None:
                choice = {k: min(opts, key=lambda o: (o.dense, o.error > tol**2, o.params))
                          for k, opts in options.items()}
            else:
                choice = choose(options)
        else:
            try:
                choice = self._choose(options, max_params, max_ms)
            except Unreachable as exc:
                if "--budget" in str(exc):
                    what = ""
                elif self.rules.speedup:
                    what = f"--speedup {self.rules.speedup:g}: unreachable; "
                else:  # the time limit is the tables' (module docstring)
                    what = ("--budget: unreachable with the rewritten layers together no slower than dense "
                            "(embedding tables are paid for by the others); ")
                dropped = sum(self.floored.values())
                floor = (f" with no layer slower than its dense layer at the deployment shape ({dropped} "
                         "candidate(s) timed slower were left out; --allow-slower lifts this rule)") if dropped else ""
                raise TnonnxError(what + str(exc) + floor) from None
        if together is not None and any(not choice[k].dense for k in self.paying):
            self.notes.append(self._paid_note(choice, together))
        self.predicted_ms = self._predicted_ms(choice) if self.rules.speedup else None
        for key, group in self.groups.items():
            o = choice[key]
            for p in group:
                if o.dense:
                    p.layer.reason = self._dense_reason(key)
                else:
                    p.format, p.spec, p.emission = o.format, o.spec, o.emission
        return [p for p in self.plans if p.layer.reason is None]

    def _choose(self, options, max_params, max_ms):
        """choose(); a time limit the per-layer timings call unreachable gets the fastest plan
        instead, so that the whole model is measured and the verdict is the measured one
        (layers timed alone and the model timed at another moment disagree by a few percent)."""
        try:
            return choose(options, max_params, max_ms)
        except Unreachable:
            if max_ms is None or not self.rules.speedup:
                raise
            return fastest(options, max_params)

    def _pruner(self, firsts: list[LayerPlan]):
        """Under the never-slower floor, what leaves out candidates predicted far slower than
        dense before their errors are measured (layer_timing.Pruner); embedding tables are
        exempt under --budget, where the layers together pay for them (module docstring of
        choose.py). Groups of several layers are timed summed over them: not pruned."""
        if not self.rules.floor or not hasattr(self.timer, "pruner"):
            return None
        single = [p.layer for p in firsts if len(self.groups[p.layer.weight_key]) == 1]
        return self.timer.pruner(single, exempt=("embedding", "tied") if self.budget is not None else ())

    def _selected(self) -> int:
        return sum(group[0].layer.params for group in self.groups.values())

    def _trials(self, first: LayerPlan) -> list[tuple[str, RankSpec]]:
        if self.budget is not None:
            return ladder(self.formats, simd=self.rules.speedup is not None, align=self.align)
        return [(f, first.spec) for f in self.formats]

    def _options(self, group: list[LayerPlan], options: list[Option]) -> list[Option]:
        """The group's candidate `options`, weighed by sensitivity, timed and floored."""
        first = group[0]
        if self.sensitivity is not None and options:  # measured at the front's candidate nearest the share
            share = 1.0 / self.budget
            probe = min(pareto(options, by_time=False), key=lambda o: abs(o.params - share * first.layer.params))
            weight = self.sensitivity(first, probe.format, probe.spec)
            options = [dataclasses.replace(o, error=o.error * weight) for o in options]
        if self.budget is not None and self.rules.speedup is None:
            return self._timed_front(group, options)
        options = time_options(group, options, self.fitter, self.timer, self.rules.emit)
        if self.rules.floor:  # before the front: a faster option a slower one dominates stays in
            options, dropped = self._floor(first, options)
            self.floored[first.layer.weight_key] = dropped
        if self.budget is not None:
            options = pareto(options, by_time=self.rules.speedup is not None)
        return options

    def _floor(self, first: LayerPlan, options: list[Option]) -> tuple[list[Option], int]:
        """apply_floor, but a table's timed options are kept under --budget (module docstring)."""
        dense = options[0]
        if self.budget is None or first.layer.kind not in ("embedding", "tied") or dense.ms is None:
            return apply_floor(options)
        kept = [o for o in options if o.dense or o.ms is not None or not _slower(o, dense)]
        if any(_slower(o, dense) for o in kept):
            self.paying.add(first.layer.weight_key)
        return kept, len(options) - len(kept)

    def _dense_ms(self) -> float:
        return sum(opts[0].ms or 0.0 for opts in self.options.values())

    def _paid_note(self, choice: dict, together: float) -> str:
        tables = sum(1 for k in self.paying if not choice[k].dense)
        after = sum(o.ms or 0.0 for o in choice.values())
        return (f"never slower than dense: {tables} embedding table(s) factorised although slower than one Gather, "
                f"paid for by the other layers: the rewritten layers take {after:.3f} ms together against "
                f"{together:.3f} ms dense, each alone at the deployment shape")

    def _effort(self) -> str:
        c = self.counts
        slow = [f for f in self.formats if estimate.slow(f)]
        timed = f", {self.timed} timed (those that could be on the budget's front)" if self.timed else ""
        skipped = (f", {c.get('skipped', 0)} {'/'.join(slow)} trial(s) not fitted where "
                   f"{'/'.join(estimate.slow(f) for f in slow)} at the same cap was far from the best"
                   if slow else "")
        return (f"planner: {c.get('estimated', 0)} svd candidate(s) read off the layers' spectra without fitting, "
                f"{c.get('fitted', 0)} fitted{skipped}{timed}")

    def _timed_front(self, group: list[LayerPlan], options: list[Option]) -> list[Option]:
        """pareto(apply_floor(time_options(...)), by_time=False), timing only the options that
        can be on that front: the front of the options not yet timed slower than dense is
        timed until all its members are timed and kept (an option off that front is dominated
        by one that is kept, so it is off the final front too)."""
        first, dense, kept, pending, dropped = group[0], None, [], list(options), 0
        while True:
            front = pareto(kept + pending, by_time=False)
            untimed = [o for o in front if any(o is p for p in pending)]
            if not untimed and dense is not None:
                break
            timed = time_options(group, untimed, self.fitter, self.timer, self.rules.emit)
            dense = dense or timed[0]
            pending = [o for o in pending if not any(o is u for u in untimed)]
            if self.rules.floor:
                timed, floored = self._floor(first, [dense] + timed[1:])
                dropped += floored
            kept += timed[1:]
            self.timed += len(timed) - 1
        self.floored[first.layer.weight_key] = dropped
        return pareto([dense] + kept, by_time=False)

    def _max_ms(self, slack: float) -> float:
        dense = [opts[0].ms for opts in self.options.values()]
        if any(ms is None for ms in dense) or self.before_ms is None:
            raise TnonnxError(f"--speedup {self.rules.speedup:g}: some selected layers could not be timed at the "
                              "deployment shape (inside a subgraph, or the model does not run on random inputs)")
        # the layers must save (1 - 1/X) of the model's time
        saving = (self.before_ms - self.before_ms / self.rules.speedup + slack) * self._scale()
        return sum(dense) - saving

    def _scale(self) -> float:
        """Layer ms per model ms of saving. Timed alone (layout reorders, cold inputs) the
        layers can sum to more than the whole model: then their savings count in that
        inflated measure."""
        return max(self._dense_ms() / self.before_ms, 1.0)

    def _predicted_ms(self, choice: dict) -> float | None:
        """The whole model's time under `choice` in the frame of before_ms: the time the
        layers save, in _max_ms's measure, taken off the original's."""
        if self.before_ms is None or any(o.ms is None for o in choice.values()):
            return None
        return self.before_ms - sum(self.options[k][0].ms - o.ms for k, o in choice.items()) / self._scale()

    def _dense_reason(self, key: str) -> str:
        only_dense = len(self.options[key]) == 1
        if only_dense and self.floored.get(key):
            return ("every candidate is slower than the dense layer at the deployment shape "
                    "(--allow-slower lifts this)")
        if only_dense:
            return "no candidate is smaller than the layer"
        if self.budget is not None and self.rules.speedup is None:
            return "kept dense by the --budget allocator"
        dense, *candidates = self.options[key]
        if self.rules.speedup and dense.ms is not None and all(o.ms is not None and o.ms >= dense.ms
                                                                for o in candidates):
            return "no candidate runs faster than the dense layer at the deployment shape"
        return "kept dense: the targets are met with the least error this way"
