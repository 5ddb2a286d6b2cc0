"""Run independent work units here or on Ray; the driver stays the only writer of results.

A work unit is a LOSO fold, a chunk of (variant, seed) models of a sweep, or a chunk of clips for feature
extraction. Executors only compute and return; the driver skips the units already on disk, writes each
finished unit atomically and moves its one progress bar, so an interrupted run resumes and nothing is
half-written, whichever executor ran it:

    with make_executor(executor, ray_address, cpus_per_task=2) as ex:
        todo = [unit for unit in units if not path_of(unit).exists()]
        for position, result in ex.map(train_unit, todo, shared={"tensor": tensor, "labels": labels}):
            torch_save_atomic(result, path_of(todo[position]))
            bar.update()

- `Executor.map(fn, items, shared)` runs `fn(item, **shared)` for every item and yields `(position, result)`
  as each finishes: in order locally, in any order on Ray. Items are small (fold names and row indices, a
  seed, a chunk of clip indices); `shared` holds the large objects (tensors, arrays, DataFrames, the
  config), sent once per map call to Ray's object store, never once per task: keep them out of `fn`'s
  closure and out of the items. Nothing draws a bar here.
- `Executor.actor_map(factory, method, items, shared, n_actors)` is for work with costly per-worker set-up,
  as feature extraction with its magnifier and trunk: each worker builds `obj = factory(**shared)` once, then
  returns `getattr(obj, method)(item)` per item. One actor per slot unless n_actors says otherwise.
- `Executor.parallelism` is how many units run at once; a driver that chunks its work (sweep models, clips)
  makes at least that many chunks. `Executor.threads` is the torch thread count of a Ray actor (None locally).

`fn` and `factory` are module-level functions or classes (Ray workers import them, so amanlib must be
installed there in the same version) or closures without large captured objects. A unit's result must not
depend on the executor: `fn` gets the same item and shared objects either way, so it derives everything else
from them (the driver computes per-unit seeds before mapping, as run_loso does) and must not modify `shared`
(locally every call sees the same objects, on Ray each task its own copy, read-only for NumPy arrays). The
executor is therefore no part of a run's identity. A Ray actor sets torch's intra-op thread count to
`cpus_per_task` (rounded, at least 1) so tasks sharing a machine do not oversubscribe its cores; the local
executor leaves the driver's setting alone. CPU kernels may sum in another order with another thread count,
so local and Ray results agree bit for bit when the driver runs on as many threads as a task. With
`gpus_per_task`, Ray gives each worker its share of the GPUs as CUDA_VISIBLE_DEVICES, so "cuda" is the
device to use there.

On Ray both maps run on actors fed by Ray's own `ray.util.ActorPool` (`map` as the actor's object `fn` bound to
`shared`): a unit goes to an idle actor and the rest wait in the driver, so nothing is ever queued on Ray to be
cancelled. Failures: an actor whose process dies (killed, out of memory, a lost node) is restarted by Ray up to
`max_retries` times, builds its object again and re-runs its unit. An ordinary exception in `fn`, `factory` or the
method is not retried: it reaches the driver at once as that exception type with its message; the map's actors
are then killed and the units still waiting are never sent.

Ray: `ray_address=None` uses $RAY_ADDRESS when set, else starts a Ray instance of its own on this machine
with all its cores; "auto" joins the cluster `ray start` runs here (or that this machine belongs to),
"ray://host:port" connects through Ray Client and "host:port" joins a head node directly; an address where
nothing answers fails within CONNECT_TIMEOUT_S. A cluster with token authentication also needs RAY_AUTH_MODE=token here. Worker output
stays in Ray's log folder (/tmp/ray/session_latest/logs). `close()`, or leaving the `with` block, disconnects
the driver, which stops a local instance the executor started and leaves anyone else's cluster running.
Install with `pip install -e '.[ray]'`.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0
RAY_INSTALL_HINT = "executor='ray' needs the ray package: pip install -e '.[ray]'"


def make_executor(executor: str = "local", ray_address: str | None = None, cpus_per_task: float = 1,
                  gpus_per_task: float = 0, max_retries: int = 3) -> Executor:
    """An executor by name, every argument checked before Ray is imported or started."""
    problems = setting_problems(executor, ray_address, cpus_per_task, gpus_per_task)
    if problems:
        raise ValueError("; ".join(f"{name}: {text}" for name, text in problems))
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if executor == "local":
        return LocalExecutor()
    address = ray_address if ray_address is not None else os.environ.get("RAY_ADDRESS") or None
    endpoint = _parse_address(address)
    return RayExecutor(address, endpoint, cpus_per_task, gpus_per_task, max_retries)


def setting_problems(executor: str = "local", ray_address: str | None = None, cpus_per_task: float = 1,
                     gpus_per_task: float = 0) -> list[tuple[str, str]]:
    """The rules of the executor settings, here once for make_executor and the notebook parameters check:
    (setting, what is wrong) for each one broken. A per-task resource is a number >= 0 (> 0 for CPUs), whole
    when above 1, as Ray accepts it."""
    problems = []
    if executor not in EXECUTORS:
        problems.append(("executor", f"must be one of {EXECUTORS}, got {executor!r}"))
    for name, value, positive in (("cpus_per_task", cpus_per_task, True), ("gpus_per_task", gpus_per_task, False)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append((name, f"must be a number, got {value!r}"))
        elif value < 0 or (positive and value == 0):
            problems.append((name, f"must be {'> 0' if positive else '>= 0'}, got {value!r}"))
        elif value > 1 and value != int(value):
            problems.append((name, f"must be a whole number when above 1 (fractions only below 1), got {value!r}"))
    if executor == "local" and ray_address is not None:
        problems.append(("ray_address", f"{ray_address!r} is only used with executor 'ray'"))
    return problems


@contextmanager
def as_executor(executor: str | Executor = "local") -> Iterator[Executor]:
    """An Executor for a run: the one given (its owner closes it), or one made from a name and closed after."""
    if isinstance(executor, Executor):
        yield executor
        return
    with make_executor(executor) as ex:
        yield ex


def _parse_address(address: str | None) -> tuple[str, int] | None:
    """The (host, port) to check before connecting to ray_address; None for a local instance or 'auto'."""
    if address is None or address == "auto":
        return None
    if not isinstance(address, str):
        raise TypeError(f"ray_address must be None, 'auto', 'ray://host:port' or 'host:port', got {address!r}")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"ray_address {address!r} is not None, 'auto', 'ray://host:port' or 'host:port'")
    return host.strip("[]"), int(port)


def _torch_threads(cpus_per_task: float) -> int:
    """The torch intra-op thread count for a task holding cpus_per_task cores."""
    return max(1, round(cpus_per_task))


def _check_map_args(fn: Callable, items: Iterable, shared: dict | None, fn_name: str = "fn") -> tuple[list, dict]:
    """Items as a list and shared as a dict, after checking what map and actor_map receive."""
    if not callable(fn):
        raise TypeError(f"{fn_name} must be callable, got {fn!r}")
    if shared is not None and (not isinstance(shared, dict) or not all(isinstance(k, str) for k in shared)):
        raise TypeError(f"shared must be a dict with str keys (passed as keyword arguments), got {type(shared)}")
    return list(items), dict(shared or {})


def _check_actor_args(method: str, n_actors: int | None) -> None:
    """Method name and actor count of actor_map."""
    if not isinstance(method, str) or not method:
        raise TypeError(f"method must be the name of a method of the factory's object, got {method!r}")
    if n_actors is not None and (isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1):
        raise ValueError(f"n_actors must be None or an integer >= 1, got {n_actors!r}")


class Executor:
    """Runs independent work units and yields (position in items, result) as each finishes."""

    name = "executor"
    parallelism = 1
    threads: int | None = None

    def map(self, fn: Callable, items: Iterable, shared: dict | None = None) -> Iterator[tuple[int, Any]]:
        """`fn(item, **shared)` for every item; (position, result) pairs as they finish."""
        items, shared = _check_map_args(fn, items, shared)
        return self._map(fn, items, shared)

    def actor_map(self, factory: Callable, method: str, items: Iterable, shared: dict | None = None,
                  n_actors: int | None = None) -> Iterator[tuple[int, Any]]:
        """`getattr(factory(**shared), method)(item)` for every item, one factory call per worker."""
        items, shared = _check_map_args(factory, items, shared, "factory")
        _check_actor_args(method, n_actors)
        return self._actor_map(factory, method, items, shared, n_actors)

    def _map(self, fn, items, shared):
        raise NotImplementedError

    def _actor_map(self, factory, method, items, shared, n_actors):
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """Everything in the driver process, items in order."""

    name = "local"

    def _map(self, fn, items, shared):
        for position, item in enumerate(items):
            yield position, fn(item, **shared)

    def _actor_map(self, factory, method, items, shared, n_actors):
        if not items:
            return
        run = getattr(factory(**shared), method)
        for position, item in enumerate(items):
            yield position, run(item)


def _import_ray():
    """The ray module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(RAY_INSTALL_HINT) from e
    return ray


def _check_reachable(address: str, endpoint: tuple[str, int]) -> None:
    """Fail within CONNECT_TIMEOUT_S when nothing listens at the address (Ray itself retries for minutes)."""
    try:
        socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"ray_address {address!r}: nothing answers at {endpoint[0]}:{endpoint[1]} ({e})") from e


def _auto_endpoint(address: str) -> tuple[str, int] | None:
    """Where 'auto' leads by Ray's own discovery (the cluster `ray start` recorded here, which may be a stale
    record of a dead one), to check before connecting; None when Ray's helper is not there to ask."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        found = canonicalize_bootstrap_address(address)
    except ConnectionError as e:
        raise ConnectionError(f"ray_address {address!r}: {e}") from e
    host, sep, port = (found or "").rpartition(":")
    return (host.strip("[]"), int(port)) if sep and port.isdigit() else None


def _connect(ray, address: str | None, endpoint: tuple[str, int] | None) -> bool:
    """Connect to Ray unless this process already is (then its connection is used, whatever the address);
    True when this call connected, so close disconnects. Without an address a new local instance starts:
    ray.init() would join whatever cluster Ray last recorded on this machine, and hang when that one is dead."""
    if address == "auto":
        endpoint = _auto_endpoint(address)
    if endpoint is not None:
        _check_reachable(address, endpoint)
    if ray.is_initialized():
        return False
    client = address is not None and address.startswith("ray://")
    options = {} if client else {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address or "local", **options)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        if address is None:  # seen on a loaded machine: "The current node timed out during startup"
            raise ConnectionError(f"a local Ray instance could not start ({_root_cause(e)}); run with executor "
                                  "'local' (-p executor local) instead") from e
        raise ConnectionError(f"cannot connect to Ray at ray_address {address!r}: {_root_cause(e)}") from e
    return True


def _root_cause(error: BaseException) -> str:
    """The error and, when different, the innermost error it wraps (Ray's real reason, e.g. authentication)."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    return str(error) if root is error else f"{error} ({type(root).__name__}: {root})"


def _slots(total: dict, cpus_per_task: float, gpus_per_task: float) -> int:
    """How many tasks of the given size fit in the cluster's total resources (0 when none fits)."""
    counts = [int(total.get("CPU", 0) // cpus_per_task)]
    if gpus_per_task:
        counts.append(int(total.get("GPU", 0) // gpus_per_task))
    return min(counts)


class _Call:
    """map's unit as an actor's object: fn(item, **kwargs)."""

    def __init__(self, fn: Callable, kwargs: dict):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, item):
        return self.fn(item, **self.kwargs)


class _Worker:
    """One Ray actor: builds the factory's object on its first item, then runs its method per item. The payload
    reference comes with every item (boxed, so Ray does not resolve it): a restarted actor rebuilds from it, and
    a factory's error reaches the driver as that error, not as a dead actor."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.obj = None

    def run(self, boxed_payload: list, method: str, position: int, item) -> tuple[int, Any]:
        """(position, the object's method on the item), building the object first if needed."""
        if self.obj is None:
            import ray

            factory, shared = ray.get(boxed_payload[0])
            self.obj = factory(**shared)
        return position, getattr(self.obj, method)(item)


class RayExecutor(Executor):
    """Actors on a Ray instance or cluster, fed by Ray's ActorPool; use make_executor to build one."""

    name = "ray"

    def __init__(self, address: str | None, endpoint: tuple[str, int] | None, cpus_per_task: float,
                 gpus_per_task: float, max_retries: int):
        self._ray = ray = _import_ray()
        self.address, self.cpus_per_task, self.gpus_per_task = address, cpus_per_task, gpus_per_task
        self.max_retries, self.threads = max_retries, _torch_threads(cpus_per_task)
        self._owns = _connect(ray, address, endpoint)
        try:
            self.parallelism = self._fitting_slots()
        except BaseException:
            self.close()
            raise
        self._actor = ray.remote(_Worker).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task,
                                                  max_restarts=max_retries, max_task_retries=max_retries)

    def _fitting_slots(self) -> int:
        """Parallel tasks the cluster holds; an error when none fits on the local instance (it would wait forever)."""
        total = self._ray.cluster_resources()
        slots = _slots(total, self.cpus_per_task, self.gpus_per_task)
        if slots == 0 and self.address is None:
            raise ValueError(f"cpus_per_task={self.cpus_per_task}, gpus_per_task={self.gpus_per_task}: no task fits "
                             f"in this machine's Ray resources (CPU {total.get('CPU', 0)}, GPU {total.get('GPU', 0)})")
        return max(1, slots)

    def _map(self, fn, items, shared):
        return self._actor_map(_Call, "__call__", items, {"fn": fn, "kwargs": shared}, None)

    def _actor_map(self, factory, method, items, shared, n_actors):
        """Items go to the pool's idle actors, the rest wait in the driver (ActorPool), so an error leaves nothing
        queued on Ray to cancel; the actors are killed when the map ends, finished or not."""
        if not items:
            return
        ray = self._ray
        from ray.util import ActorPool

        payload = [ray.put((factory, shared))]
        actors = [self._actor.remote(self.threads) for _ in range(min(n_actors or self.parallelism, len(items)))]
        pool = ActorPool(actors)
        try:
            for position, item in enumerate(items):
                pool.submit(lambda actor, unit: actor.run.remote(payload, method, *unit), (position, item))
            while pool.has_next():
                yield pool.get_next_unordered()
        finally:
            for actor in actors:
                ray.kill(actor)

    def close(self) -> None:
        """Disconnect from Ray if this executor connected (stopping a local instance it started)."""
        if self._owns:
            self._owns = False
            self._ray.shutdown()
