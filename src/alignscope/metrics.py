"""The metric functions, importable as ``from alignscope.metrics import coupling_matrix, line_shape_score``;
they live in :mod:`alignscope.core.metrics` and :mod:`alignscope.core.factorization` (``svd``, ``top_svd``)."""

from alignscope.core.factorization import *  # noqa: F403
from alignscope.core.metrics import *  # noqa: F403
