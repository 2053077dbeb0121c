"""Probing a model: the engines, the analysis of per-token Jacobians, ``probe()`` and its ``ProbeResult``, and
the sentences that explain degenerate numbers."""
