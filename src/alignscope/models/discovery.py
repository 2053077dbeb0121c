"""Block adapters found from a model's structure, for architectures with no registry entry.

:func:`discover_adapter` finds the block stack (the ``nn.ModuleList`` with one entry per layer of the
config), the final norm, the input kind, and whether the single-token engine can evaluate a token alone
against the model's KV cache. Nothing found is trusted before it is checked on a short real forward:

- the blocks must all be called, once each and in order, with hidden states ``[1, T, d]``, and they must
  *chain*: each block's input equals the previous block's output (else the stack is not the residual path);
- no block is also passed an earlier block's input through another argument (connections across blocks);
- each block re-called with its recorded arguments reproduces its output, through autograd;
- the final norm is the norm module beside the stack (or beside one of its ancestors) whose input is the
  last block's output;
- ``causal``: a decoding step against the model's own cache reproduces every block's output at two tokens
  (the second and the last), and re-calling each block on such a token (twice, the cache put back between)
  gives it again;
- ``token_copies``: several copies of the token in one call give the single-token output.

A model that fails one of the first three checks is refused with the reason and the registration hook;
failing a later check turns the feature off (``causal=False``: the full-sequence engine) and says why in
``notes``.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from alignscope.models.adapters import BlockAdapter, config_attr

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config attributes that hold the number of blocks."""
_PREFERRED = ("language_model", "text_model", "decoder")
"""Path parts that mark the language model's stack among several of the same length."""
_CHAIN_RTOL = 1e-5

_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, BlockAdapter] = weakref.WeakKeyDictionary()


class DiscoveryError(NotImplementedError):
    """No verified block stack: the message says what was found, what failed and how to register one;
    ``reason`` is the failed check alone."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def layer_count(config: Any, vision: bool = False) -> int | None:
    """The number of blocks the config declares: of its text config for a composite model, of its vision
    config for a vision model (``vision``); None when it declares none."""
    configs = _configs(config)
    if vision and getattr(config, "vision_config", None) is not None:
        configs = [config.vision_config, *configs]
    for cfg in configs:
        for key in LAYER_COUNT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _configs(config: Any) -> list[Any]:
    out = []
    try:
        text = config.get_text_config()
        if text is not config:
            out.append(text)
    except Exception:  # several text configs (ambiguous), or not a PretrainedConfig
        pass
    return [*out, config]


def discover_adapter(model: nn.Module) -> BlockAdapter:
    """A verified :class:`BlockAdapter` for ``model`` (cached per model instance); raises
    :class:`DiscoveryError` when no block stack passes the checks."""
    cached = _DISCOVERED.get(model)
    if cached is not None:
        return cached
    adapter = _discover(model)
    _DISCOVERED[model] = adapter
    return adapter


def _refuse(model: nn.Module, why: str) -> DiscoveryError:
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return DiscoveryError(
        f"alignscope cannot probe {type(model).__name__} (model_type {model_type!r}): {why}. If the model has "
        f"a residual block stack, register it: alignscope.register_adapter({model_type!r}, "
        "BlockAdapter(block_paths=('<path.to.blocks>',)))",
        why,
    )


def structural_refusal(model: nn.Module) -> str | None:
    """Why ``model`` has no block stack to probe, from its structure alone (no forward; works on the meta
    device), or None when it has candidates."""
    return _candidate_stacks(model)[1]


def _candidate_stacks(model: nn.Module) -> tuple[list[str], str | None]:
    """The dotted paths of the candidate stacks (:func:`_stack_paths`), or ``([], why there are none)``."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and _has_both_stacks(model):
        return [], (
            "it is an encoder-decoder model, with two block stacks; probe one stack as a model of its own, "
            "e.g. alignscope.probe(model.get_encoder(), input_ids)"
        )
    n = layer_count(config, _is_vision(model))
    if n is None:
        return [], f"its config declares no block count (none of {', '.join(LAYER_COUNT_KEYS)})"
    paths = _stack_paths(model, n)
    return paths, None if paths else f"no nn.ModuleList of {n} blocks (the config's block count) was found"


def _has_both_stacks(model: nn.Module) -> bool:
    """An encoder and a decoder inside (an encoder-decoder model, not one of its stacks alone)."""
    base = getattr(model, "base_model", model)
    return any(
        isinstance(getattr(root, "encoder", None), nn.Module)
        and isinstance(getattr(root, "decoder", None), nn.Module)
        for root in (model, base)
    )


def _discover(model: nn.Module) -> BlockAdapter:
    paths, why = _candidate_stacks(model)
    if why is not None:
        raise _refuse(model, why)
    if _device(model).type == "meta" and not hasattr(model, "hf_device_map"):
        raise _refuse(
            model, "its weights are on the meta device (not loaded); load them, e.g. from_pretrained()"
        )
    inputs = "pixel_values" if _is_vision(model) else "input_ids"
    from alignscope.models.capture import probe_mode

    first_refusal = None
    for path in paths:  # the most likely stack first; the first that passes the checks is the one
        provisional = BlockAdapter(block_paths=(path,), inputs=inputs, causal=False, source="discovered")
        try:
            with probe_mode(model):
                return _verified(model, provisional)
        except DiscoveryError as err:
            first_refusal = first_refusal or err
    raise first_refusal


def _is_vision(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def _stack_paths(model: nn.Module, n: int) -> list[str]:
    """Dotted paths of the candidate block stacks, outermost ``nn.ModuleList`` s of ``n`` modules: the
    language model's (by name) first, then by parameter count."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name
    ]
    outer = [(name, mod) for name, mod in found if not any(name.startswith(o + ".") for o, _ in found)]

    def rank(item: tuple[str, nn.Module]) -> tuple[int, int]:
        name, mod = item
        preferred = any(part in _PREFERRED for part in name.split("."))
        return (int(preferred), sum(p.numel() for p in mod.parameters()))

    return [name for name, _ in sorted(outer, key=rank, reverse=True)]


def _probe_input(model: nn.Module, adapter: BlockAdapter) -> Tensor:
    """A short input for the checks: 4 token ids, or one random image of the config's size."""
    config = model.config
    device = _device(model)
    if adapter.inputs == "pixel_values":
        g = torch.Generator().manual_seed(0)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return torch.randn(1, *image_shape(config), generator=g).to(device=device, dtype=dtype)
    vocab = config_attr(model, "vocab_size")
    vocab = vocab if isinstance(vocab, int) else 16
    return (torch.arange(4) % max(vocab - 3, 1) + 3).clamp(max=vocab - 1)[None].to(device)


def vision_attr(config: Any, name: str) -> Any:
    """``config.<name>``, or its ``vision_config``'s (CLIP-style composite configs)."""
    value = getattr(config, name, None)
    return value if value is not None else getattr(getattr(config, "vision_config", None), name, None)


def image_shape(config: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a vision config's images (3 x 224 x 224 where it does not say)."""
    size = vision_attr(config, "image_size") or 224
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return vision_attr(config, "num_channels") or 3, height, width


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _verified(model: nn.Module, adapter: BlockAdapter) -> BlockAdapter:
    from alignscope.models.capture import capture_block_calls

    blocks = adapter.blocks(model)
    inputs = _probe_input(model, adapter)
    norms = _norm_candidates(model, adapter.block_paths[0])
    seen: dict[str, list[Tensor]] = {}  # every input of each norm (one module may also norm the embeddings)

    def record(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.setdefault(name, []).append(_first_tensor(args, kwargs))

        return hook

    handles = [mod.register_forward_pre_hook(record(name), with_kwargs=True) for name, mod in norms]
    counts = [0] * len(blocks)

    def count(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            counts[i] += 1

        return hook

    handles += [block.register_forward_pre_hook(count(i)) for i, block in enumerate(blocks)]
    try:
        calls = capture_block_calls(model, adapter, blocks, inputs)
    except Exception as err:
        why = f"its forward through the stack {adapter.block_paths[0]!r} fails ({type(err).__name__}: {err})"
        raise _refuse(model, why) from err
    finally:
        for h in handles:
            h.remove()
    repeated = [i for i, c in enumerate(counts) if c > 1]
    if repeated:
        raise _refuse(
            model,
            f"blocks {repeated} of {adapter.block_paths[0]!r} run {max(counts)} times in one forward (a looped, "
            "recurrent-depth stack), so 'the Jacobian of block l' has no single value",
        )
    first = calls[0].input
    if first.ndim != 3 or first.shape[0] != 1:
        raise _refuse(
            model,
            f"its blocks take hidden states of shape {tuple(first.shape)} for one prompt, not [1, tokens, d] "
            "(e.g. several parallel residual streams)",
        )
    if adapter.inputs == "input_ids" and first.shape[1] != inputs.shape[1]:
        raise _refuse(
            model, f"its blocks see {first.shape[1]} positions for a {inputs.shape[1]}-token prompt"
        )
    for i in range(len(calls) - 1):
        out, nxt = calls[i].output, calls[i + 1].input
        if out.shape != nxt.shape or not _close(out, nxt):
            raise _refuse(
                model,
                f"the outputs of the blocks in {adapter.block_paths[0]!r} do not chain: block {i + 1}'s input "
                f"is not block {i}'s output (the model changes the residual stream between blocks)",
            )
    _check_second_stream(model, calls)
    _check_recall(model, adapter, blocks, calls)
    last = calls[-1].output
    norm = next(
        (
            name
            for name, _ in norms
            if any(x.shape == last.shape and _close(x, last) for x in seen.get(name, ()))
        ),
        None,
    )
    prefix = 0
    if adapter.inputs == "pixel_values":
        patch = vision_attr(model.config, "patch_size")
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch or (0, 0))[:2]
        patches = (inputs.shape[-2] // ph) * (inputs.shape[-1] // pw) if ph and pw else first.shape[1]
        prefix = max(first.shape[1] - patches, 0)
    adapter = dataclasses.replace(
        adapter,
        final_norm_paths=(norm,) if norm else (),
        residual_form="pre-norm" if norm else "post-norm",
        prefix_tokens=prefix,
    )
    if adapter.inputs == "input_ids" and _generates(model):
        adapter = dataclasses.replace(adapter, causal_attention=True)
        adapter = _with_single_token(model, adapter, blocks, inputs, calls)
    return adapter


def _check_second_stream(model: nn.Module, calls: list) -> None:
    """Refuse blocks that are also passed a residual stream through another argument (dense or cross-block
    connections: earlier blocks' states handed to later ones): ``x^l`` then depends on earlier states
    besides ``x^{l-1}``, and a probe would hold that copy constant."""
    for i, call in enumerate(calls[1:], start=1):
        for key, value in [*enumerate(call.args), *call.kwargs.items()]:
            if not (isinstance(value, Tensor) and value.is_floating_point() and value.ndim >= 3):
                continue
            for j in range(i + 1):
                stream = calls[j].input[0].float()  # [T, d]
                if value.shape[-1] != stream.shape[-1] or not stream.abs().max() > 0:
                    continue
                rows = value.detach().float().reshape(-1, stream.shape[-1]).to(stream.device)
                scale = stream.abs().max().item()
                hits = (rows[None] - stream[:, None]).abs().amax(-1) <= _CHAIN_RTOL * scale  # [T, rows]
                if bool(hits.any(-1).all()):
                    raise _refuse(
                        model,
                        f"block {i} is also passed block {j}'s input through its argument {key!r} (connections "
                        "across blocks), so x^l is not a function of x^(l-1) alone",
                    )


def _check_recall(model: nn.Module, adapter: BlockAdapter, blocks: nn.ModuleList, calls: list) -> None:
    """Each block re-called on its recorded input with its recorded arguments must give its recorded output,
    through autograd (a block that runs without a graph, e.g. reversible layers under ``no_grad``, would give
    a zero derivative; one that reads state besides its arguments would give another output)."""
    from alignscope.models.capture import block_function

    for i, (block, call) in enumerate(zip(blocks, calls)):
        fn = block_function(block, call, adapter, call.input.dtype)
        x = call.input.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                y = fn(x)
        except Exception as err:
            why = f"block {i} cannot be re-called with its own arguments ({type(err).__name__}: {err})"
            raise _refuse(model, why) from err
        if not y.requires_grad:
            raise _refuse(
                model,
                f"block {i}'s output does not depend on its input under autograd (the block runs without a "
                "gradient graph, e.g. reversible layers under no_grad), so its Jacobian cannot be taken",
            )
        if y.shape != call.output.shape or not _close(y.detach(), call.output, 1e-4):
            raise _refuse(
                model,
                f"block {i} re-called with its recorded arguments does not reproduce its output (it reads state "
                "besides its arguments, e.g. a second residual stream)",
            )


def _generates(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:
        return False


def _norm_candidates(model: nn.Module, stack_path: str) -> list[tuple[str, nn.Module]]:
    """Norm modules beside the stack: children of its parent, then of each ancestor up to the model, whose
    class is a norm (the innermost first), by dotted path."""
    out: list[tuple[str, nn.Module]] = []
    path = stack_path
    while path:
        path, _, _ = path.rpartition(".")
        parent = model.get_submodule(path) if path else model
        for name, mod in parent.named_children():
            kind = type(mod).__name__.lower()
            if "norm" in kind or isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
                out.append((f"{path}.{name}" if path else name, mod))
    return out


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    value = args[0] if args else next(iter(kwargs.values()), None)
    return value.detach() if isinstance(value, Tensor) else torch.empty(0)


def _close(a: Tensor, b: Tensor, rtol: float = _CHAIN_RTOL) -> bool:
    a, b = a.float(), b.float().to(a.device)  # blocks of a device-mapped model sit on several devices
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return bool(((a - b).abs().max() <= rtol * scale).item())


def _with_single_token(
    model: nn.Module, adapter: BlockAdapter, blocks: nn.ModuleList, inputs: Tensor, calls: list
) -> BlockAdapter:
    """``adapter`` with ``causal`` (and ``token_copies``) set as the checks at two tokens allow."""
    from alignscope.models.capture import capture_tokens_calls, token_block_function, token_copies_function

    causal = dataclasses.replace(adapter, causal=True)
    positions = [1, inputs.shape[1] - 1]  # a token with one cached token before it, and the last
    try:
        for t, token_calls in capture_tokens_calls(model, causal, blocks, inputs, positions):
            for i, (call, full) in enumerate(zip(token_calls, calls)):
                expected = full.output[:, t : t + 1]
                if call.output.shape != expected.shape or not _close(call.output, expected, 1e-4):
                    raise ValueError(f"the decoding step's block {i} output differs from the full forward's")
                fn = token_block_function(blocks[i], call, causal, call.input.dtype)
                with torch.no_grad():
                    for _ in range(2):
                        if not _close(fn(call.input), expected, 1e-4):
                            raise ValueError(
                                f"block {i} re-called on the token does not reproduce its output"
                            )
                    copies = token_copies_function(blocks[i], call, causal, call.input.dtype)
                    if copies is not None and not _close(
                        copies(call.input[0].expand(2, -1)), expected[0], 1e-4
                    ):
                        causal = dataclasses.replace(causal, token_copies=False)
    except Exception as err:
        return dataclasses.replace(
            adapter,
            notes=(
                *adapter.notes,
                f"the single-token engine is off: a token evaluated alone against the KV cache failed its check "
                f"({type(err).__name__}: {str(err)[:200]}); the full-sequence engine ('exact') is used",
            ),
        )
    return causal
