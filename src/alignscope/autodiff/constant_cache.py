"""Attention over a constant KV cache: no per-row gradients for the cached keys and values.

In a single-token block call (:func:`alignscope.models.capture.token_block_function`) the token attends to the
cached keys and values of the earlier tokens, which are constants, and to its own, which depend on the input
row. The model's cache joins them (``torch.cat([cached, new], dim=-2)``) and autograd then differentiates the
attention's matrix products with respect to the whole joined tensor. Under ``vmap`` (the batched VJPs of the
exact and randomized engines) that costs, for every identity row, a ``[heads, T, head_dim]`` gradient of the
cache that is thrown away, plus ``rows x heads`` matrix-vector products against copies of the cache expanded
per row, most of a Jacobian's time at long contexts (measured in docs/benchmarks.md).

While :func:`alignscope.autodiff.batching.batchable_backward` is active:

- ``torch.cat([c, n], dim)`` with ``c`` a constant and ``n`` requiring grad returns the joined tensor as
  usual and remembers its two parts (:class:`Parts`);
- shape operations on such a tensor (indexing with full slices and new axes, ``expand``, ``reshape``,
  ``view``, ``transpose``, ``contiguous``, ``repeat_interleave`` along another dimension, scaling by a
  number) remember the same operation applied to each part;
- a matrix product with one such operand is computed part by part: ``q [c; n]^T = [q c^T, q n^T]`` and
  ``p [c; n] = p_c c + p_n n``, the constant part as one 2-D product per head
  (:func:`per_matrix_matmul`), whose batched backward is one ``[rows, T] x [T, head_dim]`` product per head
  instead of per-row matrix-vector products against copies of the cache; the token's own part (one
  position long) as elementwise products (:func:`new_part_matmul`), whose batched backward is elementwise.

The values equal those of the joined computation up to float rounding (sums in another order). A part
record is used only while the tensor and both parts are unmodified (their version counters); any other
operation on a joined tensor runs on the joined tensor, as without this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_ATTRIBUTE = "_alignscope_parts"


@dataclass(frozen=True)
class Parts:
    """A tensor that is ``cat([constant, new], dim)``; versions: the three tensors' version counters then."""

    constant: Tensor
    new: Tensor
    dim: int
    versions: tuple[int, int, int]


def parts_of(x: object) -> Parts | None:
    """The :class:`Parts` of ``x`` if it is a joined tensor that none of the three has modified since."""
    parts = getattr(x, _ATTRIBUTE, None) if isinstance(x, Tensor) else None
    if parts is None or parts.versions != (x._version, parts.constant._version, parts.new._version):
        return None
    return parts


def remember(out: Tensor, constant: Tensor, new: Tensor) -> Tensor:
    """Record ``out = cat([constant, new], dim)`` for the one dimension where the sizes add up (and every other
    size agrees); nothing is recorded when the shapes do not fit that pattern. Returns ``out``."""
    if constant.requires_grad or constant.dim() != out.dim() or new.dim() != out.dim():
        return out
    differ = [j for j in range(out.dim()) if not (constant.shape[j] == new.shape[j] == out.shape[j])]
    if len(differ) == 1 and constant.shape[differ[0]] + new.shape[differ[0]] == out.shape[differ[0]]:
        parts = Parts(constant, new, differ[0], (out._version, constant._version, new._version))
        setattr(out, _ATTRIBUTE, parts)
    return out


def joined(tensors: object, dim: int = 0) -> Tensor | None:
    """``torch.cat(tensors, dim)`` with its parts remembered when ``tensors`` is ``[constant, requires grad]``
    (a KV cache's update); None for any other concatenation."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return None
    constant, new = tensors
    if not (isinstance(constant, Tensor) and isinstance(new, Tensor)):
        return None
    if constant.requires_grad or not new.requires_grad or constant.numel() == 0 or new.numel() == 0:
        return None
    return remember(torch.cat(tensors, dim), constant, new)


def on_parts(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)``, with ``fn`` applied to each part of ``x`` too when ``x`` is joined (``fn`` must act on
    every slice along the joined dimension alike: a view, a copy, an elementwise scaling)."""
    out = fn(x)
    parts = parts_of(x)
    if parts is not None and isinstance(out, Tensor):
        remember(out, fn(parts.constant), fn(parts.new))
    return out


_FULL = slice(None)


def shape_op(func: Callable, args: tuple, kwargs: dict) -> Tensor | None:
    """A shape operation (``func`` one of :data:`SHAPE_OPS`) on a joined ``args[0]``, parts remembered; None
    when ``args[0]`` is not joined or the operation could mix the joined dimension with others."""
    x = args[0]
    parts = parts_of(x)
    if parts is None:
        return None
    rest = args[1:]
    if func is Tensor.__getitem__:
        index = rest[0] if isinstance(rest[0], tuple) else (rest[0],)
        if not all(
            item is None or item is Ellipsis or (isinstance(item, slice) and item == _FULL) for item in index
        ):
            return None
        return on_parts(lambda t: t[rest[0]], x)
    if func is Tensor.expand:
        sizes = list(rest[0] if len(rest) == 1 and not isinstance(rest[0], int) else rest)
        position = len(sizes) - (x.dim() - parts.dim)  # expand aligns sizes from the right
        out = x.expand(*sizes, **kwargs)
        sizes[position] = -1
        return remember(out, parts.constant.expand(*sizes), parts.new.expand(*sizes))
    if func in (Tensor.reshape, Tensor.view):
        out = func(*args, **kwargs)
        before = math.prod(x.shape[: parts.dim])
        for j in range(out.dim()):
            if math.prod(out.shape[:j]) == before and out.shape[j] == x.shape[parts.dim]:
                shape = list(out.shape)
                shape[j] = parts.constant.shape[parts.dim]
                constant = parts.constant.reshape(shape)
                shape[j] = parts.new.shape[parts.dim]
                return remember(out, constant, parts.new.reshape(shape))
        return out
    if func in (Tensor.repeat_interleave, torch.repeat_interleave):
        dim = kwargs.get("dim", rest[1] if len(rest) > 1 else None)
        if dim is None or dim % x.dim() == parts.dim:
            return None
    if func in _SCALINGS and not (len(rest) == 1 and isinstance(rest[0], (int, float)) and not kwargs):
        return None
    return on_parts(lambda t: func(t, *rest, **kwargs), x)


_SCALINGS = (
    Tensor.__mul__,
    Tensor.__rmul__,
    Tensor.mul,
    torch.mul,
    Tensor.__truediv__,
    Tensor.div,
    torch.div,
)
SHAPE_OPS = frozenset(
    {
        Tensor.__getitem__,
        Tensor.expand,
        Tensor.reshape,
        Tensor.view,
        Tensor.transpose,
        torch.transpose,
        Tensor.contiguous,
        Tensor.repeat_interleave,
        torch.repeat_interleave,
        *_SCALINGS,
    }
)
"""Operations whose result keeps the parts of a joined first argument (see :func:`shape_op`)."""
MATMULS = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__})
CATS = frozenset({torch.cat, torch.concat, torch.concatenate})


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, part by part when exactly one of them is joined along one of its two matrix dimensions."""
    out = split_matmul(a, b)
    return torch.matmul(a, b) if out is None else out


def split_matmul(a: object, b: object) -> Tensor | None:
    """``a @ b`` from the parts of a joined operand (see the module docstring); None when neither or both
    are joined, or the joined dimension is a batch dimension."""
    pa, pb = parts_of(a), parts_of(b)
    if (pa is None) == (pb is None) or a.dim() < 2 or b.dim() < 2:
        return None
    if pb is not None:
        where = pb.dim - b.dim()
        if where == -1:  # columns: [a c, a n]
            return torch.cat([per_matrix_matmul(a, pb.constant, True), new_part_matmul(a, pb.new)], -1)
        if where == -2:  # the contracted dimension: a[:, :m] c + a[:, m:] n
            m = pb.constant.shape[-2]
            return per_matrix_matmul(a[..., :m], pb.constant, True) + new_part_matmul(a[..., m:], pb.new)
        return None
    where = pa.dim - a.dim()
    if where == -2:  # rows: [c b; n b]
        return torch.cat([per_matrix_matmul(b, pa.constant, False), new_part_matmul(pa.new, b)], -2)
    if where == -1:
        m = pa.constant.shape[-1]
        return per_matrix_matmul(b[..., :m, :], pa.constant, False) + new_part_matmul(pa.new, b[..., m:, :])
    return None


def new_part_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for the part that depends on the input (the token's own key or value, one position long):
    elementwise when the contracted size is 1 (an outer product, ``[..., M, 1] x [..., 1, N]``) or ``b`` has
    one column (a dot product per row of ``a``), else a matrix product. The batched backward of the
    elementwise forms is elementwise too, where a product's would be one tiny matrix product per cotangent
    row and head."""
    if a.shape[-1] == 1:
        return a * b
    if b.shape[-1] == 1:
        return (a * b.transpose(-1, -2)).sum(-1, keepdim=True)
    return torch.matmul(a, b)


def per_matrix_matmul(x: Tensor, c: Tensor, right: bool) -> Tensor:
    """``x @ c`` (``right=True``) or ``c @ x`` as one 2-D product per matrix of ``c`` (e.g. per head; batch
    dimensions broadcast), stacked: ``[*batch, M, N]``.

    With ``c`` a constant, the backward of each 2-D product is ``grad @ c^T`` (or ``c^T @ grad``) in 2-D, which
    ``is_grads_batched`` (torch's legacy vmap) folds into one matrix product over all cotangent rows; a batched
    product (``bmm``) would instead broadcast ``c`` to a copy per row, and an ``autograd.Function`` here would
    run once per row."""
    if c.dim() == 2:
        return torch.matmul(x, c) if right else torch.matmul(c, x)
    batch = torch.broadcast_shapes(x.shape[:-2], c.shape[:-2])
    xs = x.expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:]).unbind(0)
    cs = c.expand(*batch, *c.shape[-2:]).reshape(-1, *c.shape[-2:]).unbind(0)
    # "* 1": its backward hands each product a freshly laid-out cotangent, which torch's matmul folds into
    # one 2-D product over all rows; the slice of the stacked heads' cotangent cannot be viewed as a matrix,
    # and would run as one matrix-vector product per row
    out = [(torch.matmul(a, b) if right else torch.matmul(b, a)) * 1 for a, b in zip(xs, cs, strict=True)]
    return torch.stack(out).reshape(*batch, *out[0].shape)
