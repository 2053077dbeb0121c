"""The plan of a probe: which engine runs (``engine="auto"``'s rule), how many rows each product call takes,
where copies of a token replace batched products, and how the exact paths factor Jacobians. The tuning
constants live here, each with the rule it sets and why; the measurements behind them are in
docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alignscope.autodiff.jacobian import ReverseModeEngine, make_engine
from alignscope.core.randomized import RandomizedSVD
from alignscope.models import get_adapter, resolve_layers
from alignscope.probing.settings import ENGINE_NAMES, ProbeSettings

ANALYSIS_SVD = "auto"
"""How the exact paths factor each Jacobian (:func:`alignscope.core.metrics.top_svd`): ``"auto"`` is the Gram
eigendecomposition in float64 on CUDA (several times faster than cuSOLVER's SVD at large d; docs/benchmarks.md)
and the SVD on CPUs."""


SEQUENCE_CHUNK = 32
"""Default identity rows per VJP through a full-sequence call (memory grows with chunk x T)."""
TOKEN_CHUNK = 1024
"""Most identity rows per VJP through a single-token call."""


def token_chunk(context: int, device: torch.device | str = "cpu", d: int = 0) -> int:
    """Default rows per VJP for a single-token call with ``context`` cached tokens.

    CPUs: as many rows as keep ``rows x (context + 1)`` (per-row attention scores) within
    ``CPU_ROW_BUDGET``, clamped to [32, 1024]: one call for all rows is fastest at short contexts, smaller
    chunks at long ones. CUDA: as many rows as keep ``rows x (context + 1) x d`` values within
    ``CUDA_ROW_BUDGET``, clamped to [32, ``CUDA_TOKEN_CHUNK``]: too few rows per call leave the GPU idle.
    The measurements behind both rules are in docs/benchmarks.md ("The KV cache as a constant in the batched
    products", "GPU sweep")."""
    if torch.device(device).type == "cuda":
        return max(SEQUENCE_CHUNK, min(CUDA_TOKEN_CHUNK, CUDA_ROW_BUDGET // ((context + 1) * max(d, 1))))
    return max(SEQUENCE_CHUNK, min(TOKEN_CHUNK, CPU_ROW_BUDGET // (context + 1)))


CPU_ROW_BUDGET = 2**18
"""Rows x (context + 1) of one single-token VJP call on CPUs."""
CUDA_TOKEN_CHUNK = 1024
"""Most identity rows per VJP through a single-token call on CUDA."""
CUDA_ROW_BUDGET = 2**30
"""Values of ``rows x (context + 1) x d`` one single-token VJP call may hold on CUDA (4 GiB in float32)."""


COPIES_CHUNK = 256
"""Copies per pass where copies of the token run (the best of 128, 256 and 768 in docs/benchmarks.md)."""
CUDA_COPIES_MIN_CONTEXT = 128
CUDA_COPIES_CHUNK = 1024
"""On CUDA, copies from 128 cached tokens on, 1024 per pass: where copies and batched VJPs crossed over on an
H100 before the constant-cache products (docs/benchmarks.md, "GPU sweep"); to be re-measured with
``scripts/gpu_check.py --sweep`` now that batched VJPs no longer grow with the context."""
SKETCH_COPIES_MIN_CONTEXT = 256
"""The same switch for the randomized engine's products on CUDA (not measured there yet)."""


def copies_plan(device: torch.device | str, sketch: bool = False) -> tuple[int, int] | None:
    """``(cached tokens from which the single-token path runs copies of the token, copies per pass)`` on
    ``device`` (``sketch``: for the randomized engine's products), or None: batched VJPs at every length.

    CPUs: None. With the cache a constant in the batched products (:mod:`alignscope.autodiff.constant_cache`),
    copies, which run a forward per row, were slower or equal at every context length measured on CPUs, for
    the exact and the randomized engine (docs/benchmarks.md, "The KV cache as a constant in the batched
    products")."""
    if torch.device(device).type != "cuda":
        return None
    return (
        (SKETCH_COPIES_MIN_CONTEXT, COPIES_CHUNK) if sketch else (CUDA_COPIES_MIN_CONTEXT, CUDA_COPIES_CHUNK)
    )


def copies_min_context(device: torch.device | str) -> int | None:
    """Cached tokens from which the single-token path runs copies on ``device`` (None: never)."""
    plan = copies_plan(device)
    return None if plan is None else plan[0]


class AdaptiveChunkEngine(ReverseModeEngine):
    """The reverse-mode engine whose chunk follows the context length of the single-token call
    (:func:`token_chunk`); ``context`` is set by the probe before each token."""

    def __init__(self) -> None:
        super().__init__(chunk_size=TOKEN_CHUNK)
        self.context = 0

    def __call__(self, block_fn, x, t_in, t_out):
        self.chunk_size = token_chunk(self.context, x.device, x.shape[-1])
        return super().__call__(block_fn, x, t_in, t_out)


AUTO_PRODUCTS_PER_D = {"cpu_small": 0.5, "cpu_large": 1.0, "cuda": 0.5}
"""``engine="auto"`` picks the randomized path when its products per block-token (:func:`randomized_products`)
are at most this share of ``d`` (:func:`auto_product_budget`). On CPUs the break-even of whole probes moves
from about d to about 1.8 d as d grows (the d x d SVDs the randomized path skips weigh more), so CPUs use
d / 2 below ``AUTO_LARGE_D`` and d from there on: randomized only where it is clearly faster, since near
parity the exact engine's exact numbers win (docs/benchmarks.md, "Which engine auto picks"). On CUDA the
crossover is not measured yet and the exact path uses the fast Gram route, so it keeps d / 2."""

AUTO_LARGE_D = 1024
"""Width from which CPUs allow ``AUTO_PRODUCTS_PER_D["cpu_large"]`` instead of ``["cpu_small"]``."""


def auto_product_budget(d: int, device: torch.device | str = "cpu") -> float:
    """Products per block-token up to which ``engine="auto"`` picks the randomized path on ``device``."""
    if torch.device(device).type == "cuda":
        return AUTO_PRODUCTS_PER_D["cuda"] * d
    return AUTO_PRODUCTS_PER_D["cpu_large" if d >= AUTO_LARGE_D else "cpu_small"] * d


def choose_engine(
    engine: Any,
    causal: bool,
    chunk_size: int | None,
    d: int | None,
    ks: Sequence[int],
    blocks: int,
    device: torch.device | str = "cpu",
) -> tuple[str, Any]:
    """``(path, engine)``: the path (``exact`` full sequence, ``single_token`` or ``randomized``) and the
    engine object. ``"auto"``: ``"randomized"`` when :meth:`RandomizedSVD.products` plus the exact coupling
    projections (``2 blocks Kmax`` JVPs) come to at most :func:`auto_product_budget` products per
    block-token on ``device``, else ``"single_token"`` for causal decoders and ``"exact"`` otherwise."""
    if isinstance(engine, RandomizedSVD):
        return "randomized", engine
    if engine is None or isinstance(engine, str):
        name = engine or "auto"
        if name not in ENGINE_NAMES:
            raise ValueError(
                f"unknown engine {name!r}; choose one of {ENGINE_NAMES}, or pass a JacobianEngine or a "
                "RandomizedSVD"
            )
        if name == "auto":
            if d and randomized_products(RandomizedSVD(), max(ks), d, blocks) <= auto_product_budget(
                d, device
            ):
                name = "randomized"
            else:
                name = "single_token" if causal else "exact"
        if name == "randomized":
            return "randomized", RandomizedSVD()
        if name == "single_token" and not causal:
            raise ValueError(
                "engine='single_token' needs a causal decoder with a KV cache; use engine='exact'"
            )
        path = "single_token" if name == "single_token" else "exact"
        if path == "single_token" and chunk_size is None:
            return path, AdaptiveChunkEngine()
        return path, make_engine("reverse", chunk_size=chunk_size or SEQUENCE_CHUNK)
    return "exact", make_engine(engine)


def planned_engine(model: nn.Module, settings: ProbeSettings) -> str:
    """The path :func:`probe` will take with ``settings``: ``"exact"``, ``"single_token"`` or
    ``"randomized"`` (e.g. to skip ``keep_blocks``, which needs Jacobians, before probing)."""
    adapter = get_adapter(model)
    probed = resolve_layers(settings.layers, len(adapter.blocks(model)))
    d = getattr(model.config, "hidden_size", None)
    return choose_engine(
        settings.engine, adapter.causal, None, d, list(settings.ks), len(probed), input_device(model)
    )[0]


def randomized_products(engine: RandomizedSVD, kmax: int, d: int, blocks: int) -> int:
    """Products per block-token of the randomized path: the sketch and twice ``blocks x Kmax`` for the
    coupling projections (ujv and vju forms)."""
    k = min(kmax, d)
    return engine.products(k, d) + 2 * blocks * k


def randomized_meta(engine: RandomizedSVD, kmax: int, d: int, blocks: int) -> dict[str, int]:
    return {
        "oversample": engine.oversample,
        "power_iters": engine.power_iters,
        "probes": engine.probes,
        "seed": engine.seed,
        "rank": engine.rank(min(kmax, d), d),
        "products_per_block_token": randomized_products(engine, kmax, d, blocks),
    }


def input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
