"""``probe()``: run prompts through a model, take residual Jacobians of its blocks, and compute every metric.

Each prompt runs alone, with its padding removed (the probed tokens index the prompt's real tokens), so
padding side and batch composition cannot change a result.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.autodiff.jacobian import (
    JacobianEngine,
    jacobian_by_copies,
    make_engine,
    residual_jacobian,
)
from alignscope.core import metrics
from alignscope.models import context_length, get_adapter, resolve_layers
from alignscope.models.capture import (
    block_function,
    capture_block_calls,
    capture_token_calls,
    probe_mode,
    token_block_function,
    token_copies_function,
)
from alignscope.probing import plan
from alignscope.probing.degenerate import DegenerateResultWarning, explain
from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings

TokenSpec = str | int | Sequence[int]
"""``"last"`` (each prompt's last real token), ``"all"``, or explicit positions (negative from the end)."""


def probe(
    model: nn.Module,
    input_ids: Tensor | Sequence[Sequence[int]] | str | Sequence[str],
    attention_mask: Tensor | None = None,
    layers: Sequence[int] | int | None = None,
    tokens: TokenSpec = "last",
    ks: Sequence[int] = (10, 30, 50),
    keep_jacobians: bool = False,
    *,
    keep_blocks: Sequence[int] | None = None,
    tokenizer: Any = None,
    engine: str | JacobianEngine | None = "auto",
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    attention: str = "eager",
    progress: bool = False,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Probe ``model``'s blocks on prompts and return a :class:`ProbeResult`.

    Args:
        model: a Hugging Face model whose ``config.model_type`` has a registered adapter.
        input_ids: ``[B, T]`` or ``[T]`` token ids, a list of id lists, or text (with ``tokenizer``).
        attention_mask: ``[B, T]``, 1 for real tokens; padding (either side) is removed per prompt.
        layers: block indices to probe (0-based, default all). Trajectories always cover all blocks.
        tokens: ``"last"`` (default), ``"all"``, or positions within each prompt's real tokens.
        ks: K values for coupling and alignment; each is clipped to ``d`` (recorded in ``meta``).
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
            :mod:`alignscope.probing.sketch_probe`), or a ``JacobianEngine`` instance (full sequence). ``"auto"``
            picks ``"randomized"`` when it needs few enough products (large ``d``, few blocks, small K;
            :func:`plan.auto_product_budget`). ``meta["engine"]`` says which ran. The randomized engine
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
        chunk_size: identity rows per vector-Jacobian product (default 32 on the full-sequence path; on the
            single-token path by context length, see :func:`plan.token_chunk`; on CUDA copies of the token
            from ``plan.CUDA_COPIES_MIN_CONTEXT`` cached tokens on, ``plan.CUDA_COPIES_CHUNK`` per pass
            (:func:`plan.copies_plan`); an explicit ``chunk_size`` keeps the batched VJPs at every context
            length. On the randomized path rows per product call, the same rule with ``T`` for encoders).

    The model's parameters, training flags and attention setting are as before when this returns. Metrics
    that are meaningless (NaN: a non-finite or exactly zero Jacobian, a single probed block, a trajectory
    that overflows or stands still) come with a :class:`~alignscope.probing.degenerate.DegenerateResultWarning` per
    cause, naming the blocks and tokens, also kept in ``meta["warnings"]``.

    Raises:
        ValueError: a bad argument, or a prompt longer than the model's context
            (:func:`alignscope.models.context_length`).
    """
    given = ProbeSettings(layers, tokens, ks, keep_jacobians, engine, chunk_size, dtype, attention, progress)
    if settings is not None and given != ProbeSettings():
        raise ValueError("pass either settings=ProbeSettings(...) or the individual settings, not both")
    run = _resolve(model, settings if settings is not None else given, keep_blocks)
    sequences = _sequences(
        input_ids, attention_mask, tokenizer, getattr(model.config, "vocab_size", None), context_length(model)
    )
    positions = [_positions(run.settings.tokens, len(seq), b) for b, seq in enumerate(sequences)]
    started = time.perf_counter()
    with probe_mode(model, run.settings.attention):
        loop = _probe_tokens(model, run, sequences, positions)
    meta = _meta(model, run, sequences, loop, time.perf_counter() - started)
    ks = list(run.settings.ks)
    result = _assemble(loop.per_token, loop.token_index, run.probed, ks, len(run.blocks), meta)
    if run.path == "randomized":
        names = ["triplet_residuals", "tail_fro", *[f"coupling_error_k{k}" for k in ks]]
        result.extras.update({name: torch.stack([t[name] for t in loop.per_token]) for name in names})
    if run.kept:
        result.extras["block_jacobians"] = torch.stack([t["block_jacobians"] for t in loop.per_token])
    result.meta["warnings"] = explain(result)
    for message in result.meta["warnings"]:
        warnings.warn(message, DegenerateResultWarning, stacklevel=2)
    return result


@dataclass
class _Run:
    """What a probe resolved before running: settings, blocks, the probed and kept ones, the engine path."""

    settings: ProbeSettings
    adapter: Any
    blocks: Any
    probed: list[int]
    device: torch.device
    path: str
    engine: Any
    kept: list[int]


@dataclass
class _Loop:
    """What the loop over prompts and tokens produced."""

    per_token: list[dict[str, Any]] = field(default_factory=list)
    token_index: list[tuple[int, int]] = field(default_factory=list)
    chain_gap: float = 0.0
    analysis_seconds: float = 0.0  # SVDs and metrics of the exact paths (the rest is Jacobians and capture)


def _resolve(model: nn.Module, s: ProbeSettings, keep_blocks: Sequence[int] | None) -> _Run:
    """Blocks, probed and kept blocks, and the engine path, with the errors a bad combination gives."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    probed = resolve_layers(s.layers, len(blocks))
    device = plan.input_device(model)
    d = getattr(model.config, "hidden_size", None)
    path, engine = plan.choose_engine(
        s.engine, adapter.causal, s.chunk_size, d, list(s.ks), len(probed), device
    )
    kept = resolve_layers(keep_blocks, len(blocks)) if keep_blocks is not None else []
    if not set(kept) <= set(probed):
        raise ValueError(
            f"keep_blocks {sorted(set(kept) - set(probed))} are not among the probed layers {probed}"
        )
    if path == "randomized" and (s.keep_jacobians or kept):
        raise ValueError(
            "the randomized engine never forms Jacobians, so keep_jacobians/keep_blocks need an exact "
            "engine: pass engine='exact' or 'single_token'"
        )
    return _Run(s, adapter, blocks, probed, device, path, engine, kept)


def _probe_tokens(model: nn.Module, run: _Run, sequences: list[Tensor], positions: list[list[int]]) -> _Loop:
    """Every probed token of every prompt: per-token metrics (on the CPU) in order."""
    from tqdm.auto import tqdm

    s, loop = run.settings, _Loop()
    ks = list(s.ks)
    total = sum(len(p) for p in positions) * len(run.probed)
    bar = tqdm(total=total, desc="probe", unit="block", disable=not s.progress)
    for b, seq in enumerate(sequences):
        ids = seq[None].to(run.device)
        if run.path == "randomized":
            for t in positions[b]:
                out = _sketch_token_metrics(
                    model,
                    run.adapter,
                    run.blocks,
                    ids,
                    t,
                    run.probed,
                    ks,
                    run.engine,
                    s.dtype,
                    s.chunk_size,
                    bar,
                )
                loop.chain_gap = max(loop.chain_gap, out.pop("chain_gap"))
                loop.per_token.append(_to_cpu(out))
                loop.token_index.append((b, t))
            continue
        jacobians = _single_token_jacobians if run.path == "single_token" else _sequence_jacobians
        for t, jac, traj, gap in jacobians(
            model, run.adapter, run.blocks, ids, positions[b], run.probed, run.engine, s.dtype, bar
        ):
            loop.chain_gap = max(loop.chain_gap, gap)
            _analyze_token(loop, run, jac, traj)
            loop.token_index.append((b, t))
    bar.close()
    return loop


def _analyze_token(loop: _Loop, run: _Run, jac: Tensor, traj: Tensor) -> None:
    """Metrics of one token's Jacobians ``[L', d, d]`` and trajectory, appended to ``loop`` (timed)."""
    if jac.is_cuda:  # do not count the Jacobians' queued kernels as analysis
        torch.cuda.synchronize(jac.device)
    start = time.perf_counter()
    s = run.settings
    out = _analyze(jac, traj, run.probed, list(s.ks), len(run.blocks), s.keep_jacobians)  # on the device
    if run.kept:
        out["block_jacobians"] = jac[[run.probed.index(b) for b in run.kept]]
    loop.per_token.append(_to_cpu(out))  # waits for the device
    loop.analysis_seconds += time.perf_counter() - start


def _meta(
    model: nn.Module, run: _Run, sequences: list[Tensor], loop: _Loop, seconds: float
) -> dict[str, Any]:
    """The JSON-safe facts of a probe (``ProbeResult.meta``)."""
    s, path, engine = run.settings, run.path, run.engine
    ks = list(s.ks)
    d = loop.per_token[0]["hidden_states"].shape[-1]
    adaptive = isinstance(engine, plan.AdaptiveChunkEngine)
    return {
        "model_class": type(model).__name__,
        "model_type": model.config.model_type,
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "init_seed": getattr(model.config, "alignscope_init_seed", None),
        "num_blocks": len(run.blocks),
        "num_params": sum(p.numel() for p in model.parameters()),
        "kept_blocks": run.kept,
        "d_model": d,
        "residual_form": run.adapter.residual_form,
        "dtype": str(s.dtype).removeprefix("torch."),
        "engine": path,
        "randomized": plan.randomized_meta(engine, max(ks), d, len(run.probed))
        if path == "randomized"
        else None,
        "chunk_size": "adaptive" if adaptive else getattr(engine, "chunk_size", None),
        "copies_min_context": plan.copies_min_context(run.device)
        if path == "single_token" and adaptive
        else None,
        "attention": s.attention,
        "analysis_svd": None
        if path == "randomized"
        else metrics.top_svd_method(plan.ANALYSIS_SVD, run.device),
        "tokens": s.tokens if isinstance(s.tokens, (str, int)) else list(s.tokens),
        "prompt_lengths": [len(seq) for seq in sequences],
        "ks_requested": ks,
        "k_effective": {str(k): min(k, d) for k in ks},
        "k_clipped": [k for k in ks if k > d],
        "block_chain_max_gap": loop.chain_gap,
        "seconds": seconds,
        "analysis_seconds": loop.analysis_seconds,
    }


def _sketch_token_metrics(model, adapter, blocks, ids, t, probed, ks, engine, dtype, chunk_size, bar):
    """All per-token metrics of token ``t`` on the randomized path (:mod:`alignscope.probing.sketch_probe`)."""
    from alignscope.probing.sketch_probe import analyze_sketch, sketch_token

    if adapter.causal:
        calls, row = capture_token_calls(model, adapter, blocks, ids, t), None
    else:
        calls, row = capture_block_calls(model, adapter, blocks, ids), t
    traj = _trajectory(calls, row or 0)
    chain = len(probed) == len(blocks)
    copies_at = plan.copies_plan(ids.device, sketch=True)
    copies = adapter.causal and copies_at is not None and t >= copies_at[0]
    context = t if adapter.causal else ids.shape[1]
    chunk = chunk_size or (copies_at[1] if copies else plan.token_chunk(context, ids.device, traj.shape[-1]))
    sk = sketch_token(calls, blocks, adapter, probed, ks, engine, dtype, row, chunk, chain, bar, copies)
    out = analyze_sketch(sk, traj.to(dtype), probed, ks)
    out["chain_gap"] = _chain_gap(calls)
    return out


def _sequence_jacobians(model, adapter, blocks, ids, positions, probed, engine, dtype, bar):
    """Per probed token: ``(t, J [L', d, d], trajectory [L + 1, d], chain gap)`` from full-sequence calls."""
    calls = capture_block_calls(model, adapter, blocks, ids)
    gap = _chain_gap(calls)
    pos = torch.tensor(positions, dtype=torch.long)
    traj = torch.stack([_trajectory(calls, t) for t in positions]).to(dtype)  # [P, L + 1, d]
    d = traj.shape[-1]
    jac = torch.empty(len(pos), len(probed), d, d, dtype=dtype, device=traj.device)
    for li, layer in enumerate(probed):
        call = calls[layer]
        fn = block_function(blocks[layer], call, adapter, dtype)
        x = call.input[0].to(dtype)
        p = pos.to(x.device)
        jac[:, li] = residual_jacobian(engine(fn, x, p, p)).to(jac.device)
        bar.update(len(pos))
    return [(t, jac[n], traj[n], gap) for n, t in enumerate(positions)]


def _single_token_jacobians(model, adapter, blocks, ids, positions, probed, engine, dtype, bar):
    """Per probed token: the same as :func:`_sequence_jacobians`, each block called on the token alone."""
    out = []
    zero = torch.zeros(1, dtype=torch.long)
    for t in positions:
        if isinstance(engine, plan.AdaptiveChunkEngine):
            engine.context = t
        calls = capture_token_calls(model, adapter, blocks, ids, t)
        traj = _trajectory(calls, 0).to(dtype)
        d = traj.shape[-1]
        jac = torch.empty(len(probed), d, d, dtype=dtype, device=traj.device)
        copies_at = plan.copies_plan(traj.device)
        copies = isinstance(engine, plan.AdaptiveChunkEngine) and copies_at is not None and t >= copies_at[0]
        for li, layer in enumerate(probed):
            call = calls[layer]
            x = call.input[0].to(dtype)  # [1, d]
            copies_fn = token_copies_function(blocks[layer], call, adapter, dtype) if copies else None
            if copies_fn is not None:
                full = jacobian_by_copies(copies_fn, x[0], copies_at[1])
            else:
                fn = token_block_function(blocks[layer], call, adapter, dtype)
                full = engine(fn, x, zero.to(x.device), zero.to(x.device))[0]
            jac[li] = residual_jacobian(full).to(jac.device)
            bar.update(1)
        out.append((t, jac, traj, _chain_gap(calls)))
    return out


def _trajectory(calls: list, position: int) -> Tensor:
    """``x^0..x^L`` (``[L + 1, d]``) of the token at ``position`` of the recorded calls' sequence."""
    device = calls[0].input.device
    return torch.stack([calls[0].input[0, position]] + [c.output[0, position].to(device) for c in calls])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _sequences(
    input_ids: Any, attention_mask: Tensor | None, tokenizer: Any, vocab: int | None, context: int | None
) -> list[Tensor]:
    """Per-prompt 1-D id tensors with padding removed, each checked against the vocabulary and the
    model's ``context`` length (None: no limit known)."""
    if isinstance(input_ids, str) or (
        isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(s, str) for s in input_ids)
    ):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: probe(model, texts, tokenizer=tokenizer)")
        texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
        seqs = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
        if attention_mask is not None:
            raise ValueError("attention_mask is only for token ids; text prompts are tokenized one by one")
    elif isinstance(input_ids, Tensor):
        ids = input_ids
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if attention_mask is not None:
            mask = attention_mask if attention_mask.ndim == 2 else attention_mask[None]
            if mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
                )
            seqs = [row[m.bool()] for row, m in zip(ids, mask)]
        else:
            seqs = list(ids)
        seqs = [s.long().cpu() for s in seqs]
    elif isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only supported with a tensor of input_ids")
        seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in input_ids]
    else:
        raise TypeError(
            f"input_ids must be a tensor, a list of id lists, or text; got {type(input_ids).__name__}"
        )
    if not seqs:
        raise ValueError("no prompts given: input_ids is empty")
    for b, s in enumerate(seqs):
        if s.numel() == 0:
            raise ValueError(f"prompt {b} has no real tokens (empty, or fully masked by attention_mask)")
        if vocab is not None and (int(s.max()) >= vocab or int(s.min()) < 0):
            raise ValueError(f"prompt {b} has token ids outside the model's vocabulary [0, {vocab})")
        if context is not None and s.numel() > context:
            raise ValueError(
                f"prompt {b} has {s.numel()} tokens, more than the model's context of {context} positions; "
                f"truncate it to at most {context} tokens, e.g. tokenizer(text, truncation=True, "
                f"max_length={context}) or input_ids[:, :{context}]"
            )
    return seqs


def _positions(tokens: TokenSpec, length: int, prompt: int) -> list[int]:
    if tokens == "last":
        return [length - 1]
    if tokens == "all":
        return list(range(length))
    if isinstance(tokens, str):
        raise ValueError(f"tokens must be 'last', 'all' or a list of positions, got {tokens!r}")
    wanted = [tokens] if isinstance(tokens, int) else list(tokens)
    if not wanted:
        raise ValueError("tokens is an empty list; give positions, 'last' or 'all'")
    out = []
    for t in wanted:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"token positions must be integers, got {t!r}")
        if not -length <= t < length:
            raise IndexError(
                f"token position {t} is beyond prompt {prompt}, which has {length} real tokens "
                f"(valid: 0..{length - 1}, or negative from the end)"
            )
        out.append(t % length)
    return sorted(set(out))


def _chain_gap(calls: list) -> float:
    """Largest relative gap between block l's output and block l+1's input (0 for a plain block chain)."""
    gap = 0.0
    for prev, nxt in itertools.pairwise(calls):
        a, b = prev.output.float(), nxt.input.float().to(prev.output.device)
        gap = max(gap, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return gap


def _analyze(
    jac: Tensor, traj: Tensor, layers: list[int], ks: list[int], num_blocks: int, keep: bool
) -> dict[str, Any]:
    """All per-token metrics from residual Jacobians ``[L', d, d]`` and a trajectory ``[L + 1, d]``."""
    factors = metrics.top_svd(jac, max(ks), plan.ANALYSIS_SVD)  # every singular value, top-Kmax vectors
    depth = torch.tensor([layer + 1 for layer in layers])
    expo = metrics.expodistance(traj)
    inv_fit = metrics.inverse_top_singular_fit(factors.S[:, 0], depth)
    out: dict[str, Any] = {
        "hidden_states": traj,
        "singular_values": factors.S,
        "nonfinite": ~torch.isfinite(factors.S).all(-1),  # NaN factors exactly where J was not finite
        "coupling": metrics.coupling_matrices(jac, ks, "ujv", factors),
        "coupling_vju": metrics.coupling_matrices(jac, ks, "vju", factors),
        "alignment": metrics.alignment_matrices(factors.U, factors.V, ks),
        "lss": metrics.line_shape_score(traj),
        "step_slope": expo.step_slope,
        "step_r2": expo.step_r2,
        "norm_slope": expo.norm_slope,
        "norm_r2": expo.norm_r2,
        "stable_rank": metrics.stable_rank(factors.S),
        "inv_s1_slope": inv_fit.slope,
        "inv_s1_r2": inv_fit.r2,
    }
    if len(layers) == num_blocks:
        out["linearization_cosine"] = metrics.linearization_cosine(jac, traj[0], traj[-1])
    if keep:
        out["jacobians"] = jac
    return out


def _assemble(
    per_token: list[dict[str, Any]],
    token_index: list[tuple[int, int]],
    layers: list[int],
    ks: list[int],
    num_blocks: int,
    meta: dict[str, Any],
) -> ProbeResult:
    tokens = torch.tensor(token_index, dtype=torch.long)
    return ProbeResult.stack(per_token, ks, tokens=tokens, layers=list(layers), meta=meta)


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
    jac_engine = make_engine(engine)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    probed = resolve_layers(layers, len(blocks))
    ids = input_ids if isinstance(input_ids, Tensor) else torch.as_tensor(input_ids)
    if not (ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1)):
        raise ValueError(
            f"token_jacobians takes one prompt: input_ids of shape [T] or [1, T], got {tuple(ids.shape)}"
        )
    (seq,) = _sequences(ids, None, None, getattr(model.config, "vocab_size", None), context_length(model))
    if not pairs:
        raise ValueError("pairs is empty; give (t_in, t_out) token pairs")
    t_in = torch.tensor([_positions(p[0], len(seq), 0)[0] for p in pairs])
    t_out = torch.tensor([_positions(p[1], len(seq), 0)[0] for p in pairs])
    with probe_mode(model, attention):
        calls = capture_block_calls(model, adapter, blocks, seq[None].to(plan.input_device(model)))
        out = []
        for layer in probed:
            fn = block_function(blocks[layer], calls[layer], adapter, dtype)
            x = calls[layer].input[0].to(dtype)
            out.append(jac_engine(fn, x, t_in.to(x.device), t_out.to(x.device)).cpu())
    return torch.stack(out, dim=1)
