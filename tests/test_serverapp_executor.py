"""The coordinator's SuperExec polls for new runs less often while a run's ServerApp is going on."""

from __future__ import annotations

import subprocess
import sys

from flowerbed.server import serverapp_executor
from flowerbed.server.serverapp_executor import BUSY_POLL_INTERVAL, ServerAppExecutor


def test_poll_wait_is_longer_while_a_serverapp_runs(monkeypatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(serverapp_executor.time, "sleep", slept.append)
    executor = ServerAppExecutor()
    executor.wait(0.25)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        executor._children[child.pid] = child
        executor.wait(0.25)
        executor.wait(5.0)  # a longer interval the operator set is kept
    finally:
        child.kill()
        child.wait(timeout=10)
    assert slept[:3] == [0.25, BUSY_POLL_INTERVAL, 5.0]
    slept.clear()
    executor.wait(0.25)  # the finished run is forgotten: quick polls again
    assert slept == [0.25]
    assert not executor._children
