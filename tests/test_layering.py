"""The core math and the library entry point do not import Lightning, Hydra or W&B."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_stay_light():
    code = (
        "import sys, alignscope, alignscope.metrics, alignscope.jacobian, alignscope.probe, alignscope.models,"
        " alignscope.randomized, alignscope.sketch_probe;"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'wandb', 'matplotlib') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
