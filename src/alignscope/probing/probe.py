"""``probe()``: run prompts through a model, take residual Jacobians of its blocks, and compute every metric.

``probe`` is settings -> engine -> loop over prompts and tokens (the engine's :class:`TokenFactors`, then
the one analysis, :func:`alignscope.probing.analysis.analyze`) -> :class:`ProbeResult`. Each prompt runs
alone, with its padding removed (the probed tokens index the prompt's real tokens), so padding side and
batch composition cannot change a result.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.autodiff.jacobian import JacobianEngine, make_engine
from alignscope.core.factorization import SVD
from alignscope.core.token_coupling import token_coupling
from alignscope.models import config_attr, context_length, get_adapter, resolve_layers, unwrap_model
from alignscope.models.adapters import check_peft, peft_types
from alignscope.models.capture import block_function, capture_block_calls, probe_mode
from alignscope.models.quantized import check_differentiable, quantization
from alignscope.probing.analysis import analyze
from alignscope.probing.degenerate import DegenerateResultWarning, explain
from alignscope.probing.engines import ProbeEngine, Target, TokenFactors, input_device, select_engine
from alignscope.probing.inputs import TokenSpec, prompt_inputs, prompt_sequences, token_positions
from alignscope.probing.plan import Plan
from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings

log = logging.getLogger(__name__)


def probe(
    model: nn.Module,
    input_ids: Tensor | Sequence[Sequence[int]] | str | Sequence[str] | None = None,
    attention_mask: Tensor | None = None,
    layers: Sequence[int] | int | None = None,
    tokens: TokenSpec = "last",
    ks: Sequence[int] | str = "auto",
    keep_jacobians: bool = False,
    *,
    pixel_values: Tensor | None = None,
    keep_blocks: Sequence[int] | None = None,
    tokenizer: Any = None,
    engine: str | JacobianEngine | None = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "eager",
    progress: bool = False,
    include_final_norm: bool = False,
    normalization: str = "norm",
    p: float = 2.0,
    linearization: str = "all",
    inv_s1_from: int = 1,
    token_coupling: bool = False,
    settings: ProbeSettings | None = None,
    plan: Plan | None = None,
) -> ProbeResult:
    """Probe ``model``'s blocks on prompts and return a :class:`ProbeResult`.

    Args:
        model: a Hugging Face model whose ``config.model_type`` has a registered adapter.
        input_ids: ``[B, T]`` or ``[T]`` token ids, a list of id lists, or text (with ``tokenizer``).
        pixel_values: instead of ``input_ids``, for vision models (ViT, DeiT): images ``[B, C, H, W]`` or
            ``[C, H, W]`` at the config's size; the tokens are the CLS token (0; DeiT's distillation token is
            1) followed by the patches in row-major order.
        attention_mask: ``[B, T]``, 1 for real tokens; padding (either side) is removed per prompt.
        layers: block indices to probe (0-based, default all). Trajectories always cover all blocks.
        tokens: ``"last"`` (default), ``"all"``, or positions within each prompt's real tokens. For vision
            models ``"last"`` probes the CLS token (position 0), the token their heads read.
        ks: K values for coupling and alignment; each is clipped to ``d`` (recorded in ``meta``); a float
            ``q`` in ``(0, 1)`` means ``K = max(1, int(q * d))``. ``"auto"``
            (default): 10, 30 and 50 where ``K <= d / 4`` (:meth:`ProbeSettings.ks_for`: with K a large share
            of ``d``, coupling can be negative by definition); what was left out is logged and in
            ``meta["ks_dropped"]``, and ``meta["notes"]`` holds the notice.
        keep_jacobians: keep the ``[P, L', d, d]`` residual Jacobians in the result.
        keep_blocks: keep only these blocks' Jacobians, as ``extras["block_jacobians"]`` ``[P, n, d, d]``
            (for figures such as the ``|U_j^T J_i V_j|`` grid without storing every block).
        tokenizer: required when ``input_ids`` is text.
        engine: ``"auto"`` (default: ``"randomized"`` where it pays, see below, else ``"single_token"`` for
            causal decoders and ``"exact"`` for encoders), ``"exact"``
            (reverse mode through the block's full-sequence call), ``"single_token"`` (reverse mode through
            the block called on the probed token alone against the model's KV cache of the earlier tokens;
            the same Jacobian, far cheaper for long prompts), ``"randomized"`` (matrix-free top-K triplets
            from a randomized range finder, :class:`~alignscope.core.randomized.RandomizedSVD`, or pass an
            instance to set its oversampling and power iterations; coupling projections exact, see
            :mod:`alignscope.probing.engines.randomized`), or a ``JacobianEngine`` instance (full sequence). ``"auto"``
            picks ``"randomized"`` when it needs few enough products (large ``d``, few blocks, small K;
            :meth:`Plan.auto_product_budget`). ``meta["engine"]`` says which ran. The randomized engine
            stores the top ``Kmax + oversample`` singular values only, an estimate of the stable rank,
            and its error statement in ``extras``: ``triplet_residuals`` ``[P, L', Kmax]``
            (``||J v_k - s_k u_k||``, bounds each singular value's error), ``tail_fro`` ``[P, L']``
            (``||J - J_sketch||_F``) and ``coupling_error_k{K}`` ``[P, L', L']`` (first-order bound on
            each ``m_K``'s error; often loose where singular values are close). With
            ``dtype=torch.float64`` on a float32 model the
            single-token path uses the cached keys and values of the earlier tokens as the model computed
            them (float32), so it agrees with ``"exact"`` to float32 rounding.
        dtype: compute dtype of the Jacobians (float32 default, float64 on request).
        attention: attention implementation during the probe (``"eager"`` or ``"sdpa"`` math kernel).
        progress: show a progress bar over (prompt, block).
        chunk_size: identity rows per vector-Jacobian product (default ``plan.sequence_chunk`` on the
            full-sequence path; on the single-token path by context length, :meth:`Plan.token_chunk`, and on
            CUDA copies of the token from ``plan.copies_min_context`` cached tokens on, :meth:`Plan.copies`;
            an explicit ``chunk_size`` keeps the batched VJPs at every context length. On the randomized
            path rows per product call, the same rule with ``T`` for encoders).
        include_final_norm: take the last block's output after the model's final norm, as Hugging Face's
            last ``output_hidden_states`` entry (and the paper's released code) does: the last ``J``, ``x^L``
            and every metric of them include the norm. No effect on models without a final norm (encoders).
        normalization: ``m_K``'s denominator: ``"norm"`` (default, ``||s_{i,1..K}||_p``) or ``"trace"``
            (``sum_k s_{i,k}``); the randomized engine takes only the default (its error bound assumes it).
        p: the order of that norm (default 2).
        linearization: ``"all"`` (default): cosine between ``x^L`` and ``(I + J_L) ... (I + J_1) x^0``;
            ``"drop_last"``: the chain of the first ``L - 1`` blocks against ``x^L``.
        inv_s1_from: the ``1 / s_1`` fit covers the probed blocks numbered (1-based) from this on (default 1).
        token_coupling: also ``m_K`` across each prompt's probed tokens, per block (use ``tokens="all"`` or a
            list): ``res.token_coupling[K]`` ``[prompts, L', T, T]`` and the scalar ``token_coupling/k{K}``
            (:mod:`alignscope.core.token_coupling`). Needs an exact engine; holds one prompt's ``T`` Jacobians.
        settings: all of the above as one :class:`ProbeSettings` (then pass none of them individually).
        plan: the engines' tuning (:class:`~alignscope.probing.plan.Plan`: rows per product, copies, the
            analysis SVD, the ``"auto"`` rule); default ``Plan()``. It moves time and memory, not numbers.

    The model's parameters, training flags and attention setting are as before when this returns. Metrics
    that are meaningless (NaN: a non-finite or exactly zero Jacobian, a single probed block, a trajectory
    that overflows or stands still) come with a :class:`~alignscope.probing.degenerate.DegenerateResultWarning` per
    cause, naming the blocks and tokens, also kept in ``meta["warnings"]``.

    Raises:
        ValueError: a bad argument, or a prompt longer than the model's context
            (:func:`alignscope.models.context_length`).
    """
    check_peft(model)
    peft = peft_types(model)
    model = unwrap_model(model)  # the adapted Hugging Face model: its forward is the PeftModel's
    given = ProbeSettings(
        layers,
        tokens,
        ks,
        keep_jacobians,
        engine,
        chunk_size,
        dtype,
        attention,
        progress,
        include_final_norm,
        normalization,
        p,
        linearization,
        inv_s1_from,
        token_coupling,
    )
    if settings is not None and given != ProbeSettings():
        raise ValueError("pass either settings=ProbeSettings(...) or the individual settings, not both")
    run = _resolve(model, settings if settings is not None else given, keep_blocks, plan or Plan())
    adapter = run.target.adapter
    sequences, lengths = prompt_inputs(model, adapter, input_ids, pixel_values, attention_mask, tokenizer)
    vision = adapter.inputs == "pixel_values"
    positions = [token_positions(run.settings.tokens, n, b, cls_token=vision) for b, n in enumerate(lengths)]
    if vision and adapter.prefix_tokens == 0 and run.settings.tokens == "last":
        run.notes.append(
            "this vision model has no CLS token (its blocks see the patches alone), so the default token 0 "
            "is the top-left patch; pass tokens='all' or positions to probe others"
        )
    started = time.perf_counter()
    with probe_mode(model, run.settings.attention):
        loop = _probe_tokens(run, sequences, positions)
    meta = _meta(model, run, lengths, loop, time.perf_counter() - started)
    meta["peft"] = peft
    per_token = loop.per_token
    result = ProbeResult.stack(
        per_token,
        run.ks,
        tokens=torch.tensor(loop.token_index, dtype=torch.long),
        layers=list(run.target.probed),
        meta=meta,
    )
    result.extras.update(
        {name: torch.stack([t["extras"][name] for t in per_token]) for name in per_token[0]["extras"]}
    )
    result.extras.update(_token_coupling_extras(loop, run.ks))
    result.meta["warnings"] = explain(result)
    for message in result.meta["warnings"]:
        warnings.warn(message, DegenerateResultWarning, stacklevel=2)
    return result


@dataclass
class _Run:
    """What a probe resolved before running: settings, what to probe, the kept blocks, the engine."""

    settings: ProbeSettings
    ks: list[int]
    ks_dropped: list[int]
    notes: list[str]
    target: Target
    kept: list[int]
    engine: ProbeEngine
    device: torch.device


@dataclass
class _Loop:
    """What the loop over prompts and tokens produced."""

    per_token: list[dict[str, Any]] = field(default_factory=list)
    token_index: list[tuple[int, int]] = field(default_factory=list)
    chain_gap: float = 0.0
    token_coupling: list[dict[int, Tensor]] = field(default_factory=list)  # per prompt: {K: [L', T, T]}
    analysis_seconds: float = 0.0  # the analysis (and the exact engines' SVDs); the rest: Jacobians, capture


def _resolve(model: nn.Module, s: ProbeSettings, keep_blocks: Sequence[int] | None, plan: Plan) -> _Run:
    """What to probe, the kept blocks and the engine, with the errors a bad combination gives."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    probed = resolve_layers(s.layers, len(blocks))
    device = input_device(model)
    check_differentiable(model, device)
    d = config_attr(model, "hidden_size")
    ks, dropped, notice = s.ks_for(d)
    if notice:
        log.info(notice)
    engine = select_engine(s.engine, plan, s.chunk_size, adapter.causal, d, max(ks), len(probed), device)
    kept = resolve_layers(keep_blocks, len(blocks)) if keep_blocks is not None else []
    if not set(kept) <= set(probed):
        raise ValueError(
            f"keep_blocks {sorted(set(kept) - set(probed))} are not among the probed layers {probed}"
        )
    if not engine.forms_jacobians and not s.default_coupling_norm:
        raise ValueError(
            f"the {engine.name} engine's error bound on m_K assumes the default normalization (the 2-norm of "
            f"the top-K singular values); normalization={s.normalization!r}, p={s.p:g} needs an exact engine: "
            "pass engine='exact' or 'single_token'"
        )
    if not engine.forms_jacobians and (s.keep_jacobians or kept or s.token_coupling):
        raise ValueError(
            f"the {engine.name} engine never forms Jacobians, so keep_jacobians, keep_blocks and "
            "token_coupling need an exact engine: pass engine='exact' or 'single_token'"
        )
    final_norm = adapter.final_norm(model) if s.include_final_norm else None
    chain_blocks = len(blocks) - 1 if s.linearization == "drop_last" else None
    target = Target(model, adapter, blocks, probed, max(ks), s.dtype, final_norm, chain_blocks)
    notes = [*([notice] if notice else []), *adapter.notes]
    quantized = quantization(model)
    if quantized:
        notes.append(
            f"{quantized} layers compute in their own dtype (8-bit: float16 matmul inputs), whatever dtype= says; "
            "the Jacobians carry that rounding"
        )
    return _Run(s, ks, dropped, notes, target, kept, engine, device)


def _probe_tokens(run: _Run, sequences: list[Tensor], positions: list[list[int]]) -> _Loop:
    """Every probed token of every prompt: the engine's factors, analysed, on the CPU, in order."""
    from tqdm.auto import tqdm

    s, loop, probed = run.settings, _Loop(), run.target.probed
    total = sum(len(p) for p in positions) * len(probed)
    bar = tqdm(total=total, desc="probe", unit="block", disable=not s.progress, leave=None)
    kept_index = [probed.index(b) for b in run.kept]
    for b, seq in enumerate(sequences):
        ids = seq[None].to(run.device)
        prompt: list[TokenFactors] = []
        for factors in run.engine.factors(run.target, ids, positions[b], bar):
            if s.token_coupling:
                prompt.append(factors)
            loop.chain_gap = max(loop.chain_gap, factors.chain_gap)
            start = time.perf_counter()
            out = analyze(factors, probed, run.ks, s.normalization, s.p, s.inv_s1_from)  # on the device
            if s.keep_jacobians:
                out["jacobians"] = factors.jacobians
            if kept_index:
                out["extras"]["block_jacobians"] = factors.jacobians[kept_index]
            loop.per_token.append(_to_cpu(out))  # waits for the device
            loop.analysis_seconds += time.perf_counter() - start
            loop.token_index.append((b, factors.position))
        if prompt:
            loop.token_coupling.append(_prompt_token_coupling(prompt, run))
    bar.close()
    return loop


def _prompt_token_coupling(prompt: list[TokenFactors], run: _Run) -> dict[int, Tensor]:
    """``{K: [L', T, T]}`` (on the CPU) across the probed tokens of one prompt
    (:func:`alignscope.core.token_coupling.token_coupling`, from the engine's factors)."""
    jacobians = torch.stack([f.jacobians for f in prompt])  # [T, L', d, d]
    factors = SVD(*(torch.stack([getattr(f, name) for f in prompt]) for name in ("U", "S", "V")))
    s = run.settings
    return _to_cpu(token_coupling(jacobians, run.ks, s.normalization, s.p, factors=factors))


def _token_coupling_extras(loop: _Loop, ks: list[int]) -> dict[str, Tensor]:
    """``token_coupling_k{K}`` ``[prompts, L', T, T]`` (NaN where a prompt has fewer probed tokens than the
    longest) and ``token_coupling_positions`` ``[prompts, T]`` (-1 there)."""
    if not loop.token_coupling:
        return {}
    counts = [m[ks[0]].shape[-1] for m in loop.token_coupling]
    n, size = len(counts), max(counts)
    out: dict[str, Tensor] = {}
    for k in ks:
        first = loop.token_coupling[0][k]
        padded = torch.full((n, first.shape[0], size, size), float("nan"), dtype=first.dtype)
        for b, m in enumerate(loop.token_coupling):
            padded[b, :, : counts[b], : counts[b]] = m[k]
        out[f"token_coupling_k{k}"] = padded
    positions = torch.full((n, size), -1, dtype=torch.long)
    for b in range(n):
        positions[b, : counts[b]] = torch.tensor([t for p, t in loop.token_index if p == b])
    out["token_coupling_positions"] = positions
    return out


def _meta(model: nn.Module, run: _Run, lengths: list[int], loop: _Loop, seconds: float) -> dict[str, Any]:
    """The JSON-safe facts of a probe (``ProbeResult.meta``)."""
    s, target = run.settings, run.target
    ks = run.ks
    d = loop.per_token[0]["hidden_states"].shape[-1]
    return {
        "model_class": type(model).__name__,
        "model_type": model.config.model_type,
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "init_seed": getattr(model.config, "alignscope_init_seed", None),
        "num_blocks": len(target.blocks),
        "num_params": sum(p.numel() for p in model.parameters()),
        "kept_blocks": run.kept,
        "d_model": d,
        "residual_form": target.adapter.residual_form,
        "adapter": target.adapter.source,
        "quantization": quantization(model),
        "dtype": str(s.dtype).removeprefix("torch."),
        **run.engine.meta(target, d, run.device),
        "attention": s.attention,
        "tokens": s.tokens if isinstance(s.tokens, (str, int)) else list(s.tokens),
        "prompt_lengths": lengths,
        "ks_requested": s.ks if isinstance(s.ks, str) else list(s.ks),
        "ks_dropped": run.ks_dropped,
        "include_final_norm": s.include_final_norm,
        "normalization": s.normalization,
        "p": s.p,
        "linearization": s.linearization,
        "inv_s1_from": s.inv_s1_from,
        "notes": run.notes,
        "k_effective": {str(k): min(k, d) for k in ks},
        "k_clipped": [k for k in ks if k > d],
        "block_chain_max_gap": loop.chain_gap,
        "seconds": seconds,
        "analysis_seconds": loop.analysis_seconds + run.engine.analysis_seconds,
    }


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def token_jacobians(
    model: nn.Module,
    input_ids: Tensor | Sequence[int],
    layers: Sequence[int] | int | None = None,
    pairs: Sequence[tuple[int, int]] = (),
    *,
    engine: str | JacobianEngine | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "eager",
) -> Tensor:
    """Cross-token (context-coupling) Jacobians of one prompt: ``[len(pairs), L', d, d]``.

    ``out[k, i] = d x^{l}_{t2} / d x^{l-1}_{t1}`` for ``pairs[k] = (t1, t2)`` and block ``l = layers[i]``;
    the identity is *not* subtracted (for ``t1 == t2`` subtract it to get the residual Jacobian).
    ``input_ids``: ``[T]`` or ``[1, T]`` real tokens (no padding).
    """
    check_peft(model)
    model = unwrap_model(model)
    jac_engine = make_engine(engine)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    probed = resolve_layers(layers, len(blocks))
    ids = input_ids if isinstance(input_ids, Tensor) else torch.as_tensor(input_ids)
    if not (ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1)):
        raise ValueError(
            f"token_jacobians takes one prompt: input_ids of shape [T] or [1, T], got {tuple(ids.shape)}"
        )
    (seq,) = prompt_sequences(ids, None, None, config_attr(model, "vocab_size"), context_length(model))
    if not pairs:
        raise ValueError("pairs is empty; give (t_in, t_out) token pairs")
    t_in = torch.tensor([token_positions(p[0], len(seq), 0)[0] for p in pairs])
    t_out = torch.tensor([token_positions(p[1], len(seq), 0)[0] for p in pairs])
    check_differentiable(model, input_device(model))
    with probe_mode(model, attention):
        calls = capture_block_calls(model, adapter, blocks, seq[None].to(input_device(model)))
        out = []
        for layer in probed:
            fn = block_function(blocks[layer], calls[layer], adapter, dtype)
            x = calls[layer].input[0].to(dtype)
            out.append(jac_engine(fn, x, t_in.to(x.device), t_out.to(x.device)).cpu())
    return torch.stack(out, dim=1)
