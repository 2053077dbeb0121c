"""The package's layers (core < autodiff < models < probing < apps, import-linter contracts in
pyproject.toml), and a library import that stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run(
        [lint, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_core_imports_stay_light():
    code = (
        "import sys, alignscope, alignscope.metrics, alignscope.core.metrics, alignscope.autodiff.jacobian,"
        " alignscope.probing.probe, alignscope.models, alignscope.core.randomized, alignscope.probing.engines;"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'wandb', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_imports():
    from alignscope import (  # noqa: F401
        BlockAdapter,
        ProbeResult,
        RandomizedSVD,
        probe,
        random_init_twin,
        register_adapter,
        token_jacobians,
    )
    from alignscope.metrics import coupling_matrix, line_shape_score  # noqa: F401

    assert callable(probe) and callable(token_jacobians)
