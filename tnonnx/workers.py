"""Independent layer fits in worker processes (`--workers N`; `workers=` in the API).

The fits of different layers share nothing: each needs its layer's weight and calibration
statistics (fit.LayerData, or an embedding's index counts), not the model. The parent sends
those (a copy of the Layer without the node and graph it sits in) and a worker runs the
code the serial run runs (the planner's candidate_options, Fitter.fit); the factorisations
come back into the parent's Fitter cache under the keys the serial run uses, so what
follows (timing, emission, the report) runs unchanged and finds the fits done. Fits are
seeded and run on one BLAS thread in the serial run and in every worker, so the cores
are the same whatever the number of workers.

Workers start from a forkserver (spawn where there is none), never as forks of the
parent: a fork of a process holding onnxruntime's or torch's thread pools can hang. Each
runs BLAS, OpenMP and torch on one thread, so N workers keep N cores busy and no more.
A pool is started only when there are at least two fits to share out and, unless the
number of workers was given, only when they are large enough to pay for starting it.
"""

from __future__ import annotations

import concurrent.futures as futures
import copy
import multiprocessing
import os
import pickle
import threading
import time

import numpy as np

from .errors import NotApplicable, TnonnxError

# weights (in parameters, summed over the fits to share out) below which the default
# (cores available) fits in the parent: starting workers and sending them the layers
# takes about a second, as long as fitting this much serially
MIN_PARAMS = 1 << 20
# what a fit that trains cores imports: torch's optimizers import torch._dynamo (seconds)
TORCH_MODULES = ("torch", "torch._dynamo", "torch.optim", "tnonnx.nn")
# svd-only candidates go to the workers above this much SVD work (about 4 n m min(n, m) per
# layer; 5e10 is 5-10 s of one core, what starting the workers and sending the data costs)
SVD_POOL_FLOPS = 5e10
IN_FLIGHT = 2  # items per worker sent ahead: a weight read from a data file stays one of a few
# conv factorisations build their stages with closures, which pickle cannot send back:
# conv layers are fitted in the parent
KINDS = ("dense", "embedding", "tied", "recurrent")


class WorkerFailed(TnonnxError):
    """A fit failed or died in a worker process: one line, the internal-error exit code."""

    exit_code = 3


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


class Workers:
    """A pool of fit worker processes, started on first use and shut down on close()."""

    def __init__(self, workers: int | None = None, torch: bool = False):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise TnonnxError(f"--workers {workers}: must be an integer >= 1")
        self.count = available_cores() if workers is None else workers
        self.given = workers is not None
        self.torch = torch  # the fits train cores: workers start with torch imported (seconds each)
        self.pool: futures.ProcessPoolExecutor | None = None
        self.done = {"candidates": 0, "fits": 0}  # jobs run in workers: layers' candidate sets, final fits

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def worth(self, params: list[int]) -> bool:
        """Whether fits of these sizes (parameters each) are shared out."""
        return self.count > 1 and len(params) > 1 and (self.given or sum(params) >= MIN_PARAMS)

    def note(self) -> str | None:
        if not any(self.done.values()):
            return None
        parts = ([f"{self.done['candidates']} layer(s)' candidates"] if self.done["candidates"] else []) + \
            ([f"{self.done['fits']} final fit(s)"] if self.done["fits"] else [])
        return f"workers: {' and '.join(parts)} fitted in {self.count} worker processes (--workers)"

    def map(self, work, items, payload, done, what) -> None:
        """work(payload(item)) in the workers for each item, then done(item, result) here,
        in the order results arrive; payloads are made as items are sent (IN_FLIGHT per
        worker). A failure is WorkerFailed naming what(item)."""
        pool, items, pending = self._start(), iter(items), {}

        def send() -> None:
            for item in items:
                try:
                    pending[pool.submit(work, payload(item))] = item
                except futures.process.BrokenProcessPool as exc:
                    # a worker died before this was sent: named like a broken future's job
                    # (one of those in flight; the pool does not say which)
                    raise WorkerFailed(_died(what(next(iter(pending.values()), item)))) from exc
                return

        try:
            for _ in range(IN_FLIGHT * self.count):
                send()
            while pending:
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    item = pending.pop(future)
                    done(item, _result(future, what(item)))
                    send()
        except BaseException:
            self.close()
            raise

    def _start(self) -> futures.ProcessPoolExecutor:
        if self.pool is None:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            if method == "forkserver":  # workers fork from a server that has imported the fitting code
                context.set_forkserver_preload(["tnonnx.workers", "tnonnx.choose"] + list(TORCH_MODULES) * self.torch)
            self.pool = futures.ProcessPoolExecutor(self.count, mp_context=context, initializer=_worker_start,
                                                    initargs=(os.getpid(),))
        return self.pool


def _died(what: str) -> str:
    # a worker re-imports the calling script: one without a main guard runs its rewrite again
    # in every worker, which cannot start processes of its own while it starts, and dies
    return (f"a worker process died while fitting {what} (out of memory? or, from a Python script, the script "
            "lacks an `if __name__ == \"__main__\":` guard, which worker processes need); --workers 1 fits in "
            "this process")


def _result(future, what: str):
    try:
        return future.result()
    except futures.process.BrokenProcessPool as exc:
        raise WorkerFailed(_died(what)) from exc
    except TnonnxError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise WorkerFailed(f"fitting {what} failed in a worker process: {type(exc).__name__}: {first} "
                           "(--debug shows the traceback; --workers 1 fits in this process)") from exc


def _worker_start(parent: int) -> None:
    """Worker start: one thread (_one_thread), and a watch on the parent process: a worker
    whose parent was killed (a SIGKILL, a closed terminal) stops within a second instead of
    finishing its fit, which can take minutes (its forkserver parent outlives the pool's)."""
    _one_thread()
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="tnonnx-parent-watch").start()


PARENT_POLL_S = 1.0


def _watch(parent: int, interval: float = PARENT_POLL_S, sleep=time.sleep, leave=os._exit) -> None:
    """Return (through `leave`, os._exit in a worker) once process `parent` is gone."""
    while _alive(parent):
        sleep(interval)
    leave(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its pid reused by another user's process
        return False
    return True


def _one_thread() -> None:
    """Worker start: BLAS and OpenMP on one thread (those loaded already, and through the
    environment those loaded later, torch's)."""
    from threadpoolctl import threadpool_limits

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    threadpool_limits(1)


def portable(layer):
    """A copy of `layer` to send to a worker: its weight read, without its node and graph."""
    out = copy.copy(layer)
    out.__dict__.update(node=None, graph=None, lazy=None, _weight=layer.weight)
    return out


def _job(fitter, layer) -> tuple:
    """What a worker needs to fit `layer` as `fitter` would; the layer lets go of a weight
    read from a data file (it is read again if the parent needs it)."""
    job = (portable(layer), fitter.data.get(layer.name), fitter.options, fitter.settings())
    layer.release()
    return job


def _fitter(layer, data, options, settings: dict):
    from .plan import Fitter

    return Fitter(options, {layer.name: data} if data is not None else {}, **settings)


# ------------------------------------------------------------------ the final fits


def prefit(fitter, plans, workers: Workers | None, advance=None) -> set:
    """The plans' fits (Fitter.fit, final) not yet in `fitter.cache`, run in the workers
    when worth it and put into the cache; returns the keys fitted there. `advance(share)`
    is called with 0.5 per plan as its fit arrives."""
    if workers is None:
        return set()
    todo: dict = {}
    for plan in plans:
        key = fitter.key(plan.layer, plan.format, plan.spec, plan.modes, plan.order)
        if key not in fitter.cache and plan.layer.kind in KINDS:
            todo.setdefault(key, []).append(plan)
    if not workers.worth([group[0].layer.params for group in todo.values()]):
        return set()
    firsts = [group[0] for group in todo.values()]
    if _svd_stays_here(firsts, [p.format for p in firsts], workers):
        return set()

    def payload(key):
        plan = todo[key][0]
        return _job(fitter, plan.layer) + (plan.format, plan.spec, plan.modes, plan.order)

    fitted = set()

    def done(key, sent) -> None:
        fact = _received(sent)
        if fact is None:  # the parent fits it when it gets there
            return
        fitter.cache[key] = fact
        fitted.add(key)
        workers.done["fits"] += 1
        if advance is not None:
            advance(0.5 * len(todo[key]))

    workers.map(_fit, list(todo), payload, done, lambda key: f"{todo[key][0].layer.name} in {key[1]}")
    return fitted


def _fit(job):
    layer, data, options, settings, fmt, spec, modes, order = job
    try:
        return _sendable(_fitter(layer, data, options, settings).fit(layer, fmt, spec, modes, order))
    except NotApplicable as exc:
        return _sendable(exc)


def _sendable(value) -> bytes | None:
    """`value` pickled, or None where it cannot be (a factorisation holding a closure)."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        return None


def _received(sent: bytes | None):
    return None if sent is None else pickle.loads(sent)


# ------------------------------------------------------------------ the planner's candidates


def candidates(fitter, plans, trials, workers: Workers | None, counts: dict, advance=None, prune=None,
               emit: str = "auto") -> dict:
    """choose.candidate_options(plan, fitter, trials(plan), counts[key], prune, emit) for each plan (one per
    weight) of a kind in KINDS, run in the workers when worth it: {plan.layer.weight_key:
    options} (the caller runs the others). The fits come into `fitter.cache`: every
    trial a worker fitted, and the options on each layer's (parameters, error) front,
    which the planner times first (svd's, read off the spectrum, are fitted for that);
    each plan's tally into `counts[plan.layer.weight_key]`. `advance(share)` is called with
    0.5 per plan as its options arrive."""
    plans = [p for p in plans if p.layer.kind in KINDS]
    found: dict = {}
    if workers is None or not workers.worth([p.layer.params for p in plans]):
        return found
    if _svd_stays_here(plans, [fmt for p in plans for fmt, _ in trials(p)], workers):
        return found

    def payload(plan):
        return _job(fitter, plan.layer) + (trials(plan), plan.modes, plan.order,
                                           prune if prune is not None and prune.covers(plan.layer) else None, emit)

    def done(plan, result) -> None:
        options, their_counts, fits = result
        found[plan.layer.weight_key] = options
        counts[plan.layer.weight_key] = their_counts
        for fmt, spec, sent in fits:
            fact = _received(sent)
            if fact is not None:
                fitter.cache[fitter.key(plan.layer, fmt, spec, plan.modes, plan.order, final=False)] = fact
        workers.done["candidates"] += 1
        if advance is not None:
            advance(0.5)

    workers.map(_candidates, plans, payload, done, lambda plan: f"{plan.layer.name}'s candidates")
    return found


def _svd_stays_here(plans, formats, workers: Workers) -> bool:
    """Whether fits in `formats` of these plans are cheaper in this process: svd's come off one
    SVD per layer (candidates and final fits alike), less work than starting the workers and
    sending them the data, unless the user asked for workers."""
    return all(f == "svd" for f in formats) and not workers.given and _svd_flops(plans) < SVD_POOL_FLOPS


def _svd_flops(plans) -> float:
    """About the floating-point work of one thin SVD per plan's weight matrix."""
    total = 0.0
    for p in plans:
        shape = p.layer.weight_shape
        n, m = shape[0], int(np.prod(shape[1:]))
        total += 4.0 * n * m * min(n, m)
    return total


def _candidates(job):
    from .choose import candidate_options, pareto
    from .plan import LayerPlan

    layer, data, options, settings, trials, modes, order, prune, emit = job
    fitter = _fitter(layer, data, options, settings)
    counts: dict = {}
    found = candidate_options(LayerPlan(layer, trials[0][0], trials[0][1], modes, order), fitter, trials, counts,
                              prune, emit)
    for option in pareto(found, by_time=False):
        fitter.fit(layer, option.format, option.spec, modes, order, final=False, measure=False)
    fits = [(key[1], key[2], _sendable(fact)) for key, fact in fitter.cache.items() if not key[-1]]
    return found, counts, fits
