"""kuaida.engine.threads: a thread's idle OpenMP pool is released, the others' stay."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kuaida.engine import threads


def _pool_threads() -> int:
    """Threads of this process (OpenMP workers included)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def _settles_below(limit: int, timeout_s: float = 5.0) -> int:
    """The thread count once it drops below `limit`, or after `timeout_s`. libgomp's pause returns once its
    workers have left the pool's barrier; each then calls pthread_exit on its own schedule, so the count
    drops a moment later (on a loaded CI machine, later still)."""
    deadline = time.monotonic() + timeout_s
    while (n := _pool_threads()) >= limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


@pytest.mark.skipif(threads._libgomp() is None, reason="no libgomp loaded (torch built with another runtime)")
def test_release_idle_teams_lets_this_threads_workers_exit():
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP workers to release")
    a, w = torch.randn(64, 512), torch.randn(2048, 512)
    done, go = threading.Event(), threading.Event()

    def work_and_wait():  # builds a pool and keeps it (the thread stays alive)
        a @ w.T
        done.set()
        go.wait(timeout=60)

    # daemon, and released in `finally`: a failed assertion must not leave a thread that keeps the
    # interpreter (and CI) from exiting.
    other = threading.Thread(target=work_and_wait, daemon=True)
    other.start()
    try:
        assert done.wait(timeout=60)
        a @ w.T  # this thread's pool too
        before = _pool_threads()
        assert threads.release_idle_teams()
        after = _settles_below(before)
        assert after < before  # this thread's workers exited ...
        a @ w.T  # ... and come back on its next parallel region
        assert _pool_threads() > after
    finally:
        go.set()
        other.join(timeout=60)


def test_side_work_releases_even_when_the_work_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "release_idle_teams", lambda: calls.append(1) or True)
    with pytest.raises(ValueError), threads.side_work():
        raise ValueError("bad query")
    assert calls == [1]
