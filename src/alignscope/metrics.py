"""The metric functions, importable as ``from alignscope.metrics import coupling_matrix, line_shape_score``;
they live in :mod:`alignscope.core.metrics`."""

from alignscope.core.metrics import *  # noqa: F403
