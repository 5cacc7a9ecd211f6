"""One node round: admit -> train -> release, the rules of a hospital's node in one place.

Every path that answers for a node runs these steps: the Flower ClientApp (a deployed SuperNode,
and each virtual node on Flower's simulation engine) and the inline backend's cohorts, which
replace only the train step with batched kernels. The steps work on plain data, for one node or
many at once, with the same outcome either way.

- **admit**: the node's own config (typed, unknown keys refused), task approval, its local data,
  the request's policy (plain training on a node with a budget is refused), and for DP training
  the ledger, the dataset's fingerprint, the run's plan and the budget check. A refusal carries
  the ``ErrorCode`` the coordinator reads.
- **train**: the local arithmetic (``train_step`` here; the cohort kernels in the inline backend).
- **release**: a DP round is charged to the node's ledger (durably, before any reply exists), and
  the reply's metrics are made: ``num-examples`` and ``train-loss``, or under DP ``epsilon`` and
  ``delta`` instead of the loss (a loss on private rows carries no noise).

Simulated nodes take extra keys from ``FLOWERBED_SIM_NODE_CONFIG`` (a JSON object keyed by ``"*"``
then by site name, e.g. ``{"*": {"dp-test-seed": 0}, "va": {"budget-epsilon": 2}}``); deployed
nodes ignore it. A simulated node without ``ledger`` keeps its releases in
``$FLOWERBED_SIM_NODE_DIR/ledger.sqlite`` (``flowerbed simulate`` points it at the run folder's
``nodes/``), else in a per-run folder of the system's temporary folder.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from flowerbed.client import personal
from flowerbed.client.approval import check_task_approved
from flowerbed.client.local_data import per_experiment, resolve_site
from flowerbed.client.node_config import NodeConfig, parse_node_config
from flowerbed.client.node_state import NodeState
from flowerbed.client.private_training import train_private
from flowerbed.client.training import StepSchedule, TrainResult, predict, task_metrics, train_local
from flowerbed.exception import ConfigError, DataError, FlowerbedError, NodeError, PolicyRefusal
from flowerbed.experiment import Experiment, TrainConfig
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.privacy.ledger import (
    Budget,
    Charge,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    check_budget,
    compose,
    fingerprint_arrays,
    fingerprint_file,
)
from flowerbed.privacy.planner import DPPlan, make_plan
from flowerbed.protocol import ErrorCode
from flowerbed.seeds import derive_seed
from flowerbed.tasks import SiteData, Task, clinical, is_builtin, resolve_task
from flowerbed.tasks.task import accuracy_metrics, cross_entropy

SIM_NODE_CONFIG_ENV = "FLOWERBED_SIM_NODE_CONFIG"
SIM_NODE_DIR_ENV = "FLOWERBED_SIM_NODE_DIR"

Kind = Literal["query", "train", "evaluate"]
Split = Literal["test", "validation"]
Metrics = dict[str, int | float]


@dataclass(frozen=True)
class NodeRequest:
    """What the coordinator asks of one node, as plain data.

    Parameters
    ----------
    kind : {"query", "train", "evaluate"}
        Discovery, a training round, or an evaluation.
    experiment : Experiment
        The run's experiment, as the coordinator sent it.
    run_id : str
        The run's id (ledger entries and plans are keyed by it).
    server_round : int
        The round (0 for discovery).
    node_config : Mapping[str, Any]
        The node's own configuration (Flower's ``context.node_config``).
    secure : bool (default: False)
        A training request inside a secure-aggregation round (its update leaves the node masked).
    proximal_mu : float (default: 0.0)
        FedProx's proximal term, as the strategy sends it (``proximal-mu``).
    split : {"test", "validation"} (default: "test")
        The split an evaluation scores: the node's test split or its validation rows.
    control : Mapping[str, np.ndarray] | None (default: None)
        SCAFFOLD's global control variate, as the strategy sends it (``scaffold-control``).
    """

    kind: Kind
    experiment: Experiment
    run_id: str
    server_round: int
    node_config: Mapping[str, Any]
    secure: bool = False
    proximal_mu: float = 0.0
    split: Split = "test"
    control: Mapping[str, np.ndarray] | None = None
    clinical: bool = False  # an evaluation that also asks for the split's clinical statistics

    def with_(self, **changes: Any) -> NodeRequest:
        """A copy with ``changes`` (one message content asked of many nodes differs only in ``node_config``)."""
        return _replaced(self, changes)


def _replaced(value: Any, changes: dict[str, Any]) -> Any:
    """``dataclasses.replace`` of a frozen dataclass whose fields need no checks, without ``__init__``."""
    fields = value.__dataclass_fields__
    if not changes.keys() <= fields.keys():
        raise TypeError(f"{type(value).__name__} has no field {', '.join(sorted(changes.keys() - fields.keys()))}")
    new = object.__new__(type(value))
    new.__dict__.update(value.__dict__, **changes)
    return new


@dataclass(frozen=True)
class Refusal:
    """A node's refusal: the code the coordinator reads and the reason people read."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True)
class PrivateRelease:
    """A DP round admitted at a node: where it is charged and under which plan."""

    ledger: PrivacyLedger
    dataset: str
    plan: DPPlan
    budget: Budget | None
    noise_seed: int | None  # deterministic sampling and noise: tests and simulations only

    @property
    def delta(self) -> float:
        """The delta epsilon is reported at: the budget's, else the plan's."""
        return self.plan.delta if self.budget is None else self.budget.delta

    @property
    def accountant(self) -> str:
        """The accountant that composes the releases: the budget's, else the plan's."""
        return self.plan.accountant if self.budget is None else self.budget.accountant


@dataclass(frozen=True)
class Admitted:
    """A request the node accepted, with everything its train or evaluate step needs."""

    request: NodeRequest
    config: NodeConfig
    site: SiteData
    task: Task
    train: TrainConfig  # the federation's local work with this site's own entries applied
    private: PrivateRelease | None = None
    schedule: StepSchedule | None = None  # train.local_steps: this round's steps of the site's iterator

    @property
    def seed(self) -> int:
        """The plain path's batch order this round (and the seed personalization derives its own from)."""
        return derive_seed(self.request.experiment.seed, "train", self.request.server_round, self.site.name)

    def with_(self, **changes: Any) -> Admitted:
        """A copy with ``changes`` (``dataclasses.replace`` without re-running ``__init__``: a cohort makes many)."""
        return _replaced(self, changes)

    def evaluation_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The features and targets an evaluation request scores (its test or validation split)."""
        return self.site.split(self.request.split)


Outcome = Admitted | Refusal


def refusal_for(exc: FlowerbedError, node: str) -> Refusal:
    """The refusal for an error, with the node named first."""
    return Refusal(exc.code, f"node {node}: {exc}")


def node_label(raw: Mapping[str, Any]) -> str:
    """How a node is named in a refusal before its data is known."""
    if raw.get("site"):
        return str(raw["site"])
    if raw.get("data-path"):
        return Path(str(raw["data-path"])).stem
    return f"partition {raw['partition-id']}" if "partition-id" in raw else "?"


# --------------------------------------------------------------------------------------- admit


def admit(requests: Sequence[NodeRequest]) -> list[Outcome]:
    """Admit or refuse each request, in order (DP bookkeeping batched per ledger)."""
    outcomes: list[Outcome] = []
    overlay = os.environ.get(SIM_NODE_CONFIG_ENV) or None  # read once: a cohort asks for every node
    for request in requests:
        label = [node_label(request.node_config)]  # the site's name once its data is known
        try:
            outcomes.append(_admit_one(request, label, overlay))
        except FlowerbedError as exc:
            outcomes.append(refusal_for(exc, label[0]))
    private = [i for i, o in enumerate(outcomes) if isinstance(o, Admitted) and _is_release(o)]
    for i, outcome in zip(private, _admit_private([outcomes[i] for i in private]), strict=True):  # type: ignore[misc]
        outcomes[i] = outcome
    stepping = [
        i
        for i, o in enumerate(outcomes)
        if isinstance(o, Admitted) and o.request.kind == "train" and o.private is None and o.train.local_steps
    ]
    for i, outcome in zip(stepping, _schedule([outcomes[i] for i in stepping]), strict=True):  # type: ignore[misc]
        outcomes[i] = outcome
    return outcomes


def state_path(config: NodeConfig, run_id: str, sim_dir: str | None = None) -> Path:
    """The node's state file: in its ``state`` folder, or a simulated node's default.

    ``sim_dir`` is ``FLOWERBED_SIM_NODE_DIR`` when the caller has read it (``None``: read it here).

    Raises
    ------
    NodeError
        A deployed node without a state folder cannot keep its iterators between rounds.
    """
    if sim_dir is None:
        sim_dir = _sim_node_dir()
    return _state_path(config.state, config.ledger, config.simulated, sim_dir if config.simulated else "", run_id)


def _sim_node_dir() -> str:
    """``FLOWERBED_SIM_NODE_DIR`` ("" when unset): where simulated nodes keep their ledger and state."""
    return os.environ.get(SIM_NODE_DIR_ENV) or ""


def _state_paths() -> Callable[[Admitted], Path]:
    """``state_path`` of an admitted request, answered once per distinct (state, ledger, simulated, run)."""
    sim_dir = _sim_node_dir()
    known: dict[tuple[str | None, str | None, bool, str], Path] = {}

    def path(a: Admitted) -> Path:
        config = a.config
        key = (config.state, config.ledger, config.simulated, a.request.run_id)
        found = known.get(key)
        if found is None:
            found = known[key] = state_path(config, a.request.run_id, sim_dir)
        return found

    return path


@functools.lru_cache(maxsize=256)
def _state_path(state: str | None, ledger: str | None, simulated: bool, sim_dir: str, run_id: str) -> Path:
    """``state_path`` of a config's fields (a round asks once per node: the answer is kept)."""
    if state is not None:
        return Path(state).expanduser() / "node-state.sqlite"
    if simulated:
        ledger_file = _expanded(ledger) if ledger is not None else _simulated_ledger(sim_dir, run_id)
        return ledger_file.with_name("node-state.sqlite")
    raise NodeError(
        "train.local_steps and SCAFFOLD need the node's state folder, where its data iterator and control "
        "variate resume: start the node with "
        "flowerbed node start (it sets state), or --node-config 'state=\"/var/lib/flowerbed/state\"'"
    )


def _schedule(admitted: list[Admitted]) -> list[Outcome]:
    """This round's steps of each site's own iterator: it goes on where the site's last round stopped."""
    outcomes: list[Outcome] = list(admitted)
    by_state: dict[Path, list[int]] = {}
    paths = _state_paths()
    for i, a in enumerate(admitted):
        try:
            by_state.setdefault(paths(a), []).append(i)
        except FlowerbedError as exc:
            outcomes[i] = refusal_for(exc, a.site.name)
    for path, members in by_state.items():
        run_id = admitted[members[0]].request.run_id
        wanted = [(admitted[i].site.name, admitted[i].request.server_round) for i in members]
        for i, before in zip(members, NodeState(path).rounds_before(run_id, wanted), strict=True):
            a = admitted[i]
            steps = int(a.train.local_steps)  # type: ignore[arg-type]
            seed = derive_seed(a.request.experiment.seed, "iterator", a.site.name)
            outcomes[i] = a.with_(schedule=StepSchedule(before * steps, steps, seed, a.train.batch_size))
    return outcomes


_FROM_ENV = "from the environment"


def node_config(raw: Mapping[str, Any], site: str | None = None, overlay: str | None = _FROM_ENV) -> NodeConfig:
    """The node's typed config; a simulated node's adds ``FLOWERBED_SIM_NODE_CONFIG``'s entries for ``site``.

    ``overlay`` is that variable's text when the caller has read it.
    """
    simulated = "partition-id" in raw and "data-path" not in raw
    if not simulated:
        overlay = None
    elif overlay is _FROM_ENV:
        overlay = os.environ.get(SIM_NODE_CONFIG_ENV)
    if not overlay:
        return parse_node_config(raw, deployed=not simulated)
    merged = dict(raw)
    for key in ("*", site):
        merged.update(_overlay(overlay).get(key, {}) if key is not None else {})
    return parse_node_config(merged, deployed=not simulated)


@functools.lru_cache(maxsize=8)
def _overlay(text: str) -> dict[str, dict[str, Any]]:
    try:
        value = json.loads(text)
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            return value
    except ValueError:
        pass
    raise ConfigError(SIM_NODE_CONFIG_ENV, ["must be a JSON object of objects keyed by '*' or site name"])


_SIMULATED_NODES: dict[tuple[int, int, str | None], tuple[dict[str, Any], Experiment, NodeConfig, SiteData]] = {}


def _config_and_site(
    raw: Mapping[str, Any], experiment: Experiment, overlay: str | None, label: list[str]
) -> tuple[NodeConfig, SiteData]:
    """The node's typed config and its data for ``experiment``.

    A simulated node's are kept per (config, experiment, overlay): its rows come from the
    experiment and cannot change within a run. A deployed node's file is read as ``resolve_site``
    reads it, every time.
    """
    simulated = "partition-id" in raw and "data-path" not in raw
    key = (id(raw), id(experiment), overlay)
    held = _SIMULATED_NODES.get(key) if simulated else None
    if held is not None and held[1] is experiment and held[0] == raw:
        label[0] = held[3].name
        return held[2], held[3]
    config = node_config(raw, overlay=overlay)
    site = resolve_site(config, experiment)
    label[0] = site.name
    if overlay and config.simulated:
        config = node_config(raw, site.name, overlay)  # the overlay's entries for this site
        site = resolve_site(config, experiment)
    if simulated:
        if len(_SIMULATED_NODES) > 65536:
            _SIMULATED_NODES.clear()
        _SIMULATED_NODES[key] = (dict(raw), experiment, config, site)
    return config, site


def _admit_one(request: NodeRequest, label: list[str], overlay: str | None) -> Admitted:
    raw, experiment = request.node_config, request.experiment
    config, site = _config_and_site(raw, experiment, overlay, label)
    if not is_builtin(experiment.task.name):
        check_task_approved(experiment.task.name, {**raw, **config.model_dump(by_alias=True, exclude_none=True)})
    task = _task(experiment)
    if request.kind == "evaluate":
        _check_evaluation(config, site, task, request.split)
    if request.kind == "train":
        if site.num_train == 0:
            raise DataError(f"site {site.name} has no training rows")
        if not (math.isfinite(request.proximal_mu) and request.proximal_mu >= 0):
            raise NodeError(f"proximal-mu = {request.proximal_mu!r} from the server must be a finite number >= 0")
        if request.control is not None and request.secure:
            raise NodeError(
                "SCAFFOLD's control variates do not travel through secure aggregation; set secagg.enabled = false"
            )
        if config.require_secure_aggregation and not request.secure:
            raise PolicyRefusal(
                f"site {site.name} releases updates only through secure aggregation (its node config sets "
                "require-secure-aggregation); set secagg.enabled = true in the experiment"
            )
        if not experiment.privacy.enabled and config.budget_epsilon is not None:
            raise PolicyRefusal(
                f"site {site.name} only trains with differential privacy (its node config sets "
                f"budget-epsilon = {config.budget_epsilon:g}); set privacy.enabled = true and "
                "privacy.target_epsilon in the experiment"
            )
        if experiment.privacy.enabled:
            check_loss_is_per_row(task, site)
    return Admitted(request, config, site, task, experiment.train_for(site.name))


def check_loss_is_per_row(task: Task, site: SiteData) -> None:
    """DP-SGD is valid only for a loss that is a mean of per-row terms: the task must say so, and be right.

    Raises
    ------
    PolicyRefusal
        When the task declares a batch-coupled loss, declares nothing, or declares a per-row loss
        that a probe on a few of the node's rows contradicts.
    """
    if task.loss_per_row is False:
        raise PolicyRefusal(
            f"task {task.name!r} declares a loss that couples the rows of a batch (loss_per_row = False): DP-SGD's "
            "clipping bounds one patient's influence only for a mean of per-row terms, so its epsilon would not "
            "hold; train this task without DP, or rewrite its loss as a mean of per-row terms"
        )
    if task.loss_per_row is None:
        raise PolicyRefusal(
            f"task {task.name!r} does not say whether its loss is a mean of per-row terms, which DP-SGD needs: "
            "set loss_per_row = True on the Task when each row's term depends on that row alone (checked at "
            "the node), or False to train it without DP only"
        )
    problem = _per_row_probe(task, site)
    if problem:
        raise PolicyRefusal(
            f"task {task.name!r} declares a per-row loss (loss_per_row = True), but on {PROBE_ROWS} of site "
            f"{site.name}'s rows {problem}: its rows are coupled and DP-SGD's epsilon would not hold; fix the "
            "declaration or the loss"
        )


PROBE_ROWS = 8
_PROBED: dict[tuple[Task, Any], str | None] = {}


def _per_row_probe(task: Task, site: SiteData) -> str | None:
    """Whether the loss of a batch is the mean of its rows' losses, in value and gradient (``None``: it is)."""
    key = (task, site.schema)
    if key in _PROBED:
        return _PROBED[key]
    n = min(PROBE_ROWS, len(site.y_train))
    if n < 2:
        return None  # one row: nothing to couple
    model = make_private_compatible(task.build_model(site.schema, seed=0)).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.as_tensor(site.x_train[:n]), torch.as_tensor(site.y_train[:n])
    try:
        batch = task.loss_fn(model(x), y)
        batch_grads = torch.autograd.grad(batch, params, allow_unused=True)
        rows = [task.loss_fn(model(x[i : i + 1]), y[i : i + 1]) for i in range(n)]
        row_grads = [torch.autograd.grad(loss, params, allow_unused=True) for loss in rows]
    except (RuntimeError, ValueError, IndexError) as exc:
        _PROBED[key] = f"the loss cannot be computed on one row alone ({exc})"
        return _PROBED[key]
    zero = [torch.zeros_like(p) for p in params]
    batch_grads = [z if g is None else g for g, z in zip(batch_grads, zero, strict=True)]
    row_grads = [[z if g is None else g for g, z in zip(rg, zero, strict=True)] for rg in row_grads]
    mean_loss = torch.stack([r.detach() for r in rows]).mean()
    problem = None
    if not torch.allclose(batch.detach(), mean_loss, rtol=1e-4, atol=1e-6):
        value = float(batch.detach())
        problem = f"the batch's loss is {value:.6g}, the mean of the rows' losses {float(mean_loss):.6g}"
    for j, g in enumerate(batch_grads):
        mean_grad = torch.stack([rg[j] for rg in row_grads]).mean(0)
        if problem is None and not torch.allclose(g, mean_grad, rtol=1e-3, atol=1e-6):
            problem = "the batch's gradient is not the mean of the rows' gradients"
    _PROBED[key] = problem
    return problem


def _check_evaluation(config: NodeConfig, site: SiteData, task: Task, split: Split) -> None:
    """The node's evaluation policy: refused outright, too few rows, or DP that the task's metrics do not fit."""
    rows = len(site.split(split)[1])
    if config.evaluation_policy == "refuse":
        raise PolicyRefusal(f"site {site.name} does not answer evaluation requests (its node config sets evaluation)")
    if rows == 0 and split == "validation":
        raise DataError(
            f"site {site.name} holds no validation rows: set data.validation_fraction (e.g. 0.2) in the experiment"
        )
    if rows == 0:
        raise DataError(f"site {site.name} has no test rows to evaluate on (too few examples to split)")
    if rows < config.test_rows_needed:
        raise PolicyRefusal(
            f"site {site.name} has {rows} {split} rows, fewer than its min-test-rows ({config.test_rows_needed}): "
            "metrics on so few patients would reveal them"
        )
    if config.evaluation_policy == "dp" and task.metrics_fn is not accuracy_metrics:
        raise PolicyRefusal(
            f"site {site.name} answers evaluation only as a DP release of its counts (loss, accuracy), "
            f"which task {task.name!r} does not report; ask the site to set evaluation = 'allow' (no budget) or "
            "use a task with the built-in accuracy metric"
        )


@functools.lru_cache(maxsize=16)
def _task_cached(name: str, args_json: str) -> Task:
    return resolve_task(name, json.loads(args_json))


def _task(experiment: Experiment) -> Task:
    """The experiment's task, resolved once per experiment object."""
    return per_experiment(
        "task", experiment, lambda e: _task_cached(e.task.name, json.dumps(e.task.args, sort_keys=True))
    )


def ledger_path(config: NodeConfig, run_id: str) -> Path:
    """The node's ledger file: ``ledger`` from its config, or a simulated node's default.

    Raises
    ------
    NodeError
        A deployed node without ``ledger`` cannot train with DP.
    """
    if config.ledger is not None:
        return _expanded(config.ledger)
    if config.simulated:
        return _simulated_ledger(_sim_node_dir(), run_id)
    raise NodeError(
        "DP training needs a privacy ledger: start the node with "
        "--node-config 'ledger=\"/var/lib/flowerbed/ledger.sqlite\" budget-epsilon=8.0'"
    )


@functools.lru_cache(maxsize=256)
def _expanded(path: str) -> Path:
    return Path(path).expanduser()


@functools.lru_cache(maxsize=256)
def _simulated_ledger(root: str, run_id: str) -> Path:
    """A simulated node's ledger: in ``FLOWERBED_SIM_NODE_DIR``, else a per-run folder of the temporary folder."""
    if root:
        return Path(root) / "ledger.sqlite"
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return Path(tempfile.gettempdir()) / "flowerbed-nodes" / safe_run / "ledger.sqlite"


@functools.lru_cache(maxsize=64)
def open_ledger(path: Path) -> PrivacyLedger:
    """The ledger at ``path`` (opened, and its schema made, once per process)."""
    return PrivacyLedger(path)


_ARRAY_FINGERPRINTS: dict[int, tuple[SiteData, str]] = {}


def dataset_fingerprint(site: SiteData, config: NodeConfig) -> str:
    """The ledger's name for the local dataset.

    ``dataset-id`` from the node config when set (a name that stays when the file is updated, so
    a new version does not start a fresh budget); else the SHA-256 of the node's data file; else
    (simulations) of the training arrays.
    """
    if config.dataset_id:
        return f"id:{config.dataset_id}"
    if config.data_path is not None and Path(config.data_path).is_file():
        stat = Path(config.data_path).stat()
        return _file_fingerprint(config.data_path, stat.st_size, stat.st_mtime_ns)
    cached = _ARRAY_FINGERPRINTS.get(id(site))
    if cached is None or cached[0] is not site:
        if len(_ARRAY_FINGERPRINTS) > 65536:
            _ARRAY_FINGERPRINTS.clear()
        cached = _ARRAY_FINGERPRINTS[id(site)] = (site, fingerprint_arrays(site.x_train, site.y_train))
    return cached[1]


@functools.lru_cache(maxsize=64)
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    return fingerprint_file(path)


@functools.lru_cache(maxsize=4096)
def _new_plan(
    n: int, batch_size: int, local_epochs: int, local_steps: int | None, rounds: int, privacy: tuple
) -> DPPlan:
    max_grad_norm, target_epsilon, noise_multiplier, delta, accountant = privacy
    return make_plan(
        n=n,
        batch_size=batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
        rounds=rounds,
        max_grad_norm=max_grad_norm,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        delta=delta,
        accountant=accountant,
    )


def run_plan(experiment: Experiment, n: int, train: TrainConfig | None = None) -> DPPlan:
    """The plan a node makes for the run on ``n`` training rows (equal sites share it)."""
    p, t = experiment.privacy, train or experiment.train
    return _new_plan(
        n, t.batch_size, t.local_epochs, t.local_steps, experiment.rounds,
        (p.max_grad_norm, p.target_epsilon, p.noise_multiplier, p.delta, p.accountant),
    )  # fmt: skip


def budget_of(config: NodeConfig) -> Budget | None:
    """The hospital's budget from its node config (``None``: releases are recorded, not limited)."""
    if config.budget_epsilon is None:
        return None
    return _budget(config.budget_epsilon, config.budget_delta, config.budget_accountant)


@functools.lru_cache(maxsize=256)
def _budget(epsilon: float, delta: float, accountant: str) -> Budget:
    return Budget(epsilon=epsilon, delta=delta, accountant=accountant)


def _is_release(a: Admitted) -> bool:
    """Whether answering ``a`` is a DP release charged to the node's ledger."""
    if a.request.kind == "train":
        return a.request.experiment.privacy.enabled
    return a.request.kind == "evaluate" and a.config.evaluation_policy == "dp"


@functools.lru_cache(maxsize=64)
def evaluation_plan(noise_multiplier: float, delta: float, accountant: str, releases: int = 1) -> DPPlan:
    """Gaussian releases of a split's counts: the accountant's (sigma, q = 1, one step per release).

    An evaluation is one release (loss, accuracy, size); with the clinical statistics, two.
    """
    return DPPlan(
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps_per_round=releases,
        rounds=1,
        max_grad_norm=1.0,
        delta=delta,
        accountant=accountant,
    )


def _admit_private(admitted: list[Admitted]) -> list[Outcome]:
    """Ledger, dataset, plan and budget check for DP releases (training, evaluation), one ledger read each."""
    outcomes: list[Outcome] = list(admitted)
    by_ledger: dict[Path, list[tuple[int, str, DPPlan]]] = {}
    for i, a in enumerate(admitted):
        try:
            path = ledger_path(a.config, a.request.run_id)
            if a.request.kind == "train":
                plan = run_plan(a.request.experiment, a.site.num_train, a.train)
            else:
                c = a.config
                plan = evaluation_plan(c.evaluation_noise, c.budget_delta, c.budget_accountant, evaluation_releases(a))
        except FlowerbedError as exc:
            outcomes[i] = refusal_for(exc, a.site.name)
            continue
        by_ledger.setdefault(path, []).append((i, dataset_fingerprint(a.site, a.config), plan))
    for path, members in by_ledger.items():
        try:
            ledger = open_ledger(path)
            training = [
                (d, admitted[i].request.run_id, p) for i, d, p in members if admitted[i].request.kind == "train"
            ]
            stored = iter(ledger.save_plans(training))  # a run's training plan is made once and kept
            plans = [next(stored) if admitted[i].request.kind == "train" else p for i, _, p in members]
            histories = ledger.histories(d for _, d, _ in members)
        except FlowerbedError as exc:
            for i, _, _ in members:
                outcomes[i] = refusal_for(exc, admitted[i].site.name)
            continue
        for (i, dataset, _), plan in zip(members, plans, strict=True):
            a = admitted[i]
            budget = budget_of(a.config)
            seed = a.config.dp_test_seed
            stream = "dp" if a.request.kind == "train" else "dp-evaluate"
            noise_seed = None if seed is None else derive_seed(seed, stream, a.request.server_round, a.site.name)
            release = PrivateRelease(ledger, dataset, plan, budget, noise_seed)
            step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
            try:  # the accountant must handle this release before anything is trained (e.g. a tiny noise)
                compose([*histories[dataset], step], release.delta, release.accountant)
                if budget is not None:
                    check_budget(histories[dataset], step, budget, dataset=dataset, site=a.site.name)
            except FlowerbedError as exc:
                outcomes[i] = refusal_for(exc, a.site.name)
                continue
            outcomes[i] = a.with_(private=release)
    return outcomes


# --------------------------------------------------------------------------------------- train


def node_model(admitted: Admitted, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """The task's model for this node's data, holding the received weights.

    Raises
    ------
    NodeError
        When the weights do not fit the model this node builds (names or shapes differ).
    """
    experiment = admitted.request.experiment
    model = admitted.task.build_model(admitted.site.schema)
    if experiment.privacy.enabled:
        model = make_private_compatible(model)
    state = model.state_dict()
    problems = sorted(set(state) ^ set(weights))
    problems += [k for k in state if k in weights and tuple(weights[k].shape) != tuple(state[k].shape)]
    if problems:
        raise NodeError(
            f"the received model does not fit site {admitted.site.name}'s data and task "
            f"({', '.join(problems[:5])}); check the experiment's task and data sections"
        )
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in weights.items()}, strict=True)
    return model


def train_step(admitted: Admitted, model: nn.Module, device: torch.device) -> TrainResult:
    """The local arithmetic of one round on one node: DP-SGD under the admitted plan, or plain SGD.

    Under SCAFFOLD every step's gradient is corrected by ``c - c_i`` (the global control variate
    minus the site's own), and the result carries the site's new control variate and its change.
    Under personalization (``flowerbed.client.personal``) the site's own layers are trained and
    kept in the result, and the model is left holding what the node may send.
    """
    method = admitted.request.experiment.personalization.method
    received = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()} if method != "none" else {}
    names = personal.personal_names(model, admitted.request.experiment.personalization)
    if names:
        personal.overlay(model, _kept(admitted, admitted.request.server_round), names)
    if method == "fedrep":  # the head first, the body fixed; then the body, the head fixed
        personal.freeze(model, names)
        _local_steps(admitted, model, device, admitted.request.experiment.personalization.finetune_steps, "head")
        personal.freeze(model, {k for k, _ in model.named_parameters()} - names)
    try:
        result = _train(admitted, model, device)
    finally:
        personal.unfreeze(model)
    if names:
        result = replace(result, personal=personal.take_personal(model, received, names))
    elif method == "ditto":
        result = replace(result, personal=_ditto(admitted, model, received, device))
    return result


def _train(admitted: Admitted, model: nn.Module, device: torch.device) -> TrainResult:
    """The round's training of the shared model (SCAFFOLD-corrected where the strategy asks)."""
    site = admitted.site
    mu = admitted.request.proximal_mu
    scaffold = _scaffold_start(admitted, model, device) if admitted.request.control is not None else None
    correction = scaffold[1] if scaffold else None
    if admitted.private is not None:
        result = train_private(
            model, admitted.task, site.x_train, site.y_train, admitted.train,
            plan=admitted.private.plan, seed=admitted.private.noise_seed, device=device, proximal_mu=mu,
            correction=correction,
        )  # fmt: skip
    else:
        result = train_local(
            model, admitted.task, site.x_train, site.y_train, admitted.train,
            seed=admitted.seed, device=device, proximal_mu=mu, schedule=admitted.schedule, correction=correction,
        )  # fmt: skip
    return result if scaffold is None else _scaffold_end(admitted, model, result, *scaffold)


def _kept(admitted: Admitted, before_round: int) -> dict[str, np.ndarray] | None:
    """The site's personal arrays from its newest round before ``before_round``."""
    request = admitted.request
    return NodeState(state_path(admitted.config, request.run_id)).kept_before(
        request.run_id, admitted.site.name, personal.KIND, before_round
    )


def _local_steps(admitted: Admitted, model: nn.Module, device: torch.device, steps: int, purpose: str) -> None:
    """``steps`` plain SGD steps on the site's training rows (only ever into what stays at the node)."""
    site, train = admitted.site, admitted.train
    schedule = StepSchedule(0, steps, derive_seed(admitted.seed, purpose), train.batch_size)
    train_local(model, admitted.task, site.x_train, site.y_train, train, seed=0, device=device, schedule=schedule)


def _ditto(
    admitted: Admitted, model: nn.Module, received: dict[str, np.ndarray], device: torch.device
) -> dict[str, np.ndarray]:
    """Ditto's personal model: the site's own, trained as the round's local work with a pull towards the global one."""
    own = copy.deepcopy(model)
    kept = _kept(admitted, admitted.request.server_round) or received
    own.load_state_dict({k: torch.as_tensor(np.array(kept[k])) for k in received})
    anchor = {k: torch.as_tensor(received[k], device=device) for k, _ in own.named_parameters()}
    site, lam = admitted.site, admitted.request.experiment.personalization.ditto_lambda
    train_local(
        own, admitted.task, site.x_train, site.y_train, admitted.train,
        seed=derive_seed(admitted.seed, "ditto"), device=device, proximal_mu=lam, schedule=admitted.schedule,
        anchor=anchor,
    )  # fmt: skip
    return {k: v.detach().cpu().numpy().copy() for k, v in own.state_dict().items()}


@torch.no_grad()
def _score_personal(admitted: Admitted, model: nn.Module, device: torch.device) -> Metrics:
    x, y = admitted.evaluation_rows()
    logits = predict(model, x, device=device)
    measured = task_metrics(admitted.task, logits, torch.as_tensor(y, device=device))
    return {f"personal-{k}": v for k, v in measured.items()}


def personal_scores(admitted: Admitted, model: nn.Module, device: torch.device) -> Metrics:
    """The site's own model on the evaluation split, as ``personal-<metric>`` (nothing under personalization none).

    ``model`` holds the received global weights; it is changed. A DP evaluation release carries
    only the global model's counts, so a node that answers evaluation with DP adds nothing here.
    """
    config = admitted.request.experiment.personalization
    if config.method == "none" or admitted.private is not None:
        return {}
    kept = _kept(admitted, admitted.request.server_round + 1)
    if config.method in personal.SPLIT:
        personal.overlay(model, kept, personal.personal_names(model, config))
    elif config.method == "ditto" and kept:
        model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in kept.items()})
    elif config.method == "finetune":
        with torch.enable_grad():
            _local_steps(admitted, model, device, config.finetune_steps, "finetune")
    return _score_personal(admitted, model, device)


Params = dict[str, torch.Tensor]


def _scaffold_start(
    admitted: Admitted, model: nn.Module, device: torch.device
) -> tuple[Params, Params, Params, Params]:
    """(weights received, correction ``c - c_i``, ``c``, ``c_i``) for a SCAFFOLD round.

    Raises
    ------
    NodeError
        When the control variate does not fit the model or is not finite.
    """
    request = admitted.request
    assert request.control is not None
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    control = request.control
    if set(control) != set(params) or any(tuple(control[k].shape) != tuple(v.shape) for k, v in params.items()):
        raise NodeError("the SCAFFOLD control variate from the server does not fit the model's parameters")
    if not all(np.isfinite(v).all() for v in control.values()):
        raise NodeError("the SCAFFOLD control variate from the server has NaN or infinite values")
    held = NodeState(state_path(admitted.config, request.run_id)).kept_before(
        request.run_id, admitted.site.name, "control", request.server_round
    )
    c = {k: torch.as_tensor(np.array(v), dtype=params[k].dtype, device=device) for k, v in control.items()}
    c_i = (
        {k: torch.as_tensor(held[k], dtype=v.dtype, device=device) for k, v in params.items()}
        if held is not None and set(held) == set(params)
        else {k: torch.zeros_like(v, device=device) for k, v in params.items()}
    )
    return {k: v.to(device) for k, v in params.items()}, {k: c[k] - c_i[k] for k in params}, c, c_i


def _scaffold_end(
    admitted: Admitted, model: nn.Module, result: TrainResult, start: Params, _: Params, c: Params, c_i: Params
) -> TrainResult:
    """The site's new control variate ``c_i - c + (x - y) / (K lr)`` (option II) and its change."""
    scale = 1.0 / (max(result.steps, 1) * admitted.train.lr)
    trained = dict(model.named_parameters())
    new = {k: c_i[k] - c[k] + (start[k] - trained[k].detach()) * scale for k in start}
    control = {k: v.cpu().numpy() for k, v in new.items()}
    delta = {k: (new[k] - c_i[k]).cpu().numpy() for k in new}
    return replace(result, control=control, control_delta=delta)


@dataclass(frozen=True)
class Scored:
    """An evaluation at the node: its metrics, and the split's clinical statistics when the request asks.

    Before ``release_evaluate`` ``clinical`` holds every cell (it never leaves the node as such);
    after it, the JSON text of what the reply carries.
    """

    metrics: Metrics
    clinical: Any = None


def evaluate_step(admitted: Admitted, model: nn.Module, device: torch.device, batch_size: int = 1024) -> Scored:
    """The model on the node's own test (or validation) split: ``score`` of its logits."""
    x, y = admitted.evaluation_rows()
    logits = predict(model, x, device=device, batch_size=batch_size)
    return score(admitted, logits, torch.as_tensor(y, device=device))


#: In a DP evaluation release a row's loss counts at most this much (bounds one patient's influence).
LOSS_CLIP = 5.0


@torch.no_grad()
def score(admitted: Admitted, logits: torch.Tensor, labels: torch.Tensor) -> Scored:
    """What an evaluation measures: the task's loss and metrics, or for a DP release the test split's counts.

    With ``request.clinical``, also the split's clinical cells (``clinical_cells``), kept at the node
    until ``release_evaluate`` decides what leaves it.
    """
    task = admitted.task
    held = clinical_cells(admitted, logits, labels) if admitted.request.clinical else None
    if admitted.private is None:
        return Scored(task_metrics(task, logits, labels), held)
    if task.loss_fn is cross_entropy:
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    else:
        losses = torch.stack([task.loss_fn(logits[i : i + 1], labels[i : i + 1]) for i in range(len(labels))])
    correct = int((logits.argmax(dim=1) == labels).sum())
    counts = {"rows": len(labels), "correct": correct, "loss-sum": float(losses.clamp(0, LOSS_CLIP).sum())}
    return Scored(counts, held)


def clinical_cells(admitted: Admitted, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Every cell of the split (the whole split, each subgroup value), unsuppressed: for the node only.

    Subgroups come from the site's raw columns (``SiteData.split_groups``), named by the
    experiment's ``evaluate.clinical.subgroups``; levels default to the data contract's.
    """
    experiment = admitted.request.experiment
    settings = experiment.evaluate.clinical
    schema = admitted.site.schema
    out = outputs.detach().cpu().double().numpy()
    y = targets.detach().cpu().numpy()
    kind = clinical.outputs_kind(out, y, schema.target, schema.num_classes)
    if kind is None:
        return clinical.withheld("the model's outputs are neither class scores nor the targets' values")
    raw = admitted.site.split_groups(admitted.request.split)
    groups: dict[str, np.ndarray] = {}
    declared: dict[str, list[str] | None] = {}
    unavailable: dict[str, str] = {}
    for sub in settings.subgroups:
        if sub.column not in raw:
            unavailable[sub.label] = f"the site's data has no raw column {sub.column!r}"
            continue
        levels = clinical.subgroup_levels(sub.levels, run_contract(experiment), sub.column)
        groups[sub.label] = clinical.assign_values(raw[sub.column], sub.cuts, levels)
        declared[sub.label] = clinical.declared_values(sub.cuts, levels)
    cells = clinical.cell_statistics(out, y, kind=kind, groups=groups, threshold=settings.threshold, bins=settings.bins)
    return {"kind": kind, "cells": cells, "declared": declared, "unavailable": unavailable}


def run_contract(experiment: Experiment) -> Any:
    """The run's data contract (``None``: it has none), resolved once per experiment."""
    from flowerbed.tasks.data.catalog import resolve_contract

    try:
        return per_experiment("contract", experiment, lambda e: resolve_contract(e.data))
    except FlowerbedError:
        return None


def evaluation_releases(a: Admitted) -> int:
    """DP releases one evaluation makes: its counts, and the clinical statistics of a binary classifier."""
    schema = a.site.schema
    return 2 if a.request.clinical and schema.target == "class" and schema.num_classes == 2 else 1


def clinical_release(a: Admitted, held: dict[str, Any] | None) -> str | None:
    """What leaves the node of its clinical cells, as JSON text (``None``: not asked for).

    Without DP: the cells of at least ``min_count`` patients (the experiment's, never below the
    node's ``min-test-rows``), with secondary suppression (``clinical.suppress``). Under DP: a
    binary classifier's declared cells with Gaussian noise (``clinical.noisy_statistics``), at the
    evaluation's noise multiplier, charged as the evaluation's second release.
    """
    if held is None:
        return None
    if "withheld" in held:
        return clinical.to_text(held)
    settings = a.request.experiment.evaluate.clinical
    min_count = max(settings.min_count, a.config.test_rows_needed)
    unavailable = dict(held["unavailable"])
    noise = None
    if a.private is None:
        cells = clinical.suppress(held["cells"], min_count)
    elif held["kind"] != "binary":
        return clinical.to_text(clinical.withheld("under DP the node releases binary classifiers' statistics only"))
    else:
        declared = {g: v for g, v in held["declared"].items() if v is not None}
        for group in set(held["declared"]) - set(declared):
            unavailable[group] = "under DP only subgroups whose values are declared (cuts or levels) are released"
        kept = [c for c in held["cells"] if c["group"] == clinical.ALL or c["group"] in declared]
        noise = clinical.noise_std(a.private.plan.noise_multiplier, len(declared))
        seed = None if a.private.noise_seed is None else derive_seed(a.private.noise_seed, "clinical")
        cells = clinical.noisy_statistics(kept, declared, std=noise, min_count=min_count, seed=seed)
    if not cells:
        return clinical.to_text(clinical.withheld(f"the split has fewer patients than the minimum count ({min_count})"))
    statistics = clinical.release(
        held["kind"], cells, split=a.request.split, threshold=settings.threshold, bins=settings.bins,
        min_count=min_count, noise=noise,
    )  # fmt: skip
    if unavailable:
        statistics["unavailable"] = unavailable
    return clinical.to_text(statistics)


def noisy_metrics(counts: Metrics, noise_multiplier: float, seed: int | None) -> Metrics:
    """Loss, accuracy and size from a test split's counts with Gaussian noise (the DP evaluation release).

    Adding or removing one patient moves (rows, correct, loss-sum / LOSS_CLIP) by at most sqrt(3)
    in L2, so noise of standard deviation ``noise_multiplier * sqrt(3)`` on each is the Gaussian
    mechanism the ledger charges as (sigma, q = 1, one step).
    """
    rng = np.random.default_rng(seed)
    std = noise_multiplier * math.sqrt(3.0)
    rows, correct, loss = rng.normal([counts["rows"], counts["correct"], counts["loss-sum"] / LOSS_CLIP], std).tolist()
    n = max(1, round(rows))
    return {"loss": max(0.0, loss * LOSS_CLIP / n), "accuracy": min(1.0, max(0.0, correct / n)), "num-examples": n}


# ------------------------------------------------------------------------------------- release


def release_train(admitted: Sequence[Admitted], results: Sequence[TrainResult]) -> list[Metrics | Refusal]:
    """Charge every DP round (one transaction per ledger), then each reply's metrics, in order.

    A round that no longer fits the budget (another process spent it meanwhile) is refused and
    its update must be discarded.
    """
    out: list[Metrics | Refusal] = []
    by_ledger: dict[Path, list[int]] = {}
    _record_steps([a for a in admitted if a.schedule is not None])
    for i, (a, result) in enumerate(zip(admitted, results, strict=True)):
        if a.private is None:
            out.append({"num-examples": aggregation_weight(a, result), "train-loss": result.loss})
        else:
            out.append({})
            by_ledger.setdefault(a.private.ledger.path, []).append(i)
    for members in by_ledger.values():
        ledger = admitted[members[0]].private.ledger  # type: ignore[union-attr]
        charges = [_charge(admitted[i], results[i].steps) for i in members]
        budgets = [admitted[i].private.budget for i in members]  # type: ignore[union-attr]
        charged, histories = ledger.charge_batch(charges, budgets)
        for i, charge, outcome in zip(members, charges, charged, strict=True):
            private = admitted[i].private
            if isinstance(outcome, PrivacyBudgetExceeded):
                out[i] = refusal_for(outcome, admitted[i].site.name)
                continue
            epsilon = compose(histories[charge.dataset], private.delta, private.accountant)  # type: ignore[union-attr]
            weight = aggregation_weight(admitted[i], results[i])
            out[i] = {"num-examples": weight, "epsilon": epsilon, "delta": private.delta}  # type: ignore[union-attr]
    _keep_controls([(a, r) for a, r, o in zip(admitted, results, out, strict=True) if not isinstance(o, Refusal)])
    return out


def _keep_controls(released: list[tuple[Admitted, TrainResult]]) -> None:
    """Keep each released round's SCAFFOLD control variate and personal arrays at the node, before any reply."""
    for a, result in released:
        request = a.request
        for kind, arrays in (("control", result.control), (personal.KIND, result.personal)):
            if arrays is not None:
                NodeState(state_path(a.config, request.run_id), power_safe=not a.config.simulated).keep(
                    request.run_id, a.site.name, kind, request.server_round, arrays
                )


def _record_steps(admitted: list[Admitted]) -> None:
    """Note the rounds trained in steps, before any reply: the next round's iterator goes on from there."""
    by_state: dict[Path, list[Admitted]] = {}
    paths = _state_paths()
    for a in admitted:
        by_state.setdefault(paths(a), []).append(a)
    for path, members in by_state.items():
        state = NodeState(path, power_safe=not all(a.config.simulated for a in members))
        state.record(members[0].request.run_id, [(a.site.name, a.request.server_round) for a in members])


def aggregation_weight(admitted: Admitted, result: TrainResult) -> float:
    """What the node reports as ``num-examples`` (``train.weighting``).

    Its training rows, its steps, 1, or the task's ``weight_fn`` of the site's own data.

    Raises
    ------
    NodeError
        When the task's ``weight_fn`` is missing or gives anything but a finite positive number.
    """
    weighting = admitted.request.experiment.train.weighting
    if weighting == "steps":
        return result.steps
    if weighting == "uniform":
        return 1
    if weighting == "task":
        return task_weight(admitted.task, admitted.site)
    return result.num_examples


def task_weight(task: Task, site: SiteData) -> float:
    """``task.weight_fn(site)``, checked (see ``aggregation_weight``)."""
    if task.weight_fn is None:
        raise NodeError(f"train.weighting = 'task', but task {task.name!r} has no weight_fn")
    weight = task.weight_fn(site)
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        raise NodeError(f"task {task.name!r}: weight_fn gave {weight!r} for site {site.name}; it must be a number > 0")
    return float(weight)


def _charge(a: Admitted, steps: int) -> Charge:
    private = a.private
    assert private is not None
    return Charge(private.dataset, a.request.run_id, a.request.server_round, private.plan, steps, a.site.name)


def release_evaluate(admitted: Sequence[Admitted], scores: Sequence[Scored]) -> list[Scored | Refusal]:
    """Each node's evaluation reply: its metrics and ``num-examples``, or under DP noisy counts, charged first.

    The clinical statistics, when asked for, leave as ``clinical_release`` makes them (suppressed,
    or under DP noised and charged with the counts: one ledger entry of ``evaluation_releases`` steps).
    """
    out: list[Scored | Refusal] = []
    by_ledger: dict[Path, list[int]] = {}
    for i, (a, measured) in enumerate(zip(admitted, scores, strict=True)):
        if a.private is None:
            metrics = {**measured.metrics, "num-examples": len(a.evaluation_rows()[1])}
            out.append(Scored(metrics, clinical_release(a, measured.clinical)))
        else:
            out.append(Scored({}))
            by_ledger.setdefault(a.private.ledger.path, []).append(i)
    for members in by_ledger.values():
        ledger = admitted[members[0]].private.ledger  # type: ignore[union-attr]
        steps = [admitted[i].private.plan.steps_per_round for i in members]  # type: ignore[union-attr]
        charges = [_charge(admitted[i], k) for i, k in zip(members, steps, strict=True)]
        budgets = [admitted[i].private.budget for i in members]  # type: ignore[union-attr]
        for i, outcome in zip(members, ledger.charge_many(charges, budgets), strict=True):
            private = admitted[i].private
            assert private is not None
            if isinstance(outcome, PrivacyBudgetExceeded):
                out[i] = refusal_for(outcome, admitted[i].site.name)
            else:
                metrics = noisy_metrics(scores[i].metrics, private.plan.noise_multiplier, private.noise_seed)
                out[i] = Scored(metrics, clinical_release(admitted[i], scores[i].clinical))
    return out


def query_metrics(admitted: Admitted) -> Metrics:
    """What discovery reveals: the number of training examples, or nothing on a node that requires secure rounds."""
    if admitted.config.require_secure_aggregation:
        return {}
    return {"num-examples": admitted.site.num_train}
