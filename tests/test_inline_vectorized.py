"""Vectorized cohorts give the ClientApp's answers: same weights, losses and reply Messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.client.app import app as client_app
from flowerbed.client.training import train_local
from flowerbed.experiment import DataConfig, PartitionConfig, TrainConfig
from flowerbed.protocol import EXPERIMENT_KEY, RUN_ID_KEY
from flowerbed.simulations.cohort.stacked_net import StackedNet
from flowerbed.simulations.cohort.vectorized import check_functional, masked_grads, stack_cohort, train_cohort
from flowerbed.simulations.engine.cohort_handler import CohortHandler
from flowerbed.simulations.engine.inline_grid import InlineGrid
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.tasks.task import SiteData
from flowerbed.weights import load_safetensors

CPU = torch.device("cpu")


def _digits_sites(num_clients: int = 8):
    data = DataConfig(
        dataset="digits", num_classes=10, partition=PartitionConfig(kind="dirichlet", num_clients=num_clients)
    )
    return load_federation(data, 0)


def _compare_with_train_local(
    task_name: str, sites, train: TrainConfig, args: dict | None = None, *, batched_kernels: bool = True
) -> None:
    task = resolve_task(task_name, args or {})
    model = task.build_model(sites[0].schema, seed=1)
    names = check_functional(model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seeds = [1000 + i for i in range(len(sites))]
    cohort = stack_cohort([s.x_train for s in sites], [s.y_train for s in sites], CPU)
    result = train_cohort(model, task.loss_fn, cohort, weights, train, seeds, batched_kernels=batched_kernels)
    for j, site in enumerate(sites):
        ref = task.build_model(site.schema)
        ref.load_state_dict(weights)
        expected = train_local(ref, task, site.x_train, site.y_train, train, seed=seeds[j], device=CPU)
        assert result.steps[j] == expected.steps
        assert result.loss[j] == pytest.approx(expected.loss, rel=1e-5, abs=1e-6)
        for name in names:
            got = result.params[name][j]
            assert torch.allclose(got, ref.state_dict()[name], atol=1e-5, rtol=0), (site.name, name)


@pytest.mark.parametrize("batched_kernels", [True, False], ids=["padded-stacked-net", "vmap-per-batch-size"])
def test_cnn_cohort_of_ragged_digits_clients_equals_train_local(batched_kernels):
    sites = _digits_sites()
    assert len({s.num_train for s in sites}) > 3  # ragged: several dataset sizes, short last batches
    train = TrainConfig(local_epochs=2, batch_size=16, lr=0.05, momentum=0.9)
    _compare_with_train_local("image-cnn", sites, train, batched_kernels=batched_kernels)


@pytest.mark.parametrize("batched_kernels", [True, False], ids=["padded-stacked-net", "vmap-per-batch-size"])
@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("adam", 0.0)])
def test_mlp_cohort_of_heart_sites_equals_train_local(optimizer, momentum, batched_kernels):
    sites = load_federation(DataConfig(), 0)
    train = TrainConfig(local_epochs=2, batch_size=16, lr=0.01, optimizer=optimizer, momentum=momentum)
    _compare_with_train_local("tabular-mlp", sites, train, {"hidden": 64}, batched_kernels=batched_kernels)


def test_stacked_net_gives_each_clients_own_logits():
    """Every client's logits from stacked weights are its own model's (CNN, MLP, logistic regression)."""
    gen = torch.Generator().manual_seed(0)
    for task_name, schema, args in [
        ("image-cnn", _digits_sites(2)[0].schema, {"channels": 4}),
        ("tabular-mlp", load_federation(DataConfig(), 0)[0].schema, {"hidden": [8, 5]}),
        ("tabular-logreg", load_federation(DataConfig(), 0)[0].schema, {}),
    ]:
        task = resolve_task(task_name, args)
        models = [task.build_model(schema, seed=s) for s in range(3)]
        names = [n for n, _ in models[0].named_parameters()]
        params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
        x = torch.randn((3, 7, *schema.input_shape), generator=gen)
        logits = StackedNet(models[0]).forward(params, x)
        for j, model in enumerate(models):
            with torch.no_grad():
                expected = model(x[j])
            assert torch.allclose(logits[j], expected, atol=1e-5, rtol=1e-5), (task_name, j)


def _message(kind: str, experiment_json: str, arrays: ArrayRecord, node_id: int, server_round: int = 1) -> Message:
    config = ConfigRecord({EXPERIMENT_KEY: experiment_json, RUN_ID_KEY: "run-x", "server-round": server_round})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=node_id, message_type=kind)


def _contexts(num: int) -> list[Context]:
    """The virtual nodes of an in-process grid (which also sets Flower's task identity)."""
    return list(InlineGrid(client_app, num).contexts.values())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as Ray gives each of Flower's virtual nodes (fast on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_replies_are_the_messages_the_client_app_builds(heart_experiment):
    experiment = heart_experiment("train.momentum=0.5")
    text = json.dumps(experiment.to_dict())
    task = resolve_task(experiment.task.name, experiment.task.args)
    model = task.build_model(load_federation(experiment.data, experiment.seed)[0].schema, seed=3)
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    contexts = _contexts(4)
    handler = CohortHandler(client_app)
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        # Every message of one push carries the same record, as FedAvg builds them.
        content = _message(kind, text, arrays, contexts[0].node_id).content
        messages = [Message(content, dst_node_id=c.node_id, message_type=kind) for c in contexts]
        fast = handler(list(zip(messages, contexts, strict=True)))
        slow = [client_app(m, c) for m, c in zip(messages, contexts, strict=True)]
        for a, b in zip(fast, slow, strict=True):
            assert set(a.content.keys()) == set(b.content.keys())
            assert a.metadata.reply_to_message_id == b.metadata.reply_to_message_id
            assert a.metadata.message_type == b.metadata.message_type == kind
            assert dict(a.content["site"]) == dict(b.content["site"])
            ma, mb = dict(a.content["metrics"]), dict(b.content["metrics"])
            assert set(ma) == set(mb) and ma["num-examples"] == mb["num-examples"]
            for key in ma:
                assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), key
            if kind == MessageType.TRAIN:
                for key in b.content["arrays"]:
                    fa, fb = a.content["arrays"][key].numpy(), b.content["arrays"][key].numpy()
                    assert fa.dtype == fb.dtype and fa.shape == fb.shape
                    assert np.allclose(fa, fb, atol=1e-6, rtol=0)
    assert handler.stats == {"vectorized": 8, "sequential": 0}


def test_other_message_types_and_user_tasks_go_to_the_client_app(heart_experiment):
    seen: list[str] = []
    app = ClientApp()

    @app.train("secagg_setup")
    def setup(message: Message, context: Context) -> Message:
        seen.append(message.metadata.message_type)
        return Message(RecordDict(), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        seen.append(message.metadata.message_type)
        return Message(RecordDict(), reply_to=message)

    contexts = _contexts(4)
    handler = CohortHandler(app)
    experiment = heart_experiment()
    text = json.dumps(experiment.to_dict())
    arrays = ArrayRecord({"w": torch.zeros(2)})
    first = _message("train.secagg_setup", text, arrays, contexts[0].node_id)
    pairs = [(Message(first.content, dst_node_id=c.node_id, message_type="train.secagg_setup"), c) for c in contexts]
    handler(pairs)
    user = json.loads(text)
    user["task"] = {"name": "my_pkg.tasks:custom", "args": {}, "device": "cpu"}
    first = _message(MessageType.TRAIN, json.dumps(user), arrays, contexts[0].node_id)
    handler([(Message(first.content, dst_node_id=c.node_id, message_type=MessageType.TRAIN), c) for c in contexts])
    assert seen == ["train.secagg_setup"] * 4 + ["train"] * 4
    assert handler.stats == {"vectorized": 0, "sequential": 8}


def test_a_cohort_with_labels_its_kernels_cannot_take_goes_to_the_client_app(heart_experiment, monkeypatch):
    """The two-class loss reads labels as 0 or 1: another label sends the cohort to the ClientApp, whose loss raises."""
    from flowerbed.client import node_round

    experiment = heart_experiment()
    site = load_federation(experiment.data, experiment.seed)[0]
    bad = SiteData(site.name, site.x_train, site.y_train.copy(), site.x_test, site.y_test, site.schema)
    bad.y_train[3] = 2
    monkeypatch.setattr(node_round, "resolve_site", lambda config, experiment: bad)
    task = resolve_task(experiment.task.name, experiment.task.args)
    arrays = ArrayRecord({k: v.detach() for k, v in task.build_model(site.schema, seed=3).state_dict().items()})
    contexts = _contexts(2)
    handler = CohortHandler(client_app)
    content = _message(MessageType.TRAIN, json.dumps(experiment.to_dict()), arrays, contexts[0].node_id).content
    with pytest.raises(IndexError, match="out of bounds"):  # the node's own training refuses such a label
        handler([(Message(content, dst_node_id=c.node_id, message_type=MessageType.TRAIN), c) for c in contexts])
    assert handler.stats["vectorized"] == 0  # never trained silently on a label the two-class loss misreads


def test_inline_vectorized_run_equals_sequential_inline_run(heart_experiment):
    base = ("rounds=2", "train.momentum=0.9", "evaluate.central=false")
    fast = simulate(heart_experiment(*base), quiet=True)
    slow = simulate(heart_experiment(*base, "backend.vectorize=false"), quiet=True)
    a, b = load_safetensors(fast / "model.safetensors"), load_safetensors(slow / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-5, rtol=0), key


def test_secure_aggregation_rounds_run_the_protocol_through_the_client_app(heart_experiment):
    """Secure-aggregation stages are custom message types: the ClientApp answers them, one by one."""
    base = ("rounds=1", "evaluate.central=false", "evaluate.federated=false")
    plain = simulate(heart_experiment(*base), quiet=True)
    secure = simulate(heart_experiment(*base, "secagg.enabled=true"), quiet=True)
    a, b = load_safetensors(plain / "model.safetensors"), load_safetensors(secure / "model.safetensors")
    for key in a:  # equal up to the protocol's quantization step (2 * clip_range / 2^16)
        assert np.allclose(a[key], b[key], atol=1e-3, rtol=0), key


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("ragged", [False, True])
def test_hand_written_mlp_gradients_equal_autograd(ragged, classes, monkeypatch):
    """``mlp_grads`` (no autograd) gives every client the gradient and loss autograd gives."""
    from flowerbed.simulations.cohort import vectorized

    torch.manual_seed(0)
    k, width, features = 5, 7, 13
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
    )
    net = StackedNet(model)
    assert net.is_mlp
    params = {name: torch.randn(k, *p.shape) for name, p in model.named_parameters()}
    x, y = torch.randn(k, width, features) * 4, torch.randint(0, classes, (k, width))
    counts = torch.tensor([7, 3, 7, 1, 5]) if ragged else torch.full((k,), width)
    results = []
    for hand_written in (True, False):
        monkeypatch.setattr(vectorized, "HAND_WRITTEN_MLP", hand_written)
        results.append(vectorized.masked_grads(net, params, x, y, counts))
    (grads, loss), (reference, reference_loss) = results
    assert torch.allclose(loss, reference_loss, atol=1e-6)
    for name in params:
        assert torch.allclose(grads[name], reference[name], atol=1e-6), name


@pytest.mark.parametrize("ragged", [False, True])
def test_a_fused_sgd_step_equals_the_gradients_then_the_step(ragged):
    """``masked_sgd_step`` moves every client's weights as ``masked_grads`` then ``w -= lr * grad`` do."""
    from flowerbed.simulations.cohort.vectorized import masked_sgd_step, stacked

    torch.manual_seed(0)
    k, width = 5, 7
    model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    net = StackedNet(model)
    weights = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    params = stacked(weights, k, wide_last=True)
    assert not params["0.weight"].is_contiguous() and params["2.weight"].is_contiguous()  # 13 -> 64 kept [in, out]
    assert all(torch.equal(params[name][3], w) for name, w in weights.items())
    for p in params.values():
        p.add_(torch.randn(p.shape), alpha=0.1)  # every client its own weights
    reference = {name: p.clone() for name, p in params.items()}
    x, y = torch.randn(k, width, 13) * 2, torch.randint(0, 2, (k, width))
    counts = torch.tensor([7, 3, 7, 1, 5]) if ragged else torch.full((k,), width)
    grads, loss = masked_grads(net, reference, x, y, counts)
    fused_loss = masked_sgd_step(net, params, x, y, counts, 0.1, full=not ragged)
    assert torch.allclose(fused_loss, loss, atol=1e-6)
    for name, p in params.items():
        assert torch.allclose(p, reference[name] - 0.1 * grads[name], atol=1e-6), name
