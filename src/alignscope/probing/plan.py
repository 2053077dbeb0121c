"""The plan of a probe: every tuning constant of the engines in one value object, :class:`Plan`.

A :class:`Plan` says how many rows each product call takes, where copies of a token replace batched
products, how the exact engines factor Jacobians, and when ``engine="auto"`` picks the randomized engine.
Each field states the rule it sets and why; the measurements behind the defaults are in
docs/benchmarks.md. :func:`alignscope.probe` takes one as ``plan=`` (default ``Plan()``); none of these
settings changes a number beyond float rounding, only where the time and memory go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignscope.core import factorization
from alignscope.core.randomized import RandomizedSVD


@dataclass(frozen=True)
class Plan:
    """Tuning of the engines (rows per product, copies, analysis SVD, the ``"auto"`` rule).

    Attributes:
        analysis_svd: how the exact engines factor each Jacobian (:func:`alignscope.core.factorization.top_svd`):
            ``"auto"`` is the Gram eigendecomposition in float64 on CUDA (several times faster than
            cuSOLVER's SVD at large d) and, on CPUs, the top-K route through SciPy's LAPACK (``"lapack"``:
            0.53 s against torch's SVD's 0.79 s for SmolLM2's 30 Jacobians) where SciPy provides it, else the
            SVD; or ``"svd"`` / ``"gram"`` / ``"lapack"`` (CPUs only) everywhere.
        sequence_chunk: identity rows per VJP through a full-sequence call (memory grows with chunk x T).
        token_chunk_max: most identity rows per VJP through a single-token call on CPUs.
        cpu_row_budget: ``rows x (context + 1)`` (per-row attention scores) of one single-token VJP call on
            CPUs: one call for all rows is fastest at short contexts, smaller chunks at long ones.
        cuda_token_chunk_max: most identity rows per VJP through a single-token call on CUDA.
        cuda_row_budget: values of ``rows x (context + 1) x d`` one single-token VJP call may hold on CUDA
            (2**30: 4 GiB in float32); too few rows per call leave the GPU idle.
        copies_devices: device types on which copies of the token run at long contexts. CPUs are not among
            them: with the KV cache a constant in the batched products
            (:mod:`alignscope.autodiff.constant_cache`), copies, which run a forward per row, were slower or
            equal at every context length measured on CPUs, for the exact and the randomized engine.
        copies_min_context, copies_chunk: the single-token engine runs copies from this many cached tokens
            on, this many per pass (where copies and batched VJPs crossed over on a GPU before the
            constant-cache products; to be re-measured with ``scripts/gpu_check.py --sweep``).
        sketch_copies_min_context, sketch_copies_chunk: the same for the randomized engine's products
            (256 per pass was the best of 128, 256 and 768; the switch is not measured on CUDA yet).
        auto_share_cpu, auto_share_cpu_large, auto_share_cuda: ``engine="auto"`` picks the randomized
            engine when its products per block-token (:func:`randomized_products`) are at most this share
            of ``d``. On CPUs the break-even of whole probes moves from about d to about 1.8 d as d grows
            (the d x d SVDs the randomized engine skips weigh more), so CPUs use d / 2 below
            ``auto_large_d`` and d from there on: randomized only where it is clearly faster, since near
            parity the exact engine's exact numbers win. On CUDA the crossover is not measured yet and the
            exact engines use the fast Gram route, so it keeps d / 2.
        auto_large_d: width from which CPUs allow ``auto_share_cpu_large``.
    """

    analysis_svd: str = "auto"
    sequence_chunk: int = 32
    token_chunk_max: int = 1024
    cpu_row_budget: int = 2**18
    cuda_token_chunk_max: int = 1024
    cuda_row_budget: int = 2**30
    copies_devices: tuple[str, ...] = ("cuda",)
    copies_min_context: int = 128
    copies_chunk: int = 1024
    sketch_copies_min_context: int = 256
    sketch_copies_chunk: int = 256
    auto_share_cpu: float = 0.5
    auto_share_cpu_large: float = 1.0
    auto_share_cuda: float = 0.5
    auto_large_d: int = 1024

    def __post_init__(self) -> None:
        factorization.top_svd_method(self.analysis_svd, "cpu")  # raises on an unknown method
        for name in ("sequence_chunk", "token_chunk_max", "cuda_token_chunk_max", "copies_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Plan.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "copies_devices", tuple(self.copies_devices))

    def token_chunk(self, context: int, device: torch.device | str = "cpu", d: int = 0) -> int:
        """Rows per VJP for a single-token call with ``context`` cached tokens: CPUs keep ``rows x (context +
        1)`` within ``cpu_row_budget``, CUDA ``rows x (context + 1) x d`` within ``cuda_row_budget``; both
        clamped to ``[sequence_chunk, *_token_chunk_max]``."""
        if torch.device(device).type == "cuda":
            rows = self.cuda_row_budget // ((context + 1) * max(d, 1))
            return max(self.sequence_chunk, min(self.cuda_token_chunk_max, rows))
        return max(self.sequence_chunk, min(self.token_chunk_max, self.cpu_row_budget // (context + 1)))

    def copies(self, device: torch.device | str, sketch: bool = False) -> tuple[int, int] | None:
        """``(cached tokens from which copies of the token run, copies per pass)`` on ``device`` for the
        single-token engine (``sketch``: the randomized engine's products), or None: batched products at
        every context length."""
        if torch.device(device).type not in self.copies_devices:
            return None
        if sketch:
            return self.sketch_copies_min_context, self.sketch_copies_chunk
        return self.copies_min_context, self.copies_chunk

    def analysis_method(self, device: torch.device | str) -> str:
        """The factorization the exact engines run on ``device``: ``"svd"`` or ``"gram"``."""
        return factorization.top_svd_method(self.analysis_svd, device)

    def auto_product_budget(self, d: int, device: torch.device | str = "cpu") -> float:
        """Products per block-token up to which ``engine="auto"`` picks the randomized engine on ``device``."""
        if torch.device(device).type == "cuda":
            return self.auto_share_cuda * d
        return (self.auto_share_cpu_large if d >= self.auto_large_d else self.auto_share_cpu) * d

    def auto_picks_randomized(
        self, kmax: int, d: int | None, blocks: int, device: torch.device | str
    ) -> bool:
        """Whether ``engine="auto"`` runs the randomized engine for ``blocks`` probed blocks of width ``d``."""
        if not d:
            return False
        return randomized_products(RandomizedSVD(), kmax, d, blocks) <= self.auto_product_budget(d, device)


def randomized_products(engine: RandomizedSVD, kmax: int, d: int, blocks: int) -> int:
    """Products per block-token of the randomized engine: the sketch (:meth:`RandomizedSVD.products`) and
    twice ``blocks x Kmax`` for the exact coupling projections (ujv and vju forms)."""
    k = min(kmax, d)
    return engine.products(k, d) + 2 * blocks * k
