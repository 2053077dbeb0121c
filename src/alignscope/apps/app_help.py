"""``--help`` of the Hydra apps: only the config groups the app's primary config uses.

All apps share one ``conf/`` folder, so Hydra's ``$APP_CONFIG_GROUPS`` would list every app's groups. The help
template (``conf/hydra/default.yaml``) uses the ``alignscope_groups`` resolver instead: the groups in the
app's composed defaults (``hydra.runtime.choices``, less Hydra's own), each with its options; an option whose
name starts with ``_`` (a shared base such as ``model/_base``) is not one to choose and is left out.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from alignscope.apps.config import config_dir

RESOLVER = "alignscope_groups"


def group_options(group: str, root: str | None = None) -> list[str]:
    """The options of config group ``group``: its ``.yaml`` files, less those starting with ``_``."""
    folder = Path(root or config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def app_groups() -> str:
    """``group: option, option`` lines for the groups of the running app's primary config (default first
    marked with ``*``)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    lines = []
    for group in sorted(g for g in choices if g != "hydra" and not g.startswith("hydra/")):
        chosen = choices[group]
        options = [f"{o}*" if o == chosen else o for o in group_options(group)]
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def register_help_resolver() -> None:
    """Make ``${alignscope_groups:}`` available to the help template (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, app_groups)
