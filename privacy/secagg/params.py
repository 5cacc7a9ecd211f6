"""Secure-aggregation parameters with safe defaults derived from the number of nodes.

Every number that both sides must agree on lives in one frozen ``SecAggParams``: the neighbour
graph's degree, the Shamir threshold, the clipping range, the quantization levels, the largest
weight a node may carry and the modulus. The modulus is the smallest machine width (2**32 or 2**64)
above ``2**required_bits``, where ``required_bits`` is chosen so that the sum of ``num_nodes``
clipped, quantized, weighted updates can never wrap.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flowerbed.exception import ConfigError

DEFAULT_CLIP_RANGE = 8.0
DEFAULT_QUANTIZATION_BITS = 16
DEFAULT_MAX_WEIGHT = float(1 << 20)
"""Largest weight (number of examples) one node may carry by default: about a million."""


def default_neighbours(num_nodes: int) -> int:
    """Degree of the neighbour graph: everyone up to 12 nodes, then ``2 * ceil(1.5 * log2 n)``.

    Logarithmic degree is what makes SecAgg+ cheaper than SecAgg (Bell et al. 2020): each node
    masks with and shares secrets among its neighbours only. 10 nodes -> 9, 50 -> 18, 100 -> 20,
    1000 -> 30.
    """
    if num_nodes <= 12:
        return max(num_nodes - 1, 1)
    return min(num_nodes - 1, 2 * math.ceil(1.5 * math.log2(num_nodes)))


def default_threshold(neighbours: int) -> int:
    """Shamir threshold: a strict majority of a neighbourhood (the node and its neighbours)."""
    return (neighbours + 1) // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Everything the nodes and the coordinator agree on for one secure round.

    Parameters
    ----------
    num_nodes : int
        Nodes sampled for the round (>= 2).
    dimension : int
        Length of the flattened update vector.
    neighbours : int
        Degree ``k`` of the neighbour graph; a node masks with and shares its secrets among its
        ``k`` neighbours. ``num_nodes - 1`` is the complete graph (classic SecAgg).
    threshold : int
        Shamir threshold ``t``: shares needed to rebuild a node's secrets, out of its ``k + 1``
        holders (itself and its neighbours). Must be a strict majority of ``k + 1``.
    clip_range : float (default: 8.0)
        Update entries are clipped to ``[-clip_range, clip_range]``; entries outside are counted.
    quantization_bits : int (default: 16)
        Entries become integers in ``[-L, L]`` with ``L = 2**(bits - 1) - 1``.
    max_weight : float (default: 2**20)
        Largest weight (e.g. number of examples) a node may carry; a larger one is refused.
    weight_resolution : float (default: 1.0)
        Weights are summed as integer multiples of this (1.0: example counts are exact).
    stochastic_rounding : bool (default: True)
        Unbiased stochastic rounding (error < one step) instead of nearest (error <= half a step).
    """

    num_nodes: int
    dimension: int
    neighbours: int
    threshold: int
    clip_range: float = DEFAULT_CLIP_RANGE
    quantization_bits: int = DEFAULT_QUANTIZATION_BITS
    max_weight: float = DEFAULT_MAX_WEIGHT
    weight_resolution: float = 1.0
    stochastic_rounding: bool = True

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("secagg", problems)

    def problems(self) -> list[str]:
        """Every inconsistency, one line each, naming the ``secagg`` key and the fix."""
        out = []
        if self.num_nodes < 2:
            out.append(f"num_nodes = {self.num_nodes}: secure aggregation needs at least 2 nodes")
        if self.dimension < 1:
            out.append(f"dimension = {self.dimension} must be >= 1")
        if not 1 <= self.neighbours <= max(self.num_nodes - 1, 1):
            out.append(
                f"secagg.neighbours = {self.neighbours} must be between 1 and num_nodes - 1 = {self.num_nodes - 1}"
            )
        elif self.neighbours % 2 and self.neighbours != self.num_nodes - 1:
            out.append(
                f"secagg.neighbours = {self.neighbours} must be even (a ring graph) unless it is "
                f"num_nodes - 1 = {self.num_nodes - 1} (everyone); use {self.neighbours + 1}"
            )
        holders = self.neighbours + 1
        if not 2 <= self.threshold <= holders:
            out.append(
                f"secagg.threshold = {self.threshold} must be between 2 and neighbours + 1 = "
                f"{holders} (e.g. {default_threshold(self.neighbours)})"
            )
        elif 2 * self.threshold <= holders:
            out.append(
                f"secagg.threshold = {self.threshold} must be a strict majority of the "
                f"{holders} share holders (> {holders / 2:g}), or a coordinator could rebuild "
                f"both secrets of one node; use {default_threshold(self.neighbours)}"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            out.append(f"secagg.clip_range = {self.clip_range} must be a finite number > 0")
        if not 2 <= self.quantization_bits <= 30:
            out.append(f"secagg.quantization_bits = {self.quantization_bits} must be 2 to 30")
        if not (math.isfinite(self.weight_resolution) and self.weight_resolution > 0):
            out.append(f"secagg.weight_resolution = {self.weight_resolution} must be > 0")
        elif not (math.isfinite(self.max_weight) and self.max_weight >= self.weight_resolution):
            out.append(f"secagg.max_weight = {self.max_weight} must be >= weight_resolution ({self.weight_resolution})")
        if not out and self.required_bits > 64:
            out.append(
                f"the sum needs {self.required_bits} bits (> 64): lower secagg.quantization_bits "
                f"or secagg.max_weight, or sample fewer nodes"
            )
        return out

    @property
    def levels(self) -> int:
        """``L``: quantized entries lie in ``[-L, L]``."""
        return (1 << (self.quantization_bits - 1)) - 1

    @property
    def step(self) -> float:
        """Quantization step ``clip_range / L``."""
        return self.clip_range / self.levels

    @property
    def max_weight_units(self) -> int:
        """Largest integer weight ``max_weight / weight_resolution``."""
        return max(math.floor(self.max_weight / self.weight_resolution + 1e-9), 1)

    @property
    def vector_length(self) -> int:
        """Entries of a masked vector: the update, the weight, the out-of-range count."""
        return self.dimension + 2

    @property
    def required_bits(self) -> int:
        """Smallest ``b`` with every possible sum in ``[-2**(b-1), 2**(b-1))``: never wraps."""
        bound = max(
            self.num_nodes * self.max_weight_units * self.levels,
            self.num_nodes * self.dimension,
        )
        return (2 * bound).bit_length()

    @property
    def modulus_bits(self) -> int:
        """Arithmetic is modulo ``2**modulus_bits`` (32 or 64, >= ``required_bits``)."""
        return 32 if self.required_bits <= 32 else 64

    @property
    def dtype(self) -> np.dtype:
        """Unsigned integer type whose wrap-around is the modulus."""
        return np.dtype(np.uint32 if self.modulus_bits == 32 else np.uint64)

    @property
    def mean_error_bound(self) -> float:
        """Largest error per entry of the weighted mean from quantization.

        Holds when no entry was out of range and every weight is a multiple of
        ``weight_resolution``: one step with stochastic rounding, half a step with nearest.
        """
        return self.step if self.stochastic_rounding else self.step / 2

    def to_payload(self) -> dict[str, int | float | bool]:
        """Flat, ConfigRecord-friendly form."""
        return asdict(self)

    def digest(self) -> bytes:
        """SHA-256 of the parameters in a canonical form (nodes sign it with their round keys)."""
        kinds = {"int": int, "float": float, "bool": bool}
        canonical = {k: kinds[str(f.type)](getattr(self, k)) for k, f in self.__dataclass_fields__.items()}
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).digest()

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> SecAggParams:
        """Inverse of ``to_payload`` (unknown keys ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in payload.items() if k in names})


def derive_params(
    num_nodes: int,
    dimension: int,
    *,
    neighbours: int | None = None,
    threshold: int | None = None,
    clip_range: float = DEFAULT_CLIP_RANGE,
    quantization_bits: int = DEFAULT_QUANTIZATION_BITS,
    max_weight: float | None = None,
    weight_resolution: float = 1.0,
    stochastic_rounding: bool = True,
) -> SecAggParams:
    """Parameters for ``num_nodes`` nodes, filling the graph degree and threshold by default.

    Raises
    ------
    ConfigError
        If a value is out of range or the sum could not fit in 64 bits; every problem is listed.
    """
    k = default_neighbours(num_nodes) if neighbours is None else int(neighbours)
    if num_nodes >= 2:
        k = min(k + k % 2, num_nodes - 1)
    t = default_threshold(k) if threshold is None else int(threshold)
    return SecAggParams(
        num_nodes=int(num_nodes),
        dimension=int(dimension),
        neighbours=k,
        threshold=t,
        clip_range=float(clip_range),
        quantization_bits=int(quantization_bits),
        max_weight=float(DEFAULT_MAX_WEIGHT if max_weight is None else max_weight),
        weight_resolution=float(weight_resolution),
        stochastic_rounding=bool(stochastic_rounding),
    )
