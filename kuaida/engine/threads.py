"""Keep OpenMP teams to one per busy thread: the server's scheduler thread computes at full speed only
when no other thread holds an idle team.

Why: torch's CPU ops run on OpenMP (the libgomp torch ships). Every OS thread that opens a parallel
region gets a team (a pool of worker threads) of its own, and the pool outlives the region, for the
thread's life. Once a process holds more OpenMP threads than CPUs, libgomp stops spinning at the end
of a parallel region and sleeps on a futex instead, at every one of the hundreds of regions of a
forward pass. Measured on this 2-core machine, once the main thread had loaded the model (its pool
idle but alive), the scheduler thread ran a 19-token prefill of the default model in 37 ms against
20 ms in the main thread, one [19 x 576] @ [576 x 1536] matmul in 370 us against 285 us, and decoded
63 tok/s against 77.

libgomp's omp_pause_resource_all releases the *calling* thread's pool (measured: the other threads'
pools stay; the next parallel region of this thread builds a new one). So every thread that does torch
work beside the scheduler releases its pool when done: the thread that starts the scheduler (it loaded
the model and allocated the KV cache; Scheduler.start), and a knowledge-base query's embedding in its
worker thread (`side_work`). Measured: releasing the pool just before starting the scheduler took its
19-token prefill from 41.5 ms to 23.5 ms (releasing it before allocating the cache did not: the
allocation's parallel fill built the pool again).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: release threads, keep the runtime


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's libgomp), or None (another runtime, or none)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing initialized again
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_idle_teams() -> bool:
    """Let this thread's idle OpenMP workers exit (omp_pause_resource_all(omp_pause_soft)); its next
    parallel region builds its team again (~0.1 ms). Call it outside any parallel region, i.e. not from
    inside a torch op. -> False when the runtime cannot (no libgomp found)."""
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


@contextlib.contextmanager
def side_work() -> Iterator[None]:
    """Torch work in a thread other than the scheduler's: this thread's OpenMP pool is released after."""
    try:
        yield
    finally:
        release_idle_teams()
