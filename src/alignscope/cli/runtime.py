"""Shared by the Hydra apps: building objects from configs, and closing W&B runs."""

from __future__ import annotations

from typing import Any


def build(spec: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising a configuration error (``ValueError``/``TypeError``) of the
    built object itself, so that the message that says what to fix comes first."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(spec, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise cause from None
        raise


def finish_wandb(loggers: list[Any], exit_code: int) -> None:
    """Close W&B runs so that the next job of a multirun gets its own run."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
