"""The AlignmentMonitor's probe shared by DDP ranks: each rank probes its prompts, rank 0 joins and writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from alignscope import probe
from alignscope.apps.resumed_probes import probe_folder
from alignscope.apps.shared_probe import shared_probe, shares
from alignscope.models.tiny import tiny_model
from alignscope.probing.result import ProbeResult
from alignscope.probing.settings import ProbeSettings
from conftest import assert_results_close


def test_shares_are_contiguous_and_cover_every_prompt():
    assert shares(3, 2) == [range(0, 1), range(1, 3)]
    assert shares(1, 2) == [range(0, 0), range(0, 1)]  # fewer prompts than ranks: rank 0 probes none
    assert [i for s in shares(10, 4) for i in s] == list(range(10))


def test_single_process_shared_probe_is_the_probe():
    model, prompts = tiny_model("gpt2"), [[1, 2, 3], [4, 5, 6, 7]]
    res = shared_probe(model, prompts, ProbeSettings(), rank=0, world_size=1)
    ref = probe(model, prompts)
    torch.testing.assert_close(res.coupling[10], ref.coupling[10])
    assert "world_size" not in res.meta


def test_ddp_ranks_share_the_probe_and_rank0_writes_it(tmp_path):
    script = Path(__file__).parent / "ddp_probe_fit.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "probes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]  # written once, by rank 0
    assert all(r["world_size"] == 2 and r["prompts_per_rank"] == [1, 2] for r in records)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"steps": [0, 1]}

    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_probe_fit import PROMPTS

    shared = ProbeResult.load(probe_folder(tmp_path, 0))
    alone = probe(tiny_model("llama"), PROMPTS)  # the step-0 weights: the seeded init
    assert shared.meta["prompt_lengths"] == alone.meta["prompt_lengths"] == [5, 7, 4]
    torch.testing.assert_close(shared.tokens, alone.tokens)
    assert_results_close(shared, alone, atol=1e-5)
