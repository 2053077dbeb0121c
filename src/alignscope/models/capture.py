"""Capture each block's real call (its arguments and output) with hooks, and re-call a block as a function.

:func:`probe_mode` puts a model into the state a probe needs (eval, differentiable attention, no
parameter gradients) and restores the caller's state afterwards. :func:`capture_block_calls` runs one
sequence through the model and records, for every block, the hidden-state input, the other positional and
keyword arguments (masks, rotary embeddings, position ids), and the hidden-state output.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.models.adapters import CACHE_KWARGS, BlockAdapter


@dataclass
class BlockCall:
    """One recorded block call for a batch of one sequence.

    ``input`` and ``output``: ``[1, T, d]`` hidden states; ``args``: positional arguments after the hidden
    states; ``kwargs``: keyword arguments (the hidden states removed if they were passed by keyword).
    """

    input: Tensor
    output: Tensor
    args: tuple
    kwargs: dict[str, Any]
    hidden_keyword: bool = False


@contextlib.contextmanager
def probe_mode(model: nn.Module, attention: str = "eager") -> Iterator[None]:
    """Eval mode, ``attention`` implementation (``"eager"`` default, or ``"sdpa"`` with the math kernel),
    the eager (plain loop) experts implementation of a mixture-of-experts model, no parameter gradients;
    the model's training flags, attention and experts settings and ``requires_grad`` flags are restored on
    exit, also after an error. Parameter values are never touched."""
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention must be 'eager' or 'sdpa' (math kernel), got {attention!r}")
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    config = getattr(model, "config", None)
    previous_attn = getattr(config, "_attn_implementation", None)
    previous_experts = _experts_implementation(model)
    switched = False
    try:
        model.eval()
        for p in requires_grad:
            p.requires_grad_(False)
        if (
            previous_attn is not None
            and previous_attn != attention
            and hasattr(model, "set_attn_implementation")
        ):
            model.set_attn_implementation(attention)  # some models (e.g. Falcon) keep theirs: math SDPA below
            switched = getattr(config, "_attn_implementation", None) != previous_attn
        if previous_experts not in (None, "eager"):
            model.set_experts_implementation("eager")  # the plain loop over experts: any dtype, any engine
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]), torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        if switched:
            model.set_attn_implementation(previous_attn)
        if previous_experts not in (None, "eager"):
            model.set_experts_implementation(previous_experts)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.training = flag


def _experts_implementation(model: nn.Module) -> str | None:
    """A mixture-of-experts model's experts implementation (transformers' ``grouped_mm``, ``batched_mm``,
    ``eager``), or None for a model without one that can be switched."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    try:
        if not callable(can_set) or not can_set():
            return None
    except Exception:
        return None
    value = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return value if isinstance(value, str) else None


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments of a capturing forward: ``use_cache=False`` where the model takes it, and
    ``logits_to_keep=1`` where it takes that (the logits of every position are never read here)."""
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


def capture_block_calls(
    model: nn.Module, adapter: BlockAdapter, blocks: nn.ModuleList, inputs: Tensor
) -> list[BlockCall]:
    """Run one prompt through ``model`` and record every block's call, in block order. ``inputs``: token ids
    ``[1, T]``, or pixels ``[1, C, H, W]`` for a vision adapter (passed as ``adapter.inputs``)."""
    with torch.no_grad(), _recording(blocks, adapter) as records:
        model(**{adapter.inputs: inputs}, **_forward_kwargs(model))
    return _calls(records)


@contextlib.contextmanager
def _recording(blocks: nn.ModuleList, adapter: BlockAdapter) -> Iterator[list[dict[str, Any]]]:
    """Hooks that record every block's inputs, arguments and output while the context is open."""
    records: list[dict[str, Any]] = [{} for _ in blocks]
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(_record_input(records[i]), with_kwargs=True))
        handles.append(block.register_forward_hook(_record_output(records[i], adapter), with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _calls(records: list[dict[str, Any]]) -> list[BlockCall]:
    missing = [i for i, r in enumerate(records) if "output" not in r]
    if missing:
        raise RuntimeError(
            f"blocks {missing} were not called during the forward pass: the adapter's block list does not match "
            "the model's forward; register a corrected one with alignscope.models.register_adapter()"
        )
    return [BlockCall(**r) for r in records]


def _prepare(value: Any, n: int, dtype: torch.dtype) -> Any:
    """Broadcast a captured argument from batch 1 to batch ``n`` and cast floating tensors to ``dtype``."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            value = value.to(dtype)
        if value.ndim >= 2 and value.shape[0] == 1 and n != 1:
            value = value.expand(n, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_prepare(v, n, dtype) for v in value)
    if isinstance(value, list):
        return [_prepare(v, n, dtype) for v in value]
    return value


def block_function(block: nn.Module, call: BlockCall, adapter: BlockAdapter, dtype: torch.dtype):
    """The block as a function ``[n, T, d] -> [n, T, d]`` of its hidden-state input, every other argument
    as captured (no KV cache). If the block's parameters are not in ``dtype``, a cast copy is called."""
    block = _in_dtype(block, dtype)
    kwargs = dict(call.kwargs)
    for name in CACHE_KWARGS:
        if name in kwargs:
            kwargs[name] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False

    def fn(hidden: Tensor) -> Tensor:
        n = hidden.shape[0]
        return _call(block, call, adapter, hidden, _prepare(call.args, n, dtype), _prepare(kwargs, n, dtype))

    return fn


def _in_dtype(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``block`` itself, or a copy cast to ``dtype`` when its parameters are in another floating dtype. A
    block with quantized (integer) weights, e.g. bitsandbytes layers, is never cast: it computes with its
    own dequantized weights, in its compute dtype."""
    params = list(block.parameters())
    if not params or any(not p.is_floating_point() for p in params):
        return block
    return copy.deepcopy(block).to(dtype) if params[0].dtype != dtype else block


def _call(
    block: nn.Module, call: BlockCall, adapter: BlockAdapter, hidden: Tensor, args: tuple, kwargs: dict
):
    """``block`` re-called on ``hidden`` (by position or keyword, as captured): the hidden-state output."""
    out = (
        block(*args, hidden_states=hidden, **kwargs)
        if call.hidden_keyword
        else block(hidden, *args, **kwargs)
    )
    return adapter.hidden_from_output(out)


# ------------------------------------------------------------------------------------ single-token calls
def _find_cache(call: BlockCall) -> Any:
    from transformers import Cache

    for value in (*call.args, *call.kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def capture_token_calls(
    model: nn.Module, adapter: BlockAdapter, blocks: nn.ModuleList, input_ids: Tensor, t: int
) -> list[BlockCall]:
    """Record every block's call for token ``t`` *alone*, against the model's own KV cache of tokens ``< t``.

    The prefix ``input_ids[:, :t]`` fills a cache, then token ``t`` runs as one decoding step with hooks on
    the blocks; the cache is put back to its prefix state afterwards. Each ``BlockCall`` has ``[1, 1, d]``
    input and output and holds the cache object among its arguments.
    """
    ((_, calls),) = capture_tokens_calls(model, adapter, blocks, input_ids, [t])
    return calls


def capture_tokens_calls(
    model: nn.Module, adapter: BlockAdapter, blocks: nn.ModuleList, input_ids: Tensor, positions: list[int]
) -> Iterator[tuple[int, list[BlockCall]]]:
    """:func:`capture_token_calls` for each of ``positions`` (ascending), sharing one prefix pass: the KV
    cache grows from one probed token to the next (``input_ids[:, t_prev : t]`` appended), so the prompt runs
    through the model once instead of once per token. Yields ``(t, calls)``; the calls of a token are valid
    until the next one is requested (the cache object is shared)."""
    from transformers import DynamicCache

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    forward_kw = {**_forward_kwargs(model), "use_cache": True}
    cache, filled = None, 0
    for t in positions:
        with torch.no_grad():
            if t > filled:
                kwargs = {cache_kw: cache} if cache is not None else {}
                out = model(input_ids=input_ids[:, filled:t], **forward_kw, **kwargs)
                cache = getattr(out, "cache", None) or out.past_key_values
                filled = t
            if cache is None:
                cache = DynamicCache(config=model.config)
            snapshot = _snapshot(cache)
            try:
                with _recording(blocks, adapter) as records:
                    model(input_ids=input_ids[:, t : t + 1], **forward_kw, **{cache_kw: cache})
            finally:
                _restore(cache, snapshot)
        yield t, _calls(records)


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an accelerate hook (a model loaded with ``device_map``) runs ``module`` on, else None."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def _record_input(record: dict[str, Any]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = dict(kwargs)
        if args:
            hidden, rest, by_keyword = args[0], tuple(args[1:]), False
        else:
            hidden, rest, by_keyword = kw.pop("hidden_states"), (), True
        device = execution_device(module)  # the block's own device, where its Jacobian is taken
        hidden = hidden.detach() if device is None else hidden.detach().to(device)
        record.update(input=hidden, args=rest, kwargs=kw, hidden_keyword=by_keyword)

    return hook


def _record_output(record: dict[str, Any], adapter: BlockAdapter):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record["output"] = adapter.hidden_from_output(output).detach()

    return hook


def _snapshot(cache: Any) -> list[dict[str, Any]]:
    """The cache's per-layer state (tensor references and counters); updates replace, never mutate, tensors."""
    return [dict(layer.__dict__) for layer in cache.layers]


def _restore(cache: Any, snapshot: list[dict[str, Any]]) -> None:
    del cache.layers[len(snapshot) :]
    for layer, state in zip(cache.layers, snapshot):
        layer.__dict__.clear()
        layer.__dict__.update(state)


def _in_dtype_with_cache(block: nn.Module, cache: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """``(block, cache)`` themselves, or, when the block's parameters are not in ``dtype``, a cast copy of
    the block and a copy of the cache with its keys and values cast to ``dtype``."""
    cast = _in_dtype(block, dtype)
    if cast is block:
        return block, cache
    cache = copy.deepcopy(cache)
    for layer in cache.layers:
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if isinstance(value, Tensor) and value.is_floating_point():
                setattr(layer, name, value.to(dtype))
    return cast, cache


def token_block_function(block: nn.Module, call: BlockCall, adapter: BlockAdapter, dtype: torch.dtype):
    """Block ``l`` for one token: ``[1, 1, d] -> [1, 1, d]``, attending to the cached keys and values of the
    earlier tokens (constants), the cache put back after every call. Only batch 1 (one token) is allowed."""
    original = _find_cache(call)
    if original is None:
        raise RuntimeError(
            "the captured decoding step passed no KV cache to the block, so it cannot be called on one token; "
            "use engine='exact'"
        )
    block, cache = _in_dtype_with_cache(block, original, dtype)
    swap = lambda v: cache if v is original else v  # noqa: E731
    args = tuple(swap(a) for a in call.args)
    kwargs = {k: swap(v) for k, v in call.kwargs.items()}

    def fn(hidden: Tensor) -> Tensor:
        if hidden.shape[0] != 1:
            raise ValueError(
                "the single-token block call takes one token at a time (batch 1); use chunked rows"
            )
        snapshot = _snapshot(cache)
        try:
            return _call(block, call, adapter, hidden, _prepare(args, 1, dtype), _prepare(kwargs, 1, dtype))
        finally:
            _restore(cache, snapshot)

    return fn


def token_copies_function(block: nn.Module, call: BlockCall, adapter: BlockAdapter, dtype: torch.dtype):
    """Block ``l`` on ``n`` independent copies of token ``t`` in one call: ``[n, d] -> [n, d]``, or ``None``
    when the captured call has an argument this cannot rewrite (then use :func:`token_block_function`).

    The copies go in as ``n`` positions of one sequence after the cached tokens, all at token ``t``'s
    position, with an attention mask that lets copy ``i`` see the cached tokens exactly as token ``t`` did
    (its captured mask row, sliding windows included) and itself, never the other copies. So row ``i`` of
    the output depends on input row ``i`` alone, exactly as in the single-token call, and one backward pass
    over ``n`` copies gives ``n`` rows of the Jacobian: no ``vmap``, and the cached keys and values are
    shared by all copies instead of receiving a gradient per row (which the batched single-token products
    now avoid too, :mod:`alignscope.autodiff.constant_cache`; copies remain CUDA's plan for long contexts). Rewritten: the ``[1, 1, 1, t + 1]`` mask (float or bool),
    ``position_ids`` ``[1, 1]``, ``cache_position`` ``[1]``, rotary ``position_embeddings`` ``([1, 1, e],
    [1, 1, e])``; any other tensor argument (e.g. MPT's ``position_bias``) gives ``None``, and so does an
    adapter with ``token_copies=False`` (masking inside the module, e.g. GPT-Neo's local attention).
    """
    cache = _find_cache(call)
    if cache is None or not adapter.token_copies:
        return None
    rewrite: dict[Any, str] = {}
    for key, value in [*enumerate(call.args), *call.kwargs.items()]:
        kind = _copy_rule(key, value)
        if kind is None:
            return None
        rewrite[key] = kind
    if "mask" not in rewrite.values():  # without a mask the copies would see each other (or be causal)
        return None
    block, cache = _in_dtype_with_cache(block, cache, dtype)

    def fn(rows: Tensor) -> Tensor:
        n = rows.shape[0]

        def convert(key: Any, value: Any) -> Any:
            kind = rewrite[key]
            if kind == "cache":
                return cache
            if kind == "keep":
                return value
            if kind == "mask":
                return _copies_mask(value, n, dtype)
            if kind == "rotary":
                return tuple(v.to(dtype).expand(1, n, v.shape[-1]) for v in value)
            return value.expand(*value.shape[:-1], n)  # position_ids [1, 1] / cache_position [1]

        args = tuple(convert(i, v) for i, v in enumerate(call.args))
        kwargs = {k: convert(k, v) for k, v in call.kwargs.items()}
        snapshot = _snapshot(cache)
        try:
            return _call(block, call, adapter, rows[None], args, kwargs)[0]
        finally:
            _restore(cache, snapshot)

    return fn


def _copy_rule(key: Any, value: Any) -> str | None:
    """How :func:`token_copies_function` rewrites one captured argument (None: it cannot)."""
    from transformers import Cache

    if isinstance(value, Cache):
        return "cache"
    if isinstance(value, Tensor):
        if value.ndim == 4 and value.shape[:3] == (1, 1, 1):
            return "mask"
        if key in ("position_ids", "cache_position") and value.numel() == 1:
            return "positions"
        return None
    if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
        if key == "position_embeddings" and all(v.ndim == 3 and v.shape[:2] == (1, 1) for v in value):
            return "rotary"
        return None
    return "keep" if value is None or isinstance(value, (bool, int, float, str)) else None


def _copies_mask(mask: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``[1, 1, 1, t + 1]`` -> ``[1, 1, n, t + n]``: each copy sees the cache as token ``t`` did, and itself."""
    t = mask.shape[-1] - 1
    if mask.dtype == torch.bool:
        out = torch.zeros(1, 1, n, t + n, dtype=torch.bool, device=mask.device)
    else:
        mask = mask.to(dtype)
        out = torch.full((1, 1, n, t + n), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    out[..., :t] = mask[..., :t]
    idx = torch.arange(n, device=mask.device)
    out[0, 0, idx, t + idx] = mask[0, 0, 0, t]
    return out
