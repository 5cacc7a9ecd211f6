"""Server-side checks on every training reply before it can touch the global model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from flowerbed.weights import array_view


def reply_site(message: Message, fallback: str) -> str:
    """The site name a reply carries (``"site"`` ConfigRecord), else ``fallback``."""
    if message.has_content():
        record = message.content.get("site")  # one lookup: ``config_records`` copies every record
        if isinstance(record, ConfigRecord):
            return str(record.get("name", fallback))
    return fallback


def _all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite: a finite sum proves it; otherwise check element by element."""
    if array.dtype.kind not in "fc":
        return True
    with np.errstate(all="ignore"):
        if np.isfinite(array.sum(dtype=np.float64)):
            return True
    return bool(np.isfinite(array).all())


def validate_train_reply(
    message: Message,
    reference: dict[str, np.ndarray],
    *,
    max_examples: float = float("inf"),
    max_update_norm: float | None = None,
    extra: Mapping[str, dict[str, np.ndarray]] | None = None,
) -> str | None:
    """Why a training reply must be rejected, or None if it is sound.

    Checks: one ArrayRecord whose keys, shapes and dtypes match the global model, finite values, a
    positive ``num-examples`` of at most ``max_examples`` in the MetricRecord, and an update (new
    weights minus ``reference``) whose L2 norm is at most ``max_update_norm``. ``extra`` names the
    other ArrayRecords the strategy expects (SCAFFOLD's control-variate change), each checked for
    its keys, shapes, dtypes and finite values.
    """
    extra = extra or {}
    named = {name: r for name, r in message.content.items() if isinstance(r, ArrayRecord)}
    metric_records = [r for r in message.content.values() if isinstance(r, MetricRecord)]
    if len(named) != 1 + len(extra) or any(name not in named for name in extra):
        wanted = " plus " + ", ".join(sorted(extra)) if extra else ""
        return f"expected one ArrayRecord{wanted}, got {sorted(named)}"
    array_records = [r for name, r in named.items() if name not in extra]
    if len(metric_records) != 1:
        return f"expected one MetricRecord, got {len(metric_records)}"
    examples = metric_records[0].get("num-examples")
    if not isinstance(examples, int | float) or not np.isfinite(examples) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    if examples > max_examples:
        return f"num-examples = {examples:g} is more than this site may claim ({max_examples:g})"
    arrays = array_records[0]
    if arrays.keys() != reference.keys():
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        return f"weights do not match the model (missing {missing}, unexpected {extra})"
    try:
        return _arrays_problem(arrays, reference, named, extra, max_update_norm)
    except (ValueError, TypeError, EOFError, MemoryError) as exc:  # bytes that are no array: the node is refused
        return f"its arrays do not read ({type(exc).__name__})"


def _arrays_problem(
    arrays: ArrayRecord,
    reference: dict[str, np.ndarray],
    named: dict[str, ArrayRecord],
    extra: dict[str, dict[str, np.ndarray]],
    max_update_norm: float | None,
) -> str | None:
    """The checks of ``validate_train_reply`` that read the arrays' bytes."""
    for key, expected in reference.items():
        array = array_view(arrays[key])
        if array.shape != expected.shape:
            return f"{key}: shape {array.shape}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return f"{key}: dtype {array.dtype}, expected {expected.dtype}"
    norm = update_norm(arrays, reference)
    if not np.isfinite(norm):  # a finite norm proves every value finite; otherwise say which it is
        for key in reference:
            if not _all_finite(array_view(arrays[key])):
                return f"{key}: contains NaN or infinite values"
    if max_update_norm is not None and not norm <= max_update_norm:
        return f"update norm {norm:.3g} exceeds train.max_update_norm = {max_update_norm:g}"
    for name, expected_arrays in extra.items():
        problem = _record_problem(named[name], expected_arrays, name)
        if problem:
            return problem
    return None


def _record_problem(record: ArrayRecord, expected: dict[str, np.ndarray], name: str) -> str | None:
    """Why an extra ArrayRecord does not fit (keys, shapes, dtypes, finite values), or None."""
    if record.keys() != expected.keys():
        return f"{name}: arrays do not match the model's parameters"
    for key, ref in expected.items():
        array = array_view(record[key])
        if array.shape != ref.shape or array.dtype != ref.dtype:
            return f"{name}: {key} has shape {array.shape} and dtype {array.dtype}, expected {ref.shape} {ref.dtype}"
        if not _all_finite(array):
            return f"{name}: {key} contains NaN or infinite values"
    return None


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (reply weights - reference), in the weights' own precision.

    A norm too large for it (3e38 float32 weights) comes out infinite, which no bound admits.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for key, expected in reference.items():
            if expected.dtype.kind not in "fc":
                continue
            diff = (array_view(arrays[key]) - expected).ravel()
            total += float(np.dot(diff, diff))
    return float(np.sqrt(total))
