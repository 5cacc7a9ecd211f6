"""Scale-out for the inline backend: several Ray actors, each answering a share of every push.

With ``backend.workers = N`` the inline grid's batch handler splits the messages of each push
(a round's train or evaluate messages) into ``N`` contiguous shares and sends each share to one
actor, which answers it with its own ``CohortHandler`` (vectorized where it can, the ClientApp
otherwise). An actor loads the federation's data once and keeps it. Each virtual node's
``Context`` travels with its message and its state comes back with the reply, so node state stays
with the grid. ``backend.ray_address`` joins an existing Ray cluster; otherwise a local Ray is
started with one CPU per worker (``backend.num_cpus``) and stopped at the end of the run.

The server side (round loop, aggregation) stays in the calling process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.app import Context, Message

from flowerbed.experiment import BackendConfig

Pair = tuple[Message, Context]


class _Worker:
    """One Ray actor: a ``CohortHandler`` over the real ClientApp, with one intra-op thread each."""

    def __init__(self, threads: int) -> None:
        import torch

        from flowerbed.client.app import app as client_app
        from flowerbed.simulations.engine.cohort_handler import CohortHandler

        torch.set_num_threads(max(1, threads))
        self.handler = CohortHandler(client_app)

    def answer(self, pairs: list[Pair]) -> list[tuple[Message, Any]]:
        replies = self.handler(pairs)
        return [(reply, context.state) for reply, (_, context) in zip(replies, pairs, strict=True)]


class WorkerPool:
    """A ``batch_handler`` that shares each push among Ray actors.

    Parameters
    ----------
    workers : int
        Number of actors.
    config : BackendConfig
        ``ray_address`` (join a cluster) and ``num_cpus`` (CPUs per actor).
    """

    def __init__(self, workers: int, config: BackendConfig) -> None:
        import ray

        self._started_ray = False
        if not ray.is_initialized():
            init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
            if config.ray_address:
                init["address"] = config.ray_address
            else:
                init["num_cpus"] = max(os.cpu_count() or 1, int(workers * config.num_cpus))
            ray.init(**init)
            self._started_ray = True
        remote = ray.remote(num_cpus=config.num_cpus)(_Worker)
        self.actors = [remote.remote(max(1, int(config.num_cpus))) for _ in range(workers)]

    def __call__(self, pairs: list[Pair]) -> list[Message]:
        """One reply per pair, in order; node state comes back into each pair's ``Context``."""
        import ray

        share = -(-len(pairs) // len(self.actors))
        chunks = [pairs[i : i + share] for i in range(0, len(pairs), share)]
        futures = [actor.answer.remote(chunk) for actor, chunk in zip(self.actors, chunks, strict=False)]
        replies: list[Message] = []
        for chunk, answered in zip(chunks, ray.get(futures), strict=True):
            for (_, context), (reply, state) in zip(chunk, answered, strict=True):
                context.state = state
                replies.append(reply)
        return replies

    def close(self) -> None:
        """Stop the actors, and Ray if this pool started it."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
