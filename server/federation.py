"""The round loop: drives any Flower ``Strategy`` through its public methods, one round at a time.

Per round: sample sites (seeded) -> ``configure_train`` -> exchange -> validate every reply ->
``aggregate_train`` -> ``configure_evaluate``/``aggregate_evaluate`` -> central evaluation ->
atomic checkpoint -> one line of ``metrics.jsonl``. Flower's ``Strategy.start`` has no per-round
hook, which is why flowerbed runs the loop itself.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import FlowerbedError, RunError
from flowerbed.experiment import Experiment
from flowerbed.in_memory_arrays import in_memory_record
from flowerbed.protocol import (
    CLINICAL_RECORD,
    EPSILON_SCOPE,
    EVALUATE_CLINICAL_KEY,
    EVALUATE_SPLIT_KEY,
    EXPERIMENT_KEY,
    PERSISTENT_REFUSALS,
    RUN_ID_KEY,
    SITES_KEY,
    ErrorCode,
    error_name,
)
from flowerbed.seeds import derive_seed
from flowerbed.server import checkpoint as ckpt
from flowerbed.server import run_folder
from flowerbed.server.exchange import send_and_receive
from flowerbed.server.model_selection import Selection, SelectionProgress
from flowerbed.server.reply_block import ReplyBlock, averages_blocks, block_problems
from flowerbed.server.reply_validation import reply_site, validate_train_reply
from flowerbed.server.round_outcome import NodeSubset, RoundOutcome
from flowerbed.server.round_policy import select_round_participants
from flowerbed.server.secure_train_phase import secure_train_round
from flowerbed.strategies.registry import build_strategy
from flowerbed.tasks import clinical
from flowerbed.weights import arrays_to_numpy, numpy_to_arrays

STOP_FILE = "STOP"
PER_SITE_ONLY = ("epsilon", "delta")

CentralEvaluator = Callable[[dict[str, np.ndarray]], dict[str, float]]


class Reporter(Protocol):
    """Receives progress from the round loop (terminal display, logs, or nothing)."""

    def run_started(self, experiment: Experiment, run_dir: Path, first_round: int) -> None: ...
    def round_finished(self, record: dict[str, Any], total_rounds: int, elapsed: float) -> None: ...
    def note(self, text: str) -> None: ...
    def run_finished(self, summary: dict[str, Any]) -> None: ...


class SilentReporter:
    """A reporter that reports nothing (``--quiet``)."""

    def run_started(self, experiment: Experiment, run_dir: Path, first_round: int) -> None:
        """Ignore."""

    def round_finished(self, record: dict[str, Any], total_rounds: int, elapsed: float) -> None:
        """Ignore."""

    def note(self, text: str) -> None:
        """Ignore."""

    def run_finished(self, summary: dict[str, Any]) -> None:
        """Ignore."""


def _metrics_dict(record: MetricRecord | None) -> dict[str, Any]:
    return {k: v for k, v in record.items()} if record is not None else {}


def _metric_record(reply: Message) -> MetricRecord:
    """A reply's first MetricRecord (without copying its records as ``metric_records`` does)."""
    return next(r for r in reply.content.values() if isinstance(r, MetricRecord))


class Federation:
    """One federated run over a ``Grid``: discovery, rounds, checkpoints, summary.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation engine, deployment SuperLink, or an in-process grid).
    experiment : Experiment
        The validated experiment.
    run_dir : Path
        The run folder (created by the caller).
    expected_nodes : int
        Nodes to wait for before the first round.
    central_evaluator : callable, optional
        ``weights -> metrics`` on a server-side test set (simulations only).
    reporter : Reporter, optional
        Progress display.
    selection : Selection, optional
        How rounds rank on the federated validation metric (with early stopping); ``None`` when the
        nodes hold no validation split.
    """

    def __init__(
        self,
        grid: Grid,
        experiment: Experiment,
        run_dir: Path,
        *,
        expected_nodes: int,
        initial_weights: dict[str, np.ndarray],
        central_evaluator: CentralEvaluator | None = None,
        reporter: Reporter | None = None,
        site_max_examples: dict[str, int] | None = None,
        selection: Selection | None = None,
    ) -> None:
        self.grid = grid
        self.selection = selection
        # the best round and the early-stopping rule, kept up to date as records come
        self.selection_progress = SelectionProgress(selection) if selection is not None else None
        self.best_weights: dict[str, np.ndarray] | None = None  # the best round's global model on validation
        self.experiment = experiment
        self.run_dir = run_dir
        self.expected_nodes = expected_nodes
        self.initial_weights = initial_weights
        self.central_evaluator = central_evaluator
        self.reporter = reporter or SilentReporter()
        self.site_nodes: dict[str, int] = {}
        self._node_sites: dict[int, str] = {}  # the reverse of site_nodes (one lookup per reply)
        self.excluded: dict[str, str] = {}
        self.exhausted: dict[str, str] = {}  # site -> why its privacy budget stopped it
        self.left_out: dict[str, str] = {}  # site -> the refusal (policy, approval, config) that ends its training
        self.site_max_examples = dict(site_max_examples or {})  # the operator's cap per site (federation file)
        self.pinned_examples: dict[str, float] = {}  # site -> the weight it claimed first, for the whole run
        self.history: list[dict[str, Any]] = []
        self._interrupted: dict[int, list[str]] = {}  # on resume: round -> sites it went to, never checkpointed
        self.timings: list[dict[str, Any]] = []
        self.final_weights: dict[str, np.ndarray] = initial_weights
        self._extra_records: dict[str, dict[str, np.ndarray]] = {}  # the strategy's ArrayRecords beside the weights
        self._base_config = {
            EXPERIMENT_KEY: json.dumps(experiment.to_dict()),
            RUN_ID_KEY: run_dir.name,
        }

    # -- messages -------------------------------------------------------------------------------

    def config(self, split: str | None = None) -> ConfigRecord:
        """A fresh copy of the config every message carries (strategies edit the one they get)."""
        config = ConfigRecord(dict(self._base_config))
        if split is not None:
            config[EVALUATE_SPLIT_KEY] = split
        return config

    @property
    def timeout(self) -> float:
        """Seconds to wait for replies in one exchange."""
        return self.experiment.train.round_timeout

    def _node_site(self, node_id: int) -> str:
        site = self._node_sites.get(node_id)
        stale = len(self._node_sites) != len(self.site_nodes) or (
            site is not None and self.site_nodes.get(site) != node_id
        )
        if stale:  # discovery (or a caller) changed site_nodes since the map was built
            self._node_sites = {nid: s for s, nid in self.site_nodes.items()}
            site = self._node_sites.get(node_id)
        return site if site is not None else f"node {node_id}"

    # -- discovery --------------------------------------------------------------------------------

    def discover(self) -> None:
        """Wait for the nodes, then ask each which site it is (sampling works on site names)."""
        deadline = time.monotonic() + self.timeout
        next_note = time.monotonic() + 2.0  # while nodes are missing: a line after 2 s, then every 30 s
        while len(node_ids := list(self.grid.get_node_ids())) < self.expected_nodes:
            now = time.monotonic()
            if now > deadline:
                if node_ids:
                    self.reporter.note(
                        f"{len(node_ids)} of {self.expected_nodes} nodes connected after {self.timeout:g} s "
                        "(train.round_timeout); going on with them"
                    )
                break
            if now >= next_note:
                next_note = now + 30.0
                self.reporter.note(
                    f"waiting for nodes: {len(node_ids)} of {self.expected_nodes} connected; "
                    f"{deadline - now:.0f} s left (train.round_timeout)"
                )
            time.sleep(0.2)
        if not node_ids:
            raise RunError(f"no node connected within {self.timeout:g} s (train.round_timeout)")
        messages = [
            Message(RecordDict({"config": self.config()}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids
        ]
        replies = send_and_receive(self.grid, messages, self.timeout)
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self.excluded[f"node {node_id}"] = str(reply.error.reason)
                self.reporter.note(f"node {node_id} cannot take part: {reply.error.reason}")
                continue
            site = reply_site(reply, f"node {node_id}")
            if site in self.site_nodes:
                raise RunError(
                    f"two nodes ({self.site_nodes[site]} and {node_id}) both say they are site {site!r}; "
                    "give each node a distinct site name in its node config"
                )
            self.site_nodes[site] = node_id
        self._base_config[SITES_KEY] = len(self.site_nodes)
        if len(self.site_nodes) < self.min_nodes:
            raise RunError(
                f"only {len(self.site_nodes)} of {self.expected_nodes} nodes are usable "
                f"(at least {self.min_nodes} needed): {self.excluded or 'the others did not answer'}"
            )

    @property
    def min_nodes(self) -> int:
        """Fewest accepted replies with which a round still counts."""
        return self.experiment.train.min_nodes or 1

    # -- one round --------------------------------------------------------------------------------

    def live_sites(self) -> list[str]:
        """The discovered sites still in the run (not excluded, out of budget or left out), sorted."""
        gone = self.excluded.keys() | self.exhausted.keys() | self.left_out.keys()
        return sorted(s for s in self.site_nodes if s not in gone)

    def sample_sites(self, server_round: int) -> list[str]:
        """The sites that train this round: seeded by the run's seed and the round, sorted."""
        pool = self.live_sites()
        k = min(self.experiment.train.clients_per_round or len(pool), len(pool))
        rng = random.Random(derive_seed(self.experiment.seed, "sample", server_round))
        return sorted(rng.sample(pool, k))

    def exchange_train(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """Send training messages and collect replies (secure aggregation replaces this exchange)."""
        return send_and_receive(self.grid, messages, self.timeout)

    def _sort_replies(
        self, sites: list[str], replies: list[Message], reference: dict | None, blocks: Iterable[ReplyBlock] = ()
    ) -> RoundOutcome:
        outcome = RoundOutcome()
        answered = set()
        for block in blocks:
            answered.update(block.sites)
            if reference is not None:
                self._sort_block(block, reference, outcome)
        for reply in replies:
            site = reply_site(reply, self._node_site(reply.metadata.src_node_id))
            answered.add(site)
            if reply.has_error():
                outcome.refused[site] = str(reply.error.reason)
                outcome.codes[site] = int(reply.error.code)
                continue
            problem = self._train_reply_problem(site, reply, reference) if reference is not None else None
            if problem:
                outcome.refused[site] = f"reply rejected: {problem}"
                continue
            outcome.accepted.append((site, reply))
        for site in sites:
            if site not in answered:
                outcome.refused[site] = f"no reply within {self.timeout:g} s"
        outcome.accepted.sort(key=lambda pair: pair[0])
        return outcome

    def _site_cap(self, site: str) -> float:
        """The most ``num-examples`` a site may claim: the experiment's cap, or the operator's for that site."""
        cap = self.experiment.train.max_examples
        return min(cap, self.site_max_examples.get(site, cap))

    def _sort_block(self, block: ReplyBlock, reference: dict, outcome: RoundOutcome) -> None:
        """Check a block's rows as ``_train_reply_problem`` checks replies; keep the sound rows."""
        if self.site_max_examples:
            caps = np.array([self._site_cap(site) for site in block.sites], dtype=np.float64)
        else:
            caps = np.full(len(block.sites), self.experiment.train.max_examples, dtype=np.float64)
        problems = block_problems(block, reference, caps=caps, max_update_norm=self.experiment.train.max_update_norm)
        pinned_examples = self.pinned_examples
        for i, (site, weight) in enumerate(zip(block.sites, block.weights.tolist(), strict=True)):
            if i in problems:
                continue
            pinned = pinned_examples.setdefault(site, weight)
            if weight != pinned:
                problems[i] = (
                    f"num-examples = {weight:g}, but this site reported {pinned:g} first; "
                    "a site's weight is fixed per run"
                )
        for i, problem in problems.items():
            outcome.refused[block.sites[i]] = f"reply rejected: {problem}"
        keep = np.array([i for i in range(len(block)) if i not in problems], dtype=np.int64)
        if len(keep):
            outcome.blocks.append((block if len(keep) == len(block) else block.take(keep)).sorted_by_site())

    def _train_reply_problem(self, site: str, reply: Message, reference: dict) -> str | None:
        """Why a site's training reply is rejected: validity, its weight's bounds, its update's norm."""
        problem = validate_train_reply(
            reply,
            reference,
            max_examples=self._site_cap(site),
            max_update_norm=self.experiment.train.max_update_norm,
            extra=self._extra_records,
        )
        if problem:
            return problem
        claimed = float(_metric_record(reply)["num-examples"])
        pinned = self.pinned_examples.setdefault(site, claimed)
        if claimed != pinned:
            return (
                f"num-examples = {claimed:g}, but this site reported {pinned:g} first; a site's weight is fixed per run"
            )
        return None

    def train_round(
        self, strategy: Strategy, server_round: int, arrays: ArrayRecord, sites: list[str]
    ) -> tuple[ArrayRecord | None, dict[str, Any], RoundOutcome]:
        """Configure, exchange, validate and aggregate one training round."""
        if self.experiment.secagg.enabled:  # several exchanges in place of the plain one
            return secure_train_round(self, strategy, server_round, arrays, sites)
        subset = NodeSubset(self.grid, [self.site_nodes[s] for s in sites])
        messages = strategy.configure_train(server_round, arrays, self.config(), subset)
        reference = arrays_to_numpy(arrays)
        reply_records = getattr(strategy, "reply_records", None)  # what a strategy's replies carry besides weights
        self._extra_records = reply_records(reference) if callable(reply_records) else {}
        columnar = getattr(self.grid, "exchange_columnar", None)  # the inline backend's cohorts, as columns
        if callable(columnar) and not self._extra_records and averages_blocks(strategy):
            replies, blocks = columnar(messages)
        else:
            replies, blocks = self.exchange_train(server_round, messages), []
        outcome = self._sort_replies(sites, replies, reference, blocks)
        if outcome.count < self.min_nodes:
            return None, {}, outcome
        new_arrays, metrics = strategy.aggregate_train(server_round, outcome.for_strategy())
        if new_arrays is not None:
            new_arrays = self.as_model_dtypes(new_arrays)
        return new_arrays, _metrics_dict(metrics), outcome

    def as_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Cast an aggregate back to the model's dtypes (some strategies compute in float64)."""
        values = arrays_to_numpy(arrays)
        return self._record({k: values[k].astype(ref.dtype, copy=False) for k, ref in self.initial_weights.items()})

    def _record(self, weights: dict[str, np.ndarray]) -> ArrayRecord:
        """The global model as the grid's messages carry it: in memory on an in-process grid, else ``.npy`` bytes."""
        if getattr(self.grid, "keeps_arrays_in_process", False):
            return in_memory_record({k: np.array(v, copy=True) for k, v in weights.items()})
        return numpy_to_arrays(weights)

    def evaluate_round(
        self,
        strategy: Strategy,
        server_round: int,
        arrays: ArrayRecord,
        sites: list[str],
        split: str = "test",
        clinical: bool = False,
    ) -> tuple[dict[str, Any], RoundOutcome]:
        """Federated evaluation on ``sites``' own test (or validation) splits (``clinical``: with statistics)."""
        subset = NodeSubset(self.grid, [self.site_nodes[s] for s in sites])
        config = self.config(split if split != "test" else None)
        if clinical:
            config[EVALUATE_CLINICAL_KEY] = True
        messages = list(strategy.configure_evaluate(server_round, arrays, config, subset))
        if not messages:
            return {}, RoundOutcome()
        replies = send_and_receive(self.grid, messages, self.timeout)
        outcome = self._sort_replies(sites, replies, None)
        metrics = strategy.aggregate_evaluate(server_round, [m for _, m in outcome.accepted])
        return _metrics_dict(metrics), outcome

    # -- the run ---------------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every round, checkpointing after each; return the summary.

        Each round's checkpoint is written by a background writer while the next round trains; its
        metrics line follows once it is durable, and the run's end waits for the last one.
        """
        with ckpt.CheckpointWriter() as writer:
            strategy, arrays, stopped = self._rounds(writer, resume)
            return self.finish(strategy, arrays, stopped)  # overlaps the last checkpoint; leaving the block waits

    def _rounds(self, writer: ckpt.CheckpointWriter, resume: bool) -> tuple[Strategy, ArrayRecord, str | None]:
        """Every round from the first (or the one after the checkpoint), each checkpoint handed to ``writer``."""
        if resume:
            state = ckpt.load_checkpoint(self.run_dir, self.experiment.strategy)
            strategy, weights = state.strategy, state.weights
            self.history = list(state.state.get("history", []))
            if self.selection is not None:
                self.selection_progress = SelectionProgress.of(self.history, self.selection)
            self.pinned_examples = dict(state.state.get("pinned_examples", {}))
            self.best_weights = state.best
            self.timings = [t for t in run_folder.read_timings(self.run_dir) if t["round"] <= state.round]
            first_round = state.round + 1
            sent = run_folder.read_rounds_sent(self.run_dir)  # rounds whose training went out
            self._interrupted = {r: sites for r, sites in sent.items() if r >= first_round}  # never checkpointed
            writer.resume(self.run_dir, self.history)  # metrics.jsonl rewritten from the checkpoint's history
            run_folder.write_timings(self.run_dir, self.timings)
        else:
            strategy = build_strategy(self.experiment.strategy)
            weights = self.initial_weights
            first_round = 1
            run_folder.write_experiment(self.run_dir, self.experiment)
        self.reporter.run_started(self.experiment, self.run_dir, first_round)
        for r, interrupted in sorted(self._interrupted.items()):
            self.reporter.note(
                f"round {r} was interrupted after its training went to {', '.join(interrupted)}; "
                "it is trained again now: a site that had trained it is charged for it twice in its ledger, and "
                "the epsilon it reports counts both"
            )
        sent_rounds = dict(self._interrupted)  # rounds sent whose checkpoint may not be durable yet
        self.discover()
        arrays = self._record(weights)
        stopped = None
        started = time.monotonic()
        for server_round in range(first_round, self.experiment.rounds + 1):
            if (self.run_dir / STOP_FILE).exists():
                stopped = f"stopped by the operator before round {server_round}"
                break
            sites = self.sample_sites(server_round)
            if len(sites) < self.min_nodes:
                stopped = (
                    f"round {server_round}: {len(sites)} sites left to train, fewer than the minimum "
                    f"{self.min_nodes} (train.min_nodes); privacy budget spent: {', '.join(self.exhausted) or '-'}; "
                    f"left out: {', '.join(self.left_out) or '-'}"
                )
                break
            decision = select_round_participants(
                sites, server_round, self.experiment.scenario, self.experiment.seed, population=sorted(self.site_nodes)
            )
            on_time = list(decision.on_time(self.timeout))
            if not on_time:
                self.reporter.note(f"round {server_round}: no sampled site is available (scenario); round skipped")
                continue
            writer.check()  # a failed checkpoint stops the run before another round's training goes out
            durable = writer.durable_round or first_round - 1
            sent_rounds = {r: s for r, s in sent_rounds.items() if r > durable}
            sent_rounds[server_round] = sorted({*sent_rounds.get(server_round, []), *on_time})
            run_folder.note_rounds_sent(self.run_dir, sent_rounds)
            new_arrays, train_metrics, train_outcome = self.train_round(strategy, server_round, arrays, on_time)
            for site in decision.dropped:
                train_outcome.refused[site] = "dropped out (simulated scenario)"
            for site in decision.timed_out(self.timeout):
                train_outcome.refused[site] = f"straggler: {decision.delays[site]:g} s >= round timeout (simulated)"
            self._exclude_exhausted(server_round, train_outcome)
            if new_arrays is None:
                refused = ", ".join(
                    f"{site} ({error_name(train_outcome.codes[site]) if site in train_outcome.codes else why})"
                    for site, why in sorted(train_outcome.refused.items())
                )
                stopped = (
                    f"round {server_round}: {train_outcome.count} usable replies, fewer than the "
                    f"minimum {self.min_nodes} (train.min_nodes); refused: {refused or '-'}"
                )
                break
            arrays = new_arrays
            record = self._round_record(server_round, started, train_metrics, train_outcome, sites)
            if server_round in self._interrupted:
                twice = sorted(set(self._interrupted[server_round]) & set(record["participants"]))
                if twice:  # sites whose training of this round went out before the interruption, and again now
                    record["retrained"] = twice
            if self.experiment.evaluate.federated:
                participants = train_outcome.participants()
                eval_metrics, eval_outcome = self.evaluate_round(strategy, server_round, arrays, participants)
                record["evaluate"] = eval_metrics
                for site, reply in eval_outcome.accepted:
                    site_metrics = _metrics_dict(_metric_record(reply))
                    record["sites"].setdefault(site, {}).update({f"eval-{k}": v for k, v in site_metrics.items()})
            if self.selection is not None and self._validates(server_round):
                self._validate(strategy, server_round, arrays, record)
            if self.central_evaluator is not None:
                record["central"] = self.central_evaluator(arrays_to_numpy(arrays))
            elapsed = round(time.monotonic() - started, 3)
            self.history.append(record)  # not changed from here on: checkpoints encode each record once
            timing = {"round": server_round, "time": elapsed}
            self.timings.append(timing)
            writer.submit(
                self.run_dir,
                ckpt.Checkpoint(
                    server_round,
                    arrays_to_numpy(arrays),
                    strategy,
                    {"history": self.history, "pinned_examples": self.pinned_examples},
                    best=self.best_weights,
                ),
                then=functools.partial(self.reporter.round_finished, record, self.experiment.rounds, elapsed),
                lines=[(self.run_dir / run_folder.TIMINGS, timing)],  # the record: metrics.jsonl, as history
            )
            if self.selection_progress is not None and (stopped := self.selection_progress.stop_reason()):
                self.reporter.note(stopped)
                break
        return strategy, arrays, stopped

    def _validates(self, server_round: int) -> bool:
        """Whether this round ends with a federated validation (every ``evaluate.validation_every``, and the last)."""
        return server_round % self.experiment.evaluate.validation_every == 0 or server_round == self.experiment.rounds

    def _validate(self, strategy: Strategy, server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        """Validate the new global model on every live site's validation rows; keep it if it is the best."""
        assert self.selection is not None
        metrics, outcome = self.evaluate_round(strategy, server_round, arrays, self.live_sites(), split="validation")
        record["validation"] = metrics
        for site, reply in outcome.accepted:
            site_metrics = _metrics_dict(_metric_record(reply))
            record["sites"].setdefault(site, {}).update({f"val-{k}": v for k, v in site_metrics.items()})
        if outcome.refused:
            record["validation_refused"] = outcome.refused
        self._exclude_exhausted(server_round, outcome)
        assert self.selection_progress is not None
        if self.selection_progress.observe(record):  # this round's model is the best so far
            self.best_weights = arrays_to_numpy(arrays)

    def _exclude_exhausted(self, server_round: int, outcome: RoundOutcome) -> None:
        """Leave out of later rounds every site that refused for good (budget spent, policy), and say why."""
        for site, code in outcome.codes.items():
            reason = outcome.refused[site]
            if code == ErrorCode.BUDGET_EXHAUSTED and site not in self.exhausted:
                self.exhausted[site] = f"round {server_round}: {reason}"
                self.reporter.note(f"site {site} leaves the run: {reason}")
            elif code in PERSISTENT_REFUSALS and site not in self.left_out and site not in self.exhausted:
                self.left_out[site] = f"round {server_round}: {reason}"
                self.reporter.note(f"site {site} leaves the run: {reason}")

    def _round_record(
        self, server_round: int, started: float, train_metrics: dict, outcome: RoundOutcome, sampled: list[str]
    ) -> dict[str, Any]:
        released = [(site, _metrics_dict(_metric_record(reply))) for site, reply in outcome.accepted]
        released += [pair for block in outcome.blocks for pair in block.row_metrics()]
        sites: dict[str, dict[str, Any]] = {}
        for site, values in sorted(released, key=lambda pair: pair[0]):
            sites[site] = {f"train-{k}" if k == "num-examples" else k: v for k, v in values.items()}
        epsilons = [v["epsilon"] for v in sites.values() if "epsilon" in v]
        return {
            "round": server_round,
            "sampled": sampled,
            "participants": outcome.participants(),
            "refused": outcome.refused,
            "refused_codes": {site: error_name(code) for site, code in sorted(outcome.codes.items())},
            # epsilon is per site (never averaged): drop the strategy's mean of it
            "train": {k: v for k, v in train_metrics.items() if k not in PER_SITE_ONLY},
            "evaluate": {},
            "central": {},
            "sites": sites,
            "epsilon_max": max(epsilons) if epsilons else None,
        }

    def reported_model(self) -> dict[str, Any]:
        """Which global model the final figures are for: the last round's, or the best on validation."""
        last = self.history[-1]["round"] if self.history else 0
        best = self.selection_progress.best if self.selection_progress is not None else None
        if best is None or self.best_weights is None or not self.experiment.reports_best_model:
            return {"reported": "last", "round": last}
        return {
            "reported": "best",
            "round": best[0],
            "last_round": last,
            "selected_by": f"validation {self.selection.metric}",  # type: ignore[union-attr]
            "validation_value": best[1],
        }

    def _clinical(self, outcome: RoundOutcome) -> dict[str, Any]:
        """The clinical figures from the nodes' statistics (docs/evaluation.md); malformed ones are left out, named."""
        from flowerbed.tasks.data.catalog import resolve_contract

        replies: dict[str, clinical.Statistics] = {}
        rejected: dict[str, str] = {}
        for site, reply in outcome.accepted:
            record = reply.content.get(CLINICAL_RECORD)
            text = record.get("statistics") if isinstance(record, ConfigRecord) else None
            if text is None:
                rejected[site] = "the reply carries no clinical statistics"
                continue
            try:
                replies[site] = clinical.parse_statistics(text, f"site {site}")
            except ValueError as exc:
                rejected[site] = str(exc)
        settings = self.experiment.evaluate.clinical
        try:
            contract = resolve_contract(self.experiment.data)
        except FlowerbedError:
            contract = None
        summary = clinical.clinical_summary(replies, clinical.declared_groups(settings.subgroups, contract))
        summary["rejected"] = rejected
        for site, reason in rejected.items():
            self.reporter.note(f"clinical statistics of site {site} left out: {reason}")
        return summary

    def finish(self, strategy: Strategy, arrays: ArrayRecord, stopped: str | None) -> dict[str, Any]:
        """Final evaluation on every site (of the reported model), the summary, and the final model."""
        self.final_weights = arrays_to_numpy(arrays)
        model = self.reported_model()
        if model["reported"] == "best":
            assert self.best_weights is not None
            arrays = numpy_to_arrays(self.best_weights)
        weights = arrays_to_numpy(arrays)
        final_sites: dict[str, dict[str, Any]] = {}
        final_federated: dict[str, Any] = {}
        live = sorted(s for s in self.site_nodes if s not in self.excluded)
        final_clinical: dict[str, Any] = {}
        if self.experiment.evaluate.federated and live:
            asked = self.experiment.evaluate.clinical.enabled
            final_federated, outcome = self.evaluate_round(
                strategy, self.experiment.rounds, arrays, live, clinical=asked
            )
            for site, reply in outcome.accepted:
                final_sites[site] = _metrics_dict(_metric_record(reply))
            if asked:
                final_clinical = self._clinical(outcome)
        epsilon: dict[str, float] = {}
        refusals: dict[str, str] = {}
        for record in self.history:
            for site, values in record["sites"].items():
                if "epsilon" in values:
                    epsilon[site] = max(epsilon.get(site, 0.0), float(values["epsilon"]))
            for site, reason in record["refused"].items():
                refusals.setdefault(site, f"round {record['round']}: {reason}")
        summary: dict[str, Any] = {
            "name": self.experiment.name,
            "run_dir": str(self.run_dir),
            "rounds_planned": self.experiment.rounds,
            "rounds_completed": self.history[-1]["round"] if self.history else 0,
            "stopped": stopped,
            "strategy": self.experiment.strategy.name,
            "model": model,
            "final": {
                "federated": final_federated,
                "sites": final_sites,
                "central": self.central_evaluator(weights) if self.central_evaluator else {},
                "clinical": final_clinical,
            },
            "epsilon": {
                "per_site": epsilon,
                "max": max(epsilon.values()) if epsilon else None,
                "scope": EPSILON_SCOPE,
            },
            "refused": refusals,
            "excluded": self.excluded,
            "left_out": self.left_out,
            "budget_exhausted": self.exhausted,
            # rounds trained twice (interrupted after their training went out, before their checkpoint)
            "retrained": {str(r["round"]): r["retrained"] for r in self.history if r.get("retrained")},
        }
        return summary
