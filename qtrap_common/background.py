"""A component that runs one background task while its server runs (the energy sampler, the token
counter poller, the simulator's engine and GPU counter), and the one way such a task is stopped.

Stopping never waits without a bound: :func:`stop_task` cancels the task, waits for it at most
``timeout_s`` and logs a task that did not end. A cancellation can be lost (on Python 3.11
``asyncio.wait_for`` returns the inner result and drops a cancellation that arrives as the inner
future completes; a loop that catches ``CancelledError`` does it on purpose), so the task is cancelled
again every ``RECANCEL_S`` while it runs: a lost cancellation costs one more round, not the shutdown.
Waiting is done with ``asyncio.wait``, which neither cancels the task on timeout nor swallows a
cancellation of the caller.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

log = logging.getLogger("qtrap.background")

STOP_TIMEOUT_S = 2.0  # default bound on stopping one background task
RECANCEL_S = 0.1  # while a cancelled task still runs, it is cancelled again this often


async def stop_task(task: asyncio.Task[Any], timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Cancel ``task`` and wait until it ends, at most ``timeout_s``; True if it ended.

    A task still running at the bound is left behind (logged): it does not hold the caller up.
    A task that ended with an exception other than the cancellation has it logged.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout_s)
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error(
                "background task %s did not stop within %.3g s of being cancelled; left behind",
                task.get_name(),
                timeout_s,
            )
            return False
        task.cancel()
        await asyncio.wait((task,), timeout=min(remaining, RECANCEL_S))
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s had failed: %r", task.get_name(), exc, exc_info=exc)
    return True


class Background(ABC):
    _task: asyncio.Task[None] | None = None
    task_name = "qtrap-background"

    @abstractmethod
    async def _run(self) -> None: ...

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop the task (:func:`stop_task`); True if it ended within ``timeout_s``."""
        task, self._task = self._task, None
        if task is None:
            return True
        return await stop_task(task, timeout_s)
