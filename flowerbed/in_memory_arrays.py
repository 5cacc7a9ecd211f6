"""Arrays that stay in memory: what an inline node replies with instead of serialized bytes.

Flower's ``Array`` holds ``.npy`` bytes, which every reader parses again (the server's reply
checks and the strategy's aggregation each do). An inline reply, or the global model sent on an
in-process grid, never leaves the process, so ``InMemoryArray`` keeps the ndarray: ``numpy()``
returns a copy of it, and ``data`` (the ``.npy`` bytes) is produced only if something asks for
it. Dtype, shape, values and equality are those of the ``Array`` the ClientApp would have built.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from flowerbed.flower_internals import init_numpy_array, record_data


class InMemoryArray(Array):
    """An ``Array`` backed by an ndarray in this process (no serialization unless asked).

    Parameters
    ----------
    ndarray : np.ndarray
        The values; the array keeps a reference and hands out copies.
    """

    def __init__(self, ndarray: np.ndarray) -> None:
        init_numpy_array(self, str(ndarray.dtype), tuple(ndarray.shape))
        self._ndarray = ndarray

    @property
    def data(self) -> bytes:  # type: ignore[override]
        """The ``.npy`` bytes, as ``Array.from_numpy_ndarray`` would store them."""
        buffer = BytesIO()
        np.save(buffer, self._ndarray, allow_pickle=False)
        return buffer.getvalue()

    def numpy(self) -> np.ndarray:
        """A copy of the values."""
        return self._ndarray.copy()

    def readonly_view(self) -> np.ndarray:
        """The values without a copy, read-only (the server's reply checks only read them)."""
        view = self._ndarray.view()
        view.flags.writeable = False
        return view

    def __reduce__(self):
        """Pickle (Ray) as an ordinary serialized ``Array``."""
        return Array.from_numpy_ndarray, (self._ndarray,)


def in_memory_record(tensors: dict[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``InMemoryArray``, in the given key order.

    Tensors are copied to the CPU; ndarrays are kept as given (the caller hands over arrays that
    nothing else writes to, e.g. rows of one stacked copy made for a whole cohort).
    """
    record = ArrayRecord()  # filled directly: the constructor would re-serialize every array
    data = record_data(record)  # str keys and Array values, which ArrayRecord's checks accept
    for name, values in tensors.items():
        array = values if isinstance(values, np.ndarray) else values.detach().cpu().numpy().copy()
        data[str(name)] = InMemoryArray(array)
    return record


def stacked_numpy(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One CPU copy of a cohort's stacked weights; ``[row]`` of each is then a client's array (a view)."""
    return {name: np.array(t.detach().cpu().numpy(), order="C", copy=True) for name, t in params.items()}
