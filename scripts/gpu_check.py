"""GPU check: a Llama-3-8B-shaped model at random init, probed on one 64-token prompt.

Builds the model from its config directly on the GPU (bf16 weights; the Jacobians are computed in float32,
one block at a time), then probes all 32 blocks with each engine and prints the time per block and per
prompt next to the arithmetic floor at the measured float32 matmul rate. Designed to finish in under 8
minutes on one H100; the target is under 10 s per prompt with the single-token exact engine.

The randomized engine runs with K = 10 only (the coupling projections cost 2 x blocks x K products per
block-token, so K = 50 would cost more than the exact engines at d = 4096 and 32 blocks).

Last, the paper's released pipeline against ``probe()`` on the first ``--released-blocks`` blocks at T = 64 and
512 (``--released-seqs``).

Usage (on the GPU machine): python scripts/gpu_check.py [--engines single_token randomized exact] [--blocks 32]
``--smoke`` runs the same code on a tiny Llama on the CPU (for the tests).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from benchlib import LLAMA3_8B, block_token, matmul_rate, matrix_params, released_pipeline


def _timed(label: str, fn, sync) -> None:
    try:
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        print(f"{label}: {time.perf_counter() - start:.3f} s", flush=True)
    except RuntimeError as err:
        print(f"{label}: failed ({str(err)[:80]})", flush=True)


def svd_timings(d: int, device: torch.device, sync) -> None:
    """The analysis needs every singular value and the top-K singular vectors of one d x d matrix per
    block-token; time the options once on a residual-like matrix (I + noise): torch's default SVD, the
    approximate gesvda driver, eigh of J^T J in float64, and what the probe runs (``factorization.top_svd``)."""
    from alignscope.core.factorization import top_svd

    torch.manual_seed(0)
    a = torch.eye(d, device=device) + 0.3 * torch.randn(d, d, device=device) / d**0.5
    _timed(f"svd {d}x{d} float32 (torch default)", lambda: torch.linalg.svd(a), sync)
    if device.type == "cuda":
        _timed(f"svd {d}x{d} float32, driver gesvda", lambda: torch.linalg.svd(a, driver="gesvda"), sync)
    _timed(f"eigh of J^T J {d}x{d} float64", lambda: torch.linalg.eigh(a.double().T @ a.double()), sync)
    _timed(f"factorization.top_svd {d}x{d}, K 50 (what the probe runs)", lambda: top_svd(a, 50), sync)


def chunk_sweep(model, seqs: list[int], device: torch.device, sync) -> None:
    """Time one block-token Jacobian (block 1, last token) per way of batching it, to choose the GPU
    defaults: batched VJPs through the single-token call (rows per call), copies of the token (copies per
    pass) and the full-sequence reference engine (rows per call)."""
    from alignscope.autodiff.jacobian import ReverseModeEngine, jacobian_by_copies
    from alignscope.models.capture import (
        block_function,
        probe_mode,
        token_block_function,
        token_copies_function,
    )

    with probe_mode(model):
        for seq in seqs:
            case = block_token(model, seq, seed=1)
            adapter, block, token = case.adapter, case.block, case.token
            x = token.input[0].float()
            zero = torch.zeros(1, dtype=torch.long, device=device)
            fn = token_block_function(block, token, adapter, torch.float32)
            for rows in (64, 256, 1024, 4096):
                engine = ReverseModeEngine(chunk_size=rows)
                _timed(
                    f"T={seq} batched VJPs, {rows} rows per call", partial(engine, fn, x, zero, zero), sync
                )
            copies_fn = token_copies_function(block, token, adapter, torch.float32)
            for n in (256, 1024, 4096) if copies_fn is not None else ():
                _timed(f"T={seq} copies, {n} per pass", partial(jacobian_by_copies, copies_fn, x[0], n), sync)
            if seq == seqs[0]:  # the reference engine once, at the shortest length
                full = case.full()
                fn_full = block_function(block, full, adapter, torch.float32)
                t = torch.tensor([seq - 1], device=device)
                for rows in (32, 128, 512):
                    engine = ReverseModeEngine(chunk_size=rows)
                    _timed(
                        f"T={seq} full-sequence exact, {rows} rows per call",
                        partial(engine, fn_full, full.input[0].float(), t, t),
                        sync,
                    )
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["single_token", "randomized", "exact"])
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama on the CPU instead")
    parser.add_argument("--blocks", type=int, default=32, help="probe the first N blocks (all 32 by default)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sweep", action="store_true", help="time each way of batching one Jacobian first")
    parser.add_argument(
        "--agreement-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights of the model on which the engines are compared (bf16 caches differ by bf16 rounding)",
    )
    parser.add_argument("--exact-blocks", type=int, default=4, help="blocks for the (slow) exact engine")
    parser.add_argument(
        "--released-seqs", type=int, nargs="*", default=None, help="T for the released pipeline (64 512)"
    )
    parser.add_argument("--released-blocks", type=int, default=4, help="blocks for the released pipeline")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: this check is for the GPU machine (--smoke runs a tiny CPU version)"
        )
    import transformers

    from alignscope import probe

    device = torch.device("cpu" if args.smoke else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rate = matmul_rate(512 if args.smoke else 8192, repeats=10, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}: float32 matmul {rate / 1e12:.2f} TFLOP/s (TF32 off)", flush=True)

    shape = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
        if args.smoke
        else dict(LLAMA3_8B, vocab_size=128256)
    )
    config = transformers.LlamaConfig(
        **shape, num_hidden_layers=3 if args.smoke else 32, max_position_embeddings=8192, rope_theta=500000.0
    )
    args.blocks = min(args.blocks, config.num_hidden_layers)
    start = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    sync()
    print(f"built Llama-3-8B-shaped model (bf16) in {time.perf_counter() - start:.1f} s", flush=True)
    block = model.model.layers[0]
    floor = 2 * matrix_params(block) * config.hidden_size / rate
    print(
        f"floor per block-token: {floor * 1e3:.1f} ms; for {args.blocks} blocks: {floor * args.blocks:.2f} s",
        flush=True,
    )
    svd_timings(config.hidden_size, device, sync)
    if args.sweep:
        chunk_sweep(model, [16, 128] if args.smoke else [64, 128, 256, 512], device, sync)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    for engine in args.engines:
        blocks = args.blocks if engine != "exact" else min(args.blocks, args.exact_blocks)
        ks = (10,) if engine == "randomized" else (10, 30, 50)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        res = probe(model, ids, layers=list(range(blocks)), ks=ks, engine=engine)
        sync()
        seconds = time.perf_counter() - start
        per_block = seconds / blocks
        analysis = res.meta.get("analysis_seconds")
        print(
            f"{engine:>12}: {blocks} blocks in {seconds:.1f} s (analysis {analysis:.1f} s) = {per_block:.2f} s/block "
            f"({per_block / floor:.1f}x floor); all {config.num_hidden_layers} blocks ~ "
            f"{per_block * config.num_hidden_layers:.1f} s per prompt; K {ks}; "
            f"coupling/k10 {res.scalars()['coupling/k10']:.4f}; peak GPU memory "
            f"{torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0:.1f} GiB",
            flush=True,
        )
    if args.agreement_dtype != "bfloat16":  # the same shape in another dtype, only the blocks compared
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        config.num_hidden_layers = min(args.blocks, args.exact_blocks)
        with torch.device(device):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM._from_config(
                config, dtype=getattr(torch, args.agreement_dtype)
            )
        model.eval()
    agreement(model, ids, min(args.blocks, args.exact_blocks))
    seqs = args.released_seqs if args.released_seqs is not None else ([8, 16] if args.smoke else [64, 512])
    against_released(model, seqs, min(args.released_blocks, len(model.model.layers)), sync)
    if torch.cuda.device_count() > 1:
        split_across_devices(model, ids)
    quantized_and_moe(device)


def against_released(model, seqs: list[int], blocks: int, sync) -> None:
    """The paper's released pipeline (:func:`benchlib.released_pipeline`, 512 identity rows per VJP call)
    and ``probe()`` (default engine) on the first ``blocks`` blocks, one random prompt of each length:
    seconds, the speed-up and the largest difference of their m_K (without the model's last block, which the
    released pipeline takes with the final norm)."""
    from alignscope import probe
    from alignscope.models.capture import probe_mode

    ks = (10, 30, 50)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    for seq in seqs:
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
        sync()
        start = time.perf_counter()
        with probe_mode(model):
            ref = released_pipeline(model, ids, list(ks), blocks=blocks, rows_per_call=512)
        sync()
        released = time.perf_counter() - start
        start = time.perf_counter()
        res = probe(model, ids, layers=list(range(blocks)), ks=ks)
        sync()
        ours = time.perf_counter() - start
        n = (
            blocks - 1 if blocks == len(model.model.layers) else blocks
        )  # the released last block has the norm
        diff = max(float((res.coupling[k][0, :n, :n].cpu() - ref[k][:n, :n]).abs().max()) for k in ks)
        print(
            f"released pipeline vs probe(), T = {seq}, {blocks} blocks: {released:.1f} s vs {ours:.1f} s = "
            f"{released / ours:.1f}x; max |d m_K| {diff:.1e}",
            flush=True,
        )


def quantized_and_moe(device: torch.device) -> None:
    """bitsandbytes 8-bit and 4-bit (NF4) weights, and a mixture-of-experts block (tiny Mixtral, the model's
    own experts kernel outside the probe), on ``device``: each engine's block Jacobians against the
    independent whole-model reference (largest error relative to max |J|). On the CPU, 4-bit is refused."""
    import tempfile

    import transformers

    from alignscope import probe
    from alignscope.models.reference import reference_jacobian
    from alignscope.models.tiny import tiny_model, tiny_model_of_type

    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)

    def check(label: str, model) -> None:
        d = model.config.hidden_size
        for engine in ("single_token", "exact"):
            try:
                res = probe(model, ids, tokens=[3, 7], keep_jacobians=True, engine=engine)
            except ValueError as err:
                print(f"{label}, {engine}: refused ({str(err)[:90]}...)", flush=True)
                return
            worst = 0.0
            for p, t in enumerate((3, 7)):
                for layer in range(len(res.layers)):
                    ref = reference_jacobian(model, ids, layer, t, t).cpu() - torch.eye(d)
                    worst = max(worst, float((res.jacobians[p, layer] - ref).abs().max() / ref.abs().max()))
            print(f"{label}, {engine}: max |dJ| / max |J| against the reference {worst:.1e}", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2).save_pretrained(
            folder
        )
        for label, q in (
            ("bitsandbytes 8-bit", dict(load_in_8bit=True)),
            (
                "bitsandbytes 4-bit nf4",
                dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
            ),
        ):
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, quantization_config=transformers.BitsAndBytesConfig(**q), device_map=str(device)
                ).eval()
            except Exception as err:  # bitsandbytes missing or without this device
                print(f"{label}: cannot load ({type(err).__name__}: {str(err)[:90]})", flush=True)
                continue
            check(label, model)
    moe = tiny_model_of_type("mixtral", "MixtralForCausalLM").to(device)
    check(f"mixtral MoE ({moe.config._experts_implementation} outside the probe)", moe)


def split_across_devices(model, ids) -> None:
    """With more than one GPU: the model's blocks dispatched round-robin over the GPUs (accelerate device
    map), each engine's probe against the probe on one GPU (largest metric difference)."""
    from accelerate import dispatch_model

    from alignscope import probe

    engines = ("single_token", "exact", "randomized")
    before = {e: probe(model, ids, ks=(10,), engine=e).scalars() for e in engines}
    n, layers = torch.cuda.device_count(), len(model.model.layers)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": n - 1, "lm_head": n - 1}
    device_map.update({f"model.layers.{i}": i * n // layers for i in range(layers)})
    model = dispatch_model(model, device_map=device_map)
    for engine in engines:
        after = probe(model, ids, ks=(10,), engine=engine).scalars()
        diff = max(abs(after[k] - v) for k, v in before[engine].items() if v == v)
        print(f"split over {n} GPUs, {engine}: max |d metric| against one GPU {diff:.2e}", flush=True)


def agreement(model, ids, blocks: int) -> None:
    """On the device: the single-token engine (copies, GPU chunks, Gram analysis) against the full-sequence
    exact engine with the SVD analysis, on the first ``blocks`` blocks: Jacobians, singular values, m_K, a_K
    (absolute differences, and the largest |J| and s_1 for scale)."""
    from alignscope import probe
    from alignscope.probing.plan import Plan

    layers = list(range(blocks))
    single = probe(model, ids, layers=layers, keep_jacobians=True, engine="single_token")
    exact = probe(
        model, ids, layers=layers, keep_jacobians=True, engine="exact", plan=Plan(analysis_svd="svd")
    )
    scale = float(exact.jacobians.abs().max())
    coupling = max(float((single.coupling[k] - exact.coupling[k]).abs().max()) for k in single.coupling)
    alignment = max(float((single.alignment[k] - exact.alignment[k]).abs().max()) for k in single.alignment)
    print(
        f"agreement on {blocks} blocks (single_token + gram vs exact + svd): max |dJ| "
        f"{float((single.jacobians - exact.jacobians).abs().max()):.2e} (max |J| {scale:.2e}); max |dS| "
        f"{float((single.singular_values - exact.singular_values).abs().max()):.2e} (max s_1 "
        f"{float(exact.singular_values.max()):.2e}); max |d m_K| {coupling:.2e}; "
        f"max |d a_K| {alignment:.2e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
