"""The ClientApp: a hospital node's side of every round (Flower Message API).

The handlers live in ``flowerbed.client.handlers`` (plain rounds) and
``flowerbed.client.secagg_handlers`` (the secure train phase); both run the node's one round,
``flowerbed.client.node_round``. The node trains only on the data its own configuration names.
A request that came packed over the network is unpacked before any handler sees it, and the reply
is packed the same way (``handlers.packed_arrays_mod``).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from flowerbed.client import handlers, secagg_handlers

app = ClientApp(mods=[handlers.packed_arrays_mod])
app.query()(handlers.query)
app.train()(handlers.train)
app.evaluate()(handlers.evaluate)
for _action, _handler in secagg_handlers.HANDLERS.items():
    app.train(_action)(_handler)
