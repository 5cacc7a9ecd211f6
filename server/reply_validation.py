"""Server-side checks on every training reply before it can touch the global model."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message


def reply_site(message: Message, fallback: str) -> str:
    """The site name a reply carries (``"site"`` ConfigRecord), else ``fallback``."""
    if message.has_content() and "site" in message.content.config_records:
        return str(message.content.config_records["site"].get("name", fallback))
    return fallback


def validate_train_reply(message: Message, reference: dict[str, np.ndarray]) -> str | None:
    """Why a training reply must be rejected, or None if it is sound.

    Checks: exactly one ArrayRecord whose keys, shapes and dtypes match the global model, finite
    values, and a positive ``num-examples`` in the MetricRecord.
    """
    content = message.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    examples = metrics.get("num-examples")
    if not isinstance(examples, int | float) or not np.isfinite(examples) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    arrays: ArrayRecord = next(iter(content.array_records.values()))
    if set(arrays.keys()) != set(reference):
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        return f"weights do not match the model (missing {missing}, unexpected {extra})"
    for key, expected in reference.items():
        array = arrays[key].numpy()
        if array.shape != expected.shape:
            return f"{key}: shape {array.shape}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return f"{key}: dtype {array.dtype}, expected {expected.dtype}"
        if not np.all(np.isfinite(array)):
            return f"{key}: contains NaN or infinite values"
    return None
