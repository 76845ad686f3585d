"""kuaida.engine.threads: a thread's idle OpenMP pool is released, the others' stay."""
from __future__ import annotations

import threading

import pytest
import torch

from kuaida.engine import threads


def _pool_threads() -> int:
    """Threads of this process (OpenMP workers included)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


@pytest.mark.skipif(threads._libgomp() is None, reason="no libgomp loaded (torch built with another runtime)")
def test_release_idle_teams_lets_this_threads_workers_exit():
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no OpenMP workers to release")
    a, w = torch.randn(64, 512), torch.randn(2048, 512)
    done, go = threading.Event(), threading.Event()

    def work_and_wait():  # builds a pool and keeps it (the thread stays alive)
        a @ w.T
        done.set()
        go.wait()

    other = threading.Thread(target=work_and_wait)
    other.start()
    done.wait()
    a @ w.T  # this thread's pool too
    before = _pool_threads()
    assert threads.release_idle_teams()
    after = _pool_threads()
    assert after < before  # this thread's workers exited ...
    a @ w.T  # ... and come back on its next parallel region
    assert _pool_threads() > after
    go.set()
    other.join()


def test_side_work_releases_even_when_the_work_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "release_idle_teams", lambda: calls.append(1) or True)
    with pytest.raises(ValueError), threads.side_work():
        raise ValueError("bad query")
    assert calls == [1]
