"""Shared pieces of the benchmark scripts: the measured matmul rate, block sizes, model shapes, zoo models,
one block-token to time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
"""Width, MLP size and heads of a Llama-3-8B block."""
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
"""Width, MLP size and heads of a SmolLM2-135M block."""


def matmul_rate(n: int = 2048, repeats: int = 5, device: torch.device | str = "cpu") -> float:
    """Measured float32 matmul rate (flop/s) of ``n x n`` products on ``device`` (TF32 off on CUDA)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return repeats * 2 * n**3 / (time.perf_counter() - start)


def llama_model(shape: dict[str, int], blocks: int):
    """A Llama model of ``shape`` (width, MLP size, heads) with ``blocks`` blocks at random init (seed 0)."""
    import transformers

    from alignscope.models import random_init_twin

    config = transformers.LlamaConfig(
        **shape, num_hidden_layers=blocks, vocab_size=1000, max_position_embeddings=2048
    )
    return random_init_twin(config, seed=0, model_class=transformers.LlamaForCausalLM)


def block_model(d: int):
    """Two blocks at random init: d = 576 SmolLM2-135M's Llama block, d = 4096 Llama-3-8B's, else GPT-2-shaped."""
    import transformers

    from alignscope.models import random_init_twin

    llama = {576: SMOLLM2_135M, 4096: LLAMA3_8B}
    if d in llama:
        return llama_model(llama[d], 2)
    config = transformers.GPT2Config(
        n_embd=d,
        n_head=max(4, d // 64),
        n_layer=2,
        vocab_size=1000,
        n_positions=2048,
        bos_token_id=0,
        eos_token_id=0,
    )
    return random_init_twin(config, seed=0, model_class=transformers.GPT2LMHeadModel)


def matrix_params(block: torch.nn.Module) -> int:
    """Parameters of a block's weight matrices (the floor is 2 x this x d flops per Jacobian)."""
    return sum(p.numel() for p in block.parameters() if p.ndim == 2)


def zoo_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the zoo entry ``conf/model/<name>.yaml``, loaded as the probe app does."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from alignscope.apps.config import config_dir
    from alignscope.models import load_model, load_tokenizer

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("probe_app", overrides=[f"model={name}"])
    spec = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if not k.startswith("_")}
    return load_model(**spec), load_tokenizer(**spec)


@dataclass
class BlockToken:
    """Block ``layer`` at the last token of a random prompt ``ids`` ``[1, T]``: ``token`` is its single-token
    call (against the KV cache of the earlier tokens), :meth:`full` its full-sequence call."""

    model: Any
    adapter: Any
    blocks: Any
    ids: torch.Tensor
    layer: int
    token: Any

    @property
    def block(self) -> torch.nn.Module:
        return self.blocks[self.layer]

    def full(self) -> Any:
        from alignscope.models.capture import capture_block_calls

        return capture_block_calls(self.model, self.adapter, self.blocks, self.ids)[self.layer]


def block_token(model, seq: int, layer: int = 1, seed: int = 0) -> BlockToken:
    """The :class:`BlockToken` of a ``seq``-token random prompt; call inside ``alignscope.models.capture.probe_mode``."""
    from alignscope.models import get_adapter
    from alignscope.models.capture import capture_token_calls

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    token = capture_token_calls(model, adapter, blocks, ids, seq - 1)[layer]
    return BlockToken(model, adapter, blocks, ids, layer, token)


def append_markdown(path: str, title: str, *paragraphs: str | list[str]) -> None:
    """Append ``### {title} ({today})`` and the paragraphs (a string, or a list of lines such as a table),
    blank-line separated, to the Markdown file at ``path`` (docs/benchmarks.md)."""
    text = ["", f"### {title} ({time.strftime('%Y-%m-%d')})"]
    for paragraph in paragraphs:
        text += ["", *([paragraph] if isinstance(paragraph, str) else paragraph)]
    with open(path, "a") as fh:
        fh.write("\n".join(text) + "\n")


def released_pipeline(
    model, ids: torch.Tensor, ks: list[int], blocks: int | None = None, rows_per_call: int | None = None
) -> dict[int, torch.Tensor]:
    """``{K: m_K [L, L]}`` by the paper's released method: one forward with ``output_hidden_states``, block
    ``j`` taken as ``hidden_states[j] -> hidden_states[j+1]`` at the last token, each block's Jacobian by
    batched VJPs through the full-sequence graph (identity rows, ``is_grads_batched``; ``rows_per_call`` rows
    at a time, all by default), minus I; full SVDs; ``m_K`` for every ordered block pair in a Python loop.
    ``blocks``: only the first that many blocks (all by default). Call inside ``probe_mode(model)``."""
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # weights frozen
        hs = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        d = hs[0].shape[-1]
        eye = torch.eye(d, dtype=hs[0].dtype, device=hs[0].device)
        rows = rows_per_call or d
        jac = []
        for j in range(len(hs) - 1 if blocks is None else blocks):
            parts = []
            for start in range(0, d, rows):
                (part,) = torch.autograd.grad(
                    hs[j + 1][0, -1],
                    hs[j],
                    grad_outputs=eye[start : start + rows],
                    retain_graph=True,
                    is_grads_batched=True,
                )
                parts.append(part[:, 0, -1].detach())
            jac.append(torch.cat(parts).float() - eye.float())
    svds = [torch.linalg.svd(j) for j in jac]
    out = {}
    for k in ks:
        m = torch.zeros(len(jac), len(jac))
        for i in range(len(jac)):
            s_i = svds[i].S[:k]
            for j in range(len(jac)):
                u, v = svds[j].U[:, :k], svds[j].Vh[:k].T
                m[i, j] = torch.linalg.norm((u.T @ jac[i] @ v).abs() - torch.diag(s_i)) / s_i.norm()
        out[k] = m
    return out
