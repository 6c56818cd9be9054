#!/usr/bin/env python
"""GPU memory of one GPT-2 worker, component by component, measured on the CPU: the old path vs the new ones.

    python scripts/bench_memory.py                      # builtin:gpt2-124m, the shipped GPU config's workload
    python scripts/bench_memory.py --prompt 200         # a typical prompt instead of the worst case

A GPU's allocator peak can only be read on a GPU (scripts/bench_gpu.py does, through NVML). What decides it
can be counted here exactly: parameter, gradient and optimizer bytes from the model; activation bytes by
recording every tensor autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``) during
the real loss forward of one worst-case micro-batch; the KV cache and logits from their shapes. The
prediction adds the CUDA context measured on an H200 (0.6-0.85 GB; 0.75 used) and assumes no allocator
fragmentation, so a GPU reads somewhat higher.

Workload (configs/gpt2-5node-a100-*.yaml): I=2, J=2, G=4 -> 16 training rows, 8 generated; completions of
--new-tokens (256); prompts of --prompt tokens (default 768 = max_prompt_tokens, the warm-up's case).

Configurations:
  old          fp32 weights + bf16 autocast, gelu_new, every row in one pass, logits from the shortest prompt
               on with two float32 copies, a new static cache per generate (what main 779a656 shipped)
  fp32+ac      fp32 weights and Adam + bf16 autocast; the new path: fused GELU, logits for completion tokens
               only in checkpointed chunks, <= 2048 padded tokens per micro-batch, activation checkpointing
  bf16+sr      the new path on bfloat16 weights and gradients, float32 Adam moments, stochastic rounding
               (what the GPU configs ship)
GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from node.models import use_fused_gelu  # noqa: E402
from sapo.batch import LOGITS_CHUNK_ELEMENTS, build_batch, completion_log_probs, plan_micro_batches  # noqa: E402
from sapo.config import AUTO_CUDA_MICRO_BATCH_TOKENS  # noqa: E402
from sapo.optim import enable_activation_checkpointing  # noqa: E402
from sapo.rollouts import Completion, Group  # noqa: E402
from sapo.tiny_model import build_builtin  # noqa: E402

GB = 1e9
CUDA_CONTEXT = 0.75 * GB  # measured 0.6-0.85 GB per process on an H200 (driver 580, torch 2.11)


def saved_activation_bytes(model, rows: int, prompt: int, new_tokens: int, *, autocast: bool, split_head: bool,
                           checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over one loss forward of ``rows`` rows (parameters and their
    autocast copies excluded: those are counted as weights)."""
    tokens = list(range(1000, 1000 + prompt))
    groups = [Group(None, "", tokens, [Completion(list(range(2000, 2000 + new_tokens)), "", False)] * rows,
                    [0.0] * rows)]
    batch = build_batch(groups, [[1.0] * rows], 0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and not (autocast and tuple(t.shape) in shapes):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train(checkpointing)  # transformers checkpoints in train mode only (dropout is 0 either way)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            completion_log_probs(model, batch, 1.0, split_head=split_head)
    model.eval()
    return sum(saved.values())


def account(name: str, args) -> dict[str, float]:
    """Bytes per component, and the predicted peak, for one configuration."""
    old, bf16 = name == "old", name == "bf16+sr"
    model, _ = build_builtin("builtin:gpt2-124m", 0)
    if not old:
        use_fused_gelu(model)
    if bf16:
        model = model.to(torch.bfloat16)
    checkpointing = (not old) and enable_activation_checkpointing(model)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    wbytes = 2 if bf16 else 4
    rows_train, rows_gen = (args.I + args.J) * args.G, args.I * args.G
    width = args.prompt + args.new_tokens
    out = {"weights": n_params * wbytes, "gradients": n_params * wbytes, "adam moments": n_params * 8}
    # autocast keeps a bfloat16 copy of every weight it casts while its context is open (generate, loss forward)
    out["autocast weight copies"] = 0 if bf16 else n_params * 2
    # The new path's static cache is sized for the longest prompt, whatever this round's; the old dynamic one grew.
    kv_len = (args.prompt if old else max(args.prompt, args.max_prompt_tokens)) + args.new_tokens
    out["KV cache (generate)"] = rows_gen * kv_len * cfg.n_layer * 2 * cfg.n_embd * 2  # K and V, bfloat16
    if old:
        plan = [(0, rows_train)]
    else:
        plan = plan_micro_batches([width] * rows_train, max_tokens=AUTO_CUDA_MICRO_BATCH_TOKENS)
    micro_rows = max(b - a for a, b in plan)
    # Measure one row and scale: a row's saved activations do not depend on the other rows.
    one = saved_activation_bytes(model, 1, min(args.prompt, args.measure_prompt), args.new_tokens, autocast=not bf16,
                                 split_head=not old, checkpointing=checkpointing)
    per_token = one / (min(args.prompt, args.measure_prompt) + args.new_tokens)
    out["activations (largest micro-batch)"] = per_token * width * micro_rows
    if checkpointing:  # backward recomputes one layer at a time: add one layer's full activations
        full = saved_activation_bytes(model, 1, min(args.prompt, args.measure_prompt), args.new_tokens,
                                      autocast=not bf16, split_head=True, checkpointing=False)
        out["activations (largest micro-batch)"] += full / cfg.n_layer * width * micro_rows / (
            min(args.prompt, args.measure_prompt) + args.new_tokens)
    vocab = cfg.vocab_size
    if old:  # logits_to_keep from the shortest prompt: (rows, new + 1, V) bf16, a float32 copy, a scaled copy
        out["logits (transient)"] = rows_train * (args.new_tokens + 1) * vocab * (2 + 4 + 4)
    else:  # one chunk at a time: head output, float32 copy, scaled copy, logsumexp's exp
        out["logits (transient)"] = LOGITS_CHUNK_ELEMENTS * (2 + 4 + 4 + 4)
    out["CUDA context"] = CUDA_CONTEXT
    static = out["weights"] + out["adam moments"] + out["CUDA context"]
    generate = out["KV cache (generate)"] + out["autocast weight copies"]
    kv_kept = 0 if old else out["KV cache (generate)"]  # the new path keeps its one static cache for reuse
    train = (kv_kept + out["gradients"] + out["autocast weight copies"] + out["activations (largest micro-batch)"]
             + out["logits (transient)"])
    out["predicted peak"] = static + max(generate, train)
    out["micro-batch"] = f"{micro_rows} x {width} tokens"
    out["checkpointing"] = "on" if checkpointing else "off"
    return out


def main(argv=None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=768, help="prompt tokens (default 768: the worst case)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-tokens", type=int, default=768, help="sapo.max_prompt_tokens: sizes the static KV cache")
    p.add_argument("-I", type=int, default=2)
    p.add_argument("-J", type=int, default=2)
    p.add_argument("-G", type=int, default=4)
    p.add_argument("--measure-prompt", type=int, default=256,
                   help="prompt tokens of the measured row (activations scale per token; default 256)")
    p.add_argument("--configs", default="old,fp32+ac,bf16+sr")
    args = p.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    bad = [n for n in names if n not in ("old", "fp32+ac", "bf16+sr")]
    if bad:
        p.error(f"unknown configs {bad}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"builtin:gpt2-124m, I={args.I} J={args.J} G={args.G}, prompt {args.prompt} + {args.new_tokens} new "
          f"tokens; GB per worker process (10^9 bytes)")
    results = {n: account(n, args) for n in names}
    keys = list(next(iter(results.values())))
    print(f"{'':<36}" + "".join(f"{n:>18}" for n in names))
    for key in keys:
        cells = [results[n][key] for n in names]
        fmt = (lambda v: f"{v / GB:>18.2f}") if isinstance(cells[0], (int, float)) else (lambda v: f"{v:>18}")
        print(f"{key:<36}" + "".join(fmt(v) for v in cells))
    for n in names:
        gb = results[n]["predicted peak"] / GB
        print(f"  {n}: predicted peak {gb:.2f} GB {'<=' if gb <= 3 else '>'} 3 GB target "
              f"({'within' if gb <= 3 else 'over'}; a GPU adds allocator fragmentation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
