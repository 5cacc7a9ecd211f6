"""Clipping and quantization of updates for secure summation, and the inverse on the sum.

A node turns its float update ``u`` and weight ``w`` into one integer vector

    ``[W * q(u_0), ..., W * q(u_{d-1}), W, out_of_range]``

with ``q(x) = round(clip(x, -c, c) / step)`` in ``[-L, L]`` and
``W = round(w / weight_resolution)``.
The coordinator sums these vectors modulo ``2**modulus_bits`` and reads the sum back as signed
integers: ``SecAggParams.required_bits`` guarantees the true sum never wraps, so the decoded sum
is exact. Values outside ``[-c, c]`` are clipped *and counted*; the count travels inside the
masked vector, so the coordinator learns only the total over all nodes.
"""

from __future__ import annotations

import math
import os

import numpy as np

from flowerbed.exception import SecureAggregationError
from flowerbed.privacy.secagg.chunks import chunk_words, for_each_range
from flowerbed.privacy.secagg.crypto import KEY_BYTES, keystream_encryptor
from flowerbed.privacy.secagg.params import SecAggParams

_TWO32 = float(1 << 32)


def quantize(
    update: np.ndarray,
    *,
    clip_range: float,
    levels: int,
    stochastic: bool,
    factor: int = 1,
    out: np.ndarray | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, int]:
    """Clip to ``[-clip_range, clip_range]``, quantize to integers in ``[-levels, levels]``, times ``factor``.

    Parameters
    ----------
    update : numpy.ndarray
        Finite floats (any shape; flattened).
    clip_range : float
        Clipping bound ``c``.
    levels : int
        ``L``; the step is ``c / L``.
    stochastic : bool
        Round up with probability equal to the fractional part (unbiased, error < 1 step), using
        ``os.urandom``-keyed AES-CTR randomness; otherwise round to nearest (error <= 1/2 step).
    factor : int (default: 1)
        Every quantized entry is multiplied by it (a node's integer weight).
    out : numpy.ndarray or None (default: None)
        An int64 vector of the update's length to write into.
    workers : int or None (default: None)
        Threads (``secagg_chunks.default_workers()`` by default).

    Returns
    -------
    (numpy.ndarray of int64, int)
        ``factor`` times the quantized entries, and how many entries were outside the clipping range.
    """
    x = np.asarray(update).ravel()
    if out is None:
        out = np.empty(x.size, dtype=np.int64)
    key = os.urandom(KEY_BYTES) if stochastic else b""
    chunk = chunk_words(8)
    bound = float(levels) * _TWO32

    def quantize_range(lo: int, hi: int) -> int:
        # stochastic: floor(x / step + u) with u = word / 2**32, in float64: x / step is scaled by
        # 2**32 (exact), the uniform uint32 word added, the sum scaled back and floored.
        words = keystream_encryptor(key, lo * 4) if stochastic else None
        zeros = memoryview(bytes(min(chunk, hi - lo) * 4))
        buffer = bytearray(len(zeros) + 15)  # update_into wants room for one more AES block
        count = 0
        for start in range(lo, hi, chunk):
            piece = x[start : min(hi, start + chunk)]
            count += int(np.count_nonzero(np.abs(piece) > clip_range))
            if words is not None:
                scaled = np.multiply(piece, levels / clip_range * _TWO32, dtype=np.float64)
                np.clip(scaled, -bound, bound, out=scaled)
                words.update_into(zeros[: piece.size * 4], buffer)
                np.add(scaled, np.frombuffer(buffer, dtype=np.uint32, count=piece.size), out=scaled)
                np.multiply(scaled, 1.0 / _TWO32, out=scaled)
                np.floor(scaled, out=scaled)
                np.minimum(scaled, levels, out=scaled)
            else:
                scaled = np.multiply(piece, levels / clip_range, dtype=np.float64)
                np.clip(scaled, -levels, levels, out=scaled)
                np.rint(scaled, out=scaled)
            target = out[start : start + piece.size]
            np.copyto(target, scaled, casting="unsafe")
            if factor != 1:
                np.multiply(target, factor, out=target)  # in int64: exact for any weight within max_weight
        return count

    counts = for_each_range(x.size, 8, quantize_range, workers)
    return out, int(sum(counts))


def weight_units(weight: float, params: SecAggParams, node_id: int | str = "?") -> int:
    """The integer weight ``round(weight / weight_resolution)``, checked against ``max_weight``.

    Raises
    ------
    SecureAggregationError
        If the weight is negative, not finite or above ``secagg.max_weight``.
    """
    if not math.isfinite(weight) or weight < 0:
        raise SecureAggregationError(f"node {node_id}: weight {weight} must be a finite number >= 0")
    units = round(weight / params.weight_resolution)
    if units > params.max_weight_units:
        raise SecureAggregationError(
            f"node {node_id}: weight {weight:g} exceeds secagg.max_weight = {params.max_weight:g}; "
            "raise secagg.max_weight in the experiment (costs modulus bits)"
        )
    return int(units)


def encode_input(
    update: np.ndarray, weight: float, params: SecAggParams, node_id: int | str = "?"
) -> tuple[np.ndarray, int]:
    """A node's integer vector (dtype ``params.dtype``) and its out-of-range count.

    Raises
    ------
    SecureAggregationError
        If the update has the wrong length or non-finite entries, or the weight is invalid.
    """
    flat = np.asarray(update).ravel()
    if flat.size != params.dimension:
        raise SecureAggregationError(
            f"node {node_id}: update has {flat.size} entries, the round expects "
            f"{params.dimension} (same model on every node?)"
        )
    if not np.all(np.isfinite(flat)):
        raise SecureAggregationError(
            f"node {node_id}: update has NaN or infinite entries; training diverged (lower the learning rate)"
        )
    units = weight_units(weight, params, node_id)
    vector = np.empty(params.vector_length, dtype=params.dtype)
    body = vector[: params.dimension]
    quantize_args = {
        "clip_range": params.clip_range,
        "levels": params.levels,
        "stochastic": params.stochastic_rounding,
        "factor": units,
    }
    if params.modulus_bits == 64:
        _, out_of_range = quantize(flat, out=body.view(np.int64), **quantize_args)  # two's complement = mod 2**64
    else:
        q, out_of_range = quantize(flat, **quantize_args)
        body[:] = q.astype(np.uint32)  # keeps the low 32 bits: mod 2**32
    vector[params.dimension] = units
    vector[params.dimension + 1] = out_of_range
    return vector, out_of_range


def decode_sum(total: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, float, int]:
    """Read an unmasked modular sum back as ``(sum_i w_i * u_i, sum_i w_i, out_of_range)``.

    The first entry is float64 of length ``params.dimension``; the weight sum is in the same
    units as the nodes' weights.
    """
    signed = total.view(np.int32 if params.modulus_bits == 32 else np.int64)
    scale = params.step * params.weight_resolution
    weighted_sum = signed[: params.dimension].astype(np.float64) * scale
    total_weight = float(signed[params.dimension]) * params.weight_resolution
    out_of_range = int(signed[params.dimension + 1])
    return weighted_sum, total_weight, out_of_range
