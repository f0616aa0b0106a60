"""
rise.py -- RISE, Recursive Introspection (Qu et al. 2024): collect multi-turn rollouts, weight every
turn by its advantage, fine-tune, evaluate; and the command that runs it all.

    python rise.py                                   # CPU toy (toy.py): a tiny model, RISE in minutes
    python rise.py --model mistral-7b --turns 5      # the paper's setting, on a GPU, GSM8K
    python rise.py --help

Read top to bottom, the method (paper sections in brackets):
  rollout            one question becomes a T-turn episode [§2]: at turn t the model reads the question
                     and its earlier attempts, each followed by feedback, and writes a new attempt. N_t
                     candidates are sampled at turn t (--first-samples at turn 1, --samples after); the
                     episode continues from the best one (RISE-Self, best-of-N self-improvement [§4];
                     --keep first: from an ordinary sample) or from a teacher's (RISE-Distill [§4]); with
                     an oracle it stops at the first correct answer. KV caches are reused across turns.
  advantages         (reward - mean) / std over the N_t candidates of a turn [§3]
  awr_weights        exp(advantage / beta), clipped (advantage-weighted regression [§3]); weigh() stores
                     each candidate's advantage and weight with the trajectories
  data.training_examples  every (state, candidate) pair with a weight: the state is context, only
                     the candidate is trained
  awr_loss / train   the weighted negative log-likelihood of each response, normalised by its tokens;
                     AdamW with warmup, gradient clipping and accumulation (DDP/FSDP under torchrun)
  evaluate           p1@t (oracle), m1@t (majority over turns, no oracle) against the parallel
                     baselines pass@t and maj@t at the same sample budget [§5], with 95% intervals
  run                collect -> train -> evaluate, --iterations times, each stage resumable
  parse_args / main  the command line, generated from Config's fields; checks.py checks it all first

Data flows one way: data.py builds states, model.py samples, verify.py scores, this file weights and
trains. Outputs (--out DIR): config.json, metrics.json, metrics.png, iterK/trajectories.jsonl (every
candidate with its reward, advantage and AWR weight), iterK/policy/ (a Hugging Face checkpoint),
eval/NAME_KIND.jsonl, state.json (the completed stages) and report.html (report.py).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import safetensors.torch
from tqdm.auto import tqdm

import data
import model as M
import verify

# --------------------------------------------------------------------------------------------
# Configuration: every field is a command-line flag (--max-new-tokens for max_new_tokens)
# --------------------------------------------------------------------------------------------


def opt(default, help: str, **rules):
    """A Config field with its --help text; parse_args turns every field into a flag. rules: choices; the
    range min/gt/max that check_settings enforces before any work; resume=True: --resume may change it."""
    return field(default=default, metadata=dict(help=help, **rules))


@dataclass
class Config:
    model: str = opt("toy", "checkpoint directory, a name in checks.MODEL_NAMES (found offline) or 'toy' (toy.py)")
    teacher: str | None = opt(None, "RISE-Distill: a stronger checkpoint that writes turns 2..T (none: RISE-Self)")
    train_data: str = opt("gsm8k:train", "gsm8k:train, toy:train, arith:train or a .jsonl of question/answer lines")
    eval_data: str = opt("gsm8k:test", "gsm8k:test, math:test, toy:test, arith:test, toy:dev or arith:dev (choose "
                         "settings on dev) or a .jsonl")
    train_problems: int | None = opt(None, "use only the first K training problems (none: all)", min=1)
    eval_problems: int | None = opt(None, "use only the first K evaluation problems (none: all)", min=1)
    turns: int = opt(5, "T: attempts per episode", min=1)
    samples: int = opt(4, "N: candidates sampled per turn when collecting (best-of-N)", min=1)
    first_samples: int | None = opt(None, "candidates at turn 1 when collecting (none: N; official: 1)", min=1)
    keep: str = opt("best", "the candidate an episode goes on from: the best (official) or the first, an ordinary "
                    "sample, so later turns come as often as in evaluation", choices=["best", "first"])
    iterations: int = opt(1, "collect -> train -> evaluate, this many times (the paper's Iteration 1, 2)", min=0,
                          resume=True)
    feedback: str = opt("oracle", "collection feedback (see data.state_messages); mixed: half the problems each",
                        choices=["oracle", "neutral", "mixed"])
    context: str = opt("all", "the state holds all earlier attempts (paper) or the last", choices=["all", "last"])
    temperature: float = opt(1.0, "sampling temperature of collection and evaluation (0: greedy)", min=0)
    top_p: float = opt(1.0, "nucleus sampling mass", gt=0, max=1)
    max_new_tokens: int = opt(512, "token budget of one attempt", min=1)
    weighting: str = opt("awr", "awr: exp(advantage/beta), all candidates; official: exp(reward/0.4), kept ones",
                         choices=["awr", "official"])
    beta: float = opt(1.0, "AWR temperature: lower = greedier (weight concentrates on the best candidates)", gt=0)
    max_weight: float = opt(20.0, "AWR clips weights here (Peng et al. 2019 use 20)", gt=0)
    normalize_advantages: bool = opt(True, "divide a turn's advantages by their standard deviation")
    keep_uniform_turns: bool = opt(False, "also train turns whose N candidates all scored the same (no signal)")
    lr: float = opt(1e-5, "AdamW peak learning rate (official: 1e-5); far below pre-training rates", gt=0, resume=True)
    epochs: int = opt(2, "passes over the collected examples per iteration", min=1, resume=True)
    batch_size: int = opt(16, "examples per optimizer step (official: 16)", min=1, resume=True)
    micro_batch: int = opt(4, "examples per forward pass (gradient accumulation up to batch_size)", min=1, resume=True)
    warmup: float = opt(0.04, "fraction of steps warming up linearly, then cosine decay", min=0, max=1, resume=True)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0, resume=True)
    grad_clip: float = opt(1.0, "clip the gradient norm of every step here", gt=0, resume=True)
    lora_rank: int = opt(0, "> 0: train rank-R LoRA adapters on every projection instead of all weights", min=0)
    lora_alpha: float = opt(32.0, "LoRA scale is alpha / rank", gt=0)
    grad_checkpoint: bool = opt(False, "recompute layer activations in backward (less memory)", resume=True)
    fsdp: bool = opt(False, "under torchrun: shard weights, gradients and optimizer state (FSDP) instead of DDP")
    amp: bool | None = opt(None, "bfloat16 autocast in training (none: on for CUDA and bf16-capable CPUs)", resume=True)
    rows_per_batch: int = opt(64, "sequences sampled together per generate call (memory vs speed)", min=1, resume=True)
    seed: int = opt(0, "seeds sampling, shuffling and the toy's data", min=0, max=2**32)
    toy_pretrain_steps: int | None = opt(None, "steps of each phase of the toy base's pre-training (toy.Recipe)", min=1)
    dtype: str | None = opt(None, "rollout weights (none: bfloat16 on GPUs and bf16-capable CPUs, else float32)",
                            choices=["float32", "bfloat16", "float16"])
    device: str | None = opt(None, "none: cuda if available, else cpu", resume=True)
    out: str = opt("runs/rise", "run directory (config, trajectories, metrics, checkpoints, report)", resume=True)


class TrainingError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Rollouts (paper §2, §4)
# --------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """Something that writes attempts: a model, its tokenizer and the prompts it is asked with."""
    model: M.Transformer
    tokenizer: data.Tokenizer
    prompts: data.Prompts


def score(problem: data.Problem, text: str) -> data.Candidate:
    return data.Candidate(text, verify.extract_answer(text), verify.reward(text, problem.answer))


def rollout(policy: Policy, problems: list[data.Problem], cfg: Config, widths: list[int], protocol: str,
            teacher: Policy | None = None, sampling_seed: int = 0, progress=None) -> list[data.Episode]:
    """Episodes for `problems`, sampled together in one KV cache: turn t samples widths[t] candidates per
    live episode (len(widths) turns), under the feedback `protocol` ("oracle" or "neutral").

    At each turn every live episode gets widths[t] candidates from its current state; it keeps the
    first best one (official code: first argmax of reward) or, with cfg.keep "first", the first one, and
    all its rows of the next turn continue from it (the cache rows are copied). Under the oracle an
    episode ends at its first correct answer. The cache of each row is reused from turn to turn: only
    the feedback is encoded, once per episode. With a teacher (RISE-Distill), the policy writes turn 1
    and the teacher every later turn.
    """
    episodes = [data.Episode(p, protocol) for p in problems]
    live = list(range(len(problems)))  # episodes still running; row r of turn t belongs to live[r // widths[t]]
    writer, cache, generator, sampled = None, None, None, []
    for t, width in enumerate(widths):
        if not live:
            break
        current = teacher if teacher is not None and t > 0 else policy
        tok = current.tokenizer
        if current is not writer or cfg.context != "all":
            # a new writer (or a state that is not an extension of the last): encode states afresh
            writer = current
            prompts = [data.render_state(tok, data.state_messages(episodes[i].problem, episodes[i].attempts,
                                                                  current.prompts, protocol, cfg.context))
                       for i in live]
            cache = M.KVCache.for_model(current.model, len(prompts), max(map(len, prompts)) + cfg.max_new_tokens)
            generator = torch.Generator(device=cache.device).manual_seed(sampling_seed + t)
        else:
            # continue each episode's cache: end of the kept attempt, the feedback, the next turn's prompt
            prompts = [data.continuation_tokens(tok, episodes[i].problem, episodes[i].attempts, ids, current.prompts,
                                                protocol, current.model.args.eos_ids) for i, ids in zip(live, sampled)]
        if width > 1:  # encode each episode's new tokens once, then copy its cache row to its `width` samples
            M.generate(current.model, [p[:-1] for p in prompts], max_new_tokens=0, cache=cache)
            cache.reorder([k for k in range(len(live)) for _ in range(width)])
            prompts = [p[-1:] for p in prompts]
        outs = M.generate(current.model, [p for p in prompts for _ in range(width)], max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p, stop_strings=data.stop_strings(tok),
                          tokenizer=tok, generator=generator, cache=cache)
        next_width = widths[t + 1] if t + 1 < len(widths) else 0
        keep_rows, sampled, still_live = [], [], []
        for k, i in enumerate(live):
            rows = outs[k * width:(k + 1) * width]
            candidates = [score(episodes[i].problem, data.attempt_text(tok, ids, current.model.args.eos_ids))
                          for ids in rows]
            first_best = max(range(width), key=lambda j: (candidates[j].reward, -j))  # official: first argmax
            kept = first_best if cfg.keep == "best" else 0
            episodes[i].turns.append(candidates)
            episodes[i].chosen.append(kept)
            if protocol == "oracle" and candidates[kept].reward == 1.0:
                continue  # the oracle stops a solved episode
            still_live.append(i)
            sampled.append(rows[kept])
            keep_rows.append(k * width + kept)
        live = still_live
        if live and next_width:
            cache.reorder(keep_rows)  # drop finished episodes; one row each, from the kept attempt
        if progress is not None:
            progress.update(len(outs))
    return episodes


def rollout_all(policy: Policy, problems: list[data.Problem], cfg: Config, widths: list[int], protocol: str,
                teacher: Policy | None = None, sampling_seed: int = 0, desc: str = "rollout") -> list[data.Episode]:
    """rollout() over all problems, in batches of about cfg.rows_per_batch rows, with a progress bar.
    Under torchrun each rank rolls out every world_size-th problem with its own seed; every rank gets
    all episodes back."""
    mine = problems[rank()::world_size()]
    sampling_seed += 1_000_003 * rank()
    per_batch = max(1, cfg.rows_per_batch // max(widths))
    episodes = []
    with tqdm(total=len(mine) * sum(widths), desc=desc, unit="attempt", dynamic_ncols=True,
              disable=not is_main()) as bar:
        for start in range(0, len(mine), per_batch):
            release_freed_memory()  # the last batch's KV cache
            episodes += rollout(policy, mine[start:start + per_batch], cfg, widths, protocol, teacher,
                                sampling_seed + start, progress=bar)
        bar.total = bar.n
        bar.refresh()
    return gather_episodes(episodes)


# --------------------------------------------------------------------------------------------
# Advantage-weighted regression (paper §3)
# --------------------------------------------------------------------------------------------


def advantages(rewards: list[float], normalize: bool = False) -> list[float]:
    """A candidate's reward minus the mean reward of the N candidates sampled at its turn: better than
    the average sample means positive. normalize divides by their standard deviation (as AWR's code does),
    so every turn's advantages have the same scale whatever its success rate."""
    mean = sum(rewards) / len(rewards)
    adv = [r - mean for r in rewards]
    if normalize:
        std = math.sqrt(sum(a * a for a in adv) / len(adv))
        adv = [a / (std + 1e-5) for a in adv]
    return adv


def awr_weights(adv: list[float], beta: float, max_weight: float) -> list[float]:
    """exp(A / beta), clipped at max_weight: an exponential up-weighting of better-than-average turns."""
    return [min(math.exp(min(a / beta, 50.0)), max_weight) for a in adv]


def weigh(episodes: list[data.Episode], cfg: Config) -> None:
    """Set each collected candidate's advantage and AWR weight; they are saved with the trajectories,
    so what training uses can be read back (report.py shows it).

    awr: all N candidates of a turn, weighted by exp(advantage / beta); a turn whose candidates all
    scored the same says nothing about what is better and is not trained (unless keep_uniform_turns).
    official: only the candidate each episode kept, weighted exp(reward / 0.4).
    """
    for ep in episodes:
        for candidates, chosen in zip(ep.turns, ep.chosen):
            rewards = [c.reward for c in candidates]
            if cfg.weighting == "official":
                candidates[chosen].weight = math.exp(candidates[chosen].reward / 0.4)  # no baseline, no clip
            elif cfg.keep_uniform_turns or len(set(rewards)) > 1:
                adv = advantages(rewards, cfg.normalize_advantages)
                for c, a, w in zip(candidates, adv, awr_weights(adv, cfg.beta, cfg.max_weight)):
                    c.advantage, c.weight = a, w


def pack(examples: list[data.Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """A micro-batch as rows that hold a state once: the candidates sampled from one state (a turn's N)
    share a row, the state's tokens, then each candidate's, which see only the state and themselves and
    continue its positions. The logits are those of one row per example, but the state runs once, not N
    times. Returns (B, T) ids, positions, segments (0 the state, k the k-th candidate, -1 padding),
    the next token of each position, and `owner`: the example a position's next token trains, else -1."""
    rows = {}
    for i, e in enumerate(examples):
        # the state's last token predicts the attempt's first, so each segment repeats that token
        state = max(e.mask.index(1) - 1, 0)
        rows.setdefault(tuple(e.ids[:state]), []).append(i)
    table = []
    for state, members in rows.items():
        row = [(token, p, 0, 0, -1) for p, token in enumerate(state)]  # (id, position, segment, next id, owner)
        for segment, i in enumerate(members, 1):
            e = examples[i]
            for p in range(len(state), len(e.ids)):
                trained = p + 1 < len(e.ids) and e.mask[p + 1]
                row.append((e.ids[p], p, segment, e.ids[p + 1] if trained else 0, i if trained else -1))
        table.append(row)
    T = max(map(len, table))
    padded = torch.tensor([row + [(pad_id, 0, -1, 0, -1)] * (T - len(row)) for row in table])  # (B, T, 5)
    return tuple(column.to(device) for column in padded.unbind(-1))


def token_logprobs(model, ids, positions, segments, targets, owner) -> torch.Tensor:
    """log p(target) at each trained position (owner >= 0) of packed rows (pack), flattened row by row,
    at temperature 1 (we train the policy itself, not the tempered sampler), computed in float32. The
    output matrix runs at the trained positions only: most of a state is context."""
    trained = owner >= 0
    logits = model(ids, outputs=trained, packed=(positions, segments)).float()  # (N, vocab)
    return -F.cross_entropy(logits, targets[trained], reduction="none")


def awr_loss(model, batch: tuple[torch.Tensor, ...], weights: torch.Tensor) -> torch.Tensor:
    """Sum over the examples of weight * (mean negative log-likelihood of the response's tokens), from
    packed rows (pack). The caller divides by the number of examples per optimizer step."""
    owner = batch[-1][batch[-1] >= 0]
    per_example = torch.zeros_like(weights).index_add_(0, owner, -token_logprobs(model, *batch))
    return (weights * per_example / torch.bincount(owner, minlength=len(weights)).clamp(min=1)).sum()


def lr_at(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to 10%."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def fast_bf16(cfg: Config) -> bool:
    """bfloat16 pays off on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16): docs/performance.md.
    Where it does, rollouts run in bfloat16 and training under bfloat16 autocast (unless --dtype/--amp)."""
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return M.default_placement(cfg.device)[0].type == "cuda" or "amx_bf16" in cpu or "avx512_bf16" in cpu


def wrap_for_training(model: M.Transformer, cfg: Config):
    """The module the training loop calls: the model itself, or DDP/FSDP around it under torchrun.
    PyTorch's own engines do all communication (gradient all-reduce, sharding)."""
    if not distributed():
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    device = model.model.embed_tokens.weight.device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def train(model: M.Transformer, examples: list[data.Example], cfg: Config, pad_id: int,
          shuffle_seed: int = 0, desc: str = "train") -> dict:
    """Weighted fine-tuning (AWR) of `model` in place: `epochs` passes over the examples, AdamW,
    batch_size examples per optimizer step in micro-batches of micro_batch (gradient accumulation).

    Under torchrun every rank holds all examples and takes its own contiguous part of each step's batch;
    gradients are averaged by DDP (or FSDP), so a step equals one process on the whole batch.
    """
    if not examples:
        return {"steps": 0, "loss": None, "examples": 0}
    device = model.model.embed_tokens.weight.device
    model.gradient_checkpointing = cfg.grad_checkpoint
    module = wrap_for_training(model, cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    # fused on GPUs: one kernel, without the weight-sized temporary the foreach update allocates (27 GiB at 7B)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    rng = random.Random(shuffle_seed)
    groups = {}  # the candidates of one state stay together, so that they share a packed row (pack)
    for e in examples:
        groups.setdefault(tuple(e.ids[:e.mask.index(1)]), []).append(e)
    groups = list(groups.values())
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, cfg.warmup))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16(cfg) if cfg.amp is None else cfg.amp)
    R, W = rank(), world_size()
    module.train()
    losses = []
    with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not is_main()) as bar:
        for _ in range(cfg.epochs):
            rng.shuffle(groups)
            order = [e for group in groups for e in group]
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                per_rank = math.ceil(len(batch) / W)
                mine = batch[R * per_rank:(R + 1) * per_rank]
                # every rank runs as many backward passes (each one syncs gradients under DDP/FSDP):
                # a rank short of examples runs zero-weight copies of one
                n_micro = math.ceil(per_rank / cfg.micro_batch)
                mine += [dataclasses.replace(batch[0], weight=0.0)] * (n_micro * cfg.micro_batch - len(mine))
                optimizer.zero_grad(set_to_none=True)
                release_freed_memory()  # the last step's activations: glibc's fragments of them add up over the steps
                step_loss = torch.zeros((), device=device)
                for m in range(0, len(mine), cfg.micro_batch):
                    micro = mine[m:m + cfg.micro_batch]
                    weights = torch.tensor([e.weight for e in micro], device=device)
                    with amp:  # DDP averages over ranks: scale by W so the step's loss is the batch mean
                        loss = awr_loss(module, pack(micro, pad_id, device), weights) * W / len(batch)
                    loss.backward()
                    step_loss += loss.detach()
                if distributed():
                    torch.distributed.all_reduce(step_loss)
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not (torch.isfinite(norm) and torch.isfinite(step_loss)):  # stop before a NaN reaches the weights
                    raise TrainingError(f"training diverged at step {len(losses) + 1} (loss "
                                        f"{step_loss.item() / W:.4g}, gradient norm {norm.item():.4g}); lower --lr "
                                        f"(it is {cfg.lr:g}), then --resume")
                optimizer.step()
                schedule.step()
                losses.append(step_loss.item() / W)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if not all(bool(p.isfinite().all()) for p in params):  # a huge step can overflow without a NaN gradient
        raise TrainingError(f"training made weights infinite; lower --lr (it is {cfg.lr:g}), then --resume")
    model.eval()
    n = min(len(losses), steps_per_epoch)
    return {"steps": total, "loss": sum(losses[-n:]) / n, "examples": len(examples)}


# --------------------------------------------------------------------------------------------
# Evaluation (paper §5)
# --------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sensible near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def majority_correct(candidates: list[data.Candidate]) -> bool:
    """Is the most common answer right? Ties go to the most recent of the tied answers; attempts with
    no answer do not vote."""
    votes = [(verify.canonical_answer(c.answer), c.reward == 1.0) for c in candidates if c.answer is not None]
    votes = [v for v in votes if v[0] is not None]
    counts = Counter(answer for answer, _ in votes)
    top = max(counts.values(), default=0)
    return next((correct for answer, correct in reversed(votes) if counts[answer] == top), False)


def p1_at(episodes: list[data.Episode], t: int) -> list[bool]:
    """With an oracle: solved at some turn <= t (the episode stopped there)."""
    return [any(ep.correct[:t]) for ep in episodes]


def m1_at(episodes: list[data.Episode], t: int) -> list[bool]:
    """Without an oracle: the majority answer of the first t sequential turns is right."""
    return [majority_correct([turn[c] for turn, c in zip(ep.turns[:t], ep.chosen[:t])]) for ep in episodes]


def pass_at(parallel: list[data.Episode], t: int) -> list[bool]:
    """Parallel baseline: one of t independent first-turn samples is right (same budget as p1@t)."""
    return [any(c.reward == 1.0 for c in ep.turns[0][:t]) for ep in parallel]


def maj_at(parallel: list[data.Episode], t: int) -> list[bool]:
    """Parallel baseline: the majority of t independent first-turn samples is right (m5@t1 at t=5)."""
    return [majority_correct(ep.turns[0][:t]) for ep in parallel]


def summarize(hits: list[bool]) -> dict:
    lo, hi = wilson_interval(sum(hits), len(hits))
    return {"acc": sum(hits) / max(1, len(hits)), "lo": lo, "hi": hi, "n": len(hits)}


def evaluate(policy: Policy, problems: list[data.Problem], cfg: Config, sampling_seed: int,
             name: str) -> tuple[dict, dict]:
    """All four metrics for t = 1..T on held-out problems, from three sets of rollouts: T turns with the
    oracle (p1), T turns with neutral feedback (m1), T independent first-turn samples (pass, maj)."""
    T = cfg.turns
    plan = {"oracle": ([1] * T, "oracle"), "neutral": ([1] * T, "neutral"), "parallel": ([T], "neutral")}
    runs = {}
    for i, (kind, (widths, protocol)) in enumerate(plan.items()):
        runs[kind] = rollout_all(policy, problems, cfg, widths, protocol, sampling_seed=sampling_seed + i,
                                 desc=f"eval {name}: {kind}")
    metrics = {
        "p1": [summarize(p1_at(runs["oracle"], t)) for t in range(1, T + 1)],
        "m1": [summarize(m1_at(runs["neutral"], t)) for t in range(1, T + 1)],
        "pass": [summarize(pass_at(runs["parallel"], t)) for t in range(1, T + 1)],
        "maj": [summarize(maj_at(runs["parallel"], t)) for t in range(1, T + 1)],
        # accuracy of the t-th attempt alone, without an oracle: does a later turn do better?
        "turn": [summarize([ep.correct[t - 1] for ep in runs["neutral"]]) for t in range(1, T + 1)],
    }
    return metrics, runs


# --------------------------------------------------------------------------------------------
# Run directory: atomic writes, resumable stages
# --------------------------------------------------------------------------------------------


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so that a reader (or a resumed run) sees the old or the new content, never half; if
    writing fails (a full disk), no temporary file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finish_stage(out: Path, done: list[str], stage: str, files: dict[Path, str]) -> None:
    """Write a completed stage's files, then record the stage in state.json, so --resume skips it."""
    done.append(stage)
    if is_main():
        for path, text in files.items():
            write_atomic(path, text)
        write_atomic(out / "state.json", json.dumps({"done": done}, indent=1))


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): rank 0 alone prints and writes
# --------------------------------------------------------------------------------------------


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()


def init_distributed() -> str | None:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    if "RANK" not in os.environ or distributed():
        return None
    if not torch.cuda.is_available():
        torch.distributed.init_process_group("gloo")
        return "cpu"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # NCCL works on the current device
    torch.distributed.init_process_group("nccl")
    return f"cuda:{torch.cuda.current_device()}"


def gather_episodes(episodes: list[data.Episode]) -> list[data.Episode]:
    """Every rank's episodes (of its share of the problems), back in problem order, on every rank."""
    if not distributed():
        return episodes
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, episodes)
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def load_policy(path: Path, cfg: Config, prompts: data.Prompts, training: bool = False) -> Policy:
    """A checkpoint as a Policy. For training: LoRA adapters added (only they train) if lora_rank > 0,
    else float32 master weights (bfloat16 autocast does the arithmetic) unless --dtype says otherwise."""
    dtype = cfg.dtype or ("float32" if training and not cfg.lora_rank or not fast_bf16(cfg) else "bfloat16")
    release_freed_memory()  # every stage starts here, after the last stage's tensors are gone
    model = M.load(path, dtype=getattr(torch, dtype), device=cfg.device)
    if training and cfg.lora_rank:
        M.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return Policy(model, data.Tokenizer(path), prompts)  # (with --fsdp, wrap_for_training shards it)


def release_freed_memory() -> None:
    """Hand the memory of freed tensors back to the OS. glibc keeps it for reuse, fragmented, so without
    this each stage's peak stacked on what earlier stages left (docs/performance.md, memory that glibc keeps)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def save_policy(model: M.Transformer, path: Path, base_path: Path, cfg: Config) -> None:
    """The trained policy as a plain Hugging Face checkpoint (LoRA merged into the weights), in the dtype
    inference uses; rank 0 writes it. LoRA adapters alone are kept beside it (adapter.safetensors)."""
    adapters = {name: p.detach().cpu().contiguous() for name, p in M.lora_state_dict(model).items()}
    M.merge_lora(model)  # (nothing to merge without LoRA)
    state = None
    if cfg.fsdp and distributed():  # every rank holds a shard: gather the whole state on rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        M.save(model, path, tokenizer_dir=base_path, state_dict=state,
               dtype=getattr(torch, cfg.dtype or ("bfloat16" if fast_bf16(cfg) else "float32")))
        if adapters:
            write_atomic(path.parent / "adapter.safetensors", safetensors.torch.save(adapters))
    barrier()


def prompts_for(cfg: Config) -> data.Prompts:
    """The toy base was trained with its own prompts; every other model gets the official code's GSM8K prompts."""
    return data.TOY_PROMPTS if cfg.train_data.startswith("toy:") else data.GSM8K_PROMPTS


def stages_done(out: Path) -> list[str]:
    """The stages of the run in `out` that finished (state.json, written last by finish_stage)."""
    return json.loads((out / "state.json").read_text())["done"] if (out / "state.json").is_file() else []


def run(cfg: Config, base_path: Path, train_problems: list[data.Problem], eval_problems: list[data.Problem],
        teacher_path: Path | None = None) -> dict:
    """The whole method: evaluate the base, then `iterations` times collect -> train -> evaluate.
    (The command line checks everything first: checks.prepare.) Each stage loads what it needs from
    disk and marks itself done in state.json when its files are written, so an interrupted run resumes
    at the first unfinished stage with the same result."""
    out = Path(cfg.out)
    done = stages_done(out)
    prompts = prompts_for(cfg)
    if is_main():
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    teacher = load_policy(teacher_path, cfg, prompts) if teacher_path else None
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    def evaluate_stage(name: str, path: Path):
        if f"eval:{name}" in done:
            return
        result, runs = evaluate(load_policy(path, cfg, prompts), eval_problems, cfg, cfg.seed + 1000, name)
        metrics[name] = result
        files = {out / "eval" / f"{name}_{kind}.jsonl": data.episodes_to_jsonl(eps) for kind, eps in runs.items()}
        finish_stage(out, done, f"eval:{name}", {**files, metrics_path: json.dumps(metrics, indent=1)})
        if is_main():
            tqdm.write(f"{name}: " + ", ".join(f"{key}@{cfg.turns} {100 * result[key][-1]['acc']:.1f}%"
                                               for key in ("p1", "pass", "m1", "maj")))

    evaluate_stage("base", base_path)
    policy_path = base_path
    for k in range(1, cfg.iterations + 1):
        it = out / f"iter{k}"
        if f"collect:{k}" not in done:
            policy = load_policy(policy_path, cfg, prompts)
            # "mixed": every other problem with the oracle's feedback, the rest with the neutral one
            plan = [(cfg.feedback, train_problems)] if cfg.feedback != "mixed" else \
                [("oracle", train_problems[0::2]), ("neutral", train_problems[1::2])]
            # N candidates at every turn (best-of-N); turn 1 may have its own count (official: 1)
            first, later = cfg.first_samples or cfg.samples, cfg.samples
            widths = [first] + [later] * (cfg.turns - 1)
            episodes = []
            for protocol, problems in plan:
                episodes += rollout_all(policy, problems, cfg, widths, protocol, teacher, cfg.seed + 100 * k,
                                        desc=f"iter {k}: collect ({protocol})")
            del policy
            weigh(episodes, cfg)
            finish_stage(out, done, f"collect:{k}", {it / "trajectories.jsonl": data.episodes_to_jsonl(episodes)})
        barrier()
        if f"train:{k}" not in done:
            policy = load_policy(policy_path, cfg, prompts, training=True)
            episodes = data.episodes_from_jsonl((it / "trajectories.jsonl").read_text())
            examples = data.training_examples(episodes, policy.tokenizer, prompts, policy.model.args.eos_ids,
                                              cfg.context)
            torch.manual_seed(cfg.seed + k)
            stats = train(policy.model, examples, cfg, policy.tokenizer.pad_id, shuffle_seed=cfg.seed + k,
                          desc=f"iter {k}: train")
            save_policy(policy.model, it / "policy", base_path, cfg)
            finish_stage(out, done, f"train:{k}", {it / "train.json": json.dumps(stats, indent=1)})
            del policy
        policy_path = it / "policy"
        evaluate_stage(f"iter{k}", policy_path)
    return metrics


def parse_args(argv=None) -> tuple[Config, bool, set[str]]:
    """Config from the command line: one flag per field, its help and default from the field; flags left
    out take a preset's values (toy.PRESETS: --model toy, the default, and smollm2-135m) or Config's."""
    import toy

    parser = argparse.ArgumentParser(
        description="RISE (Recursive Introspection, Qu et al. 2024): teach a model to improve its own answer over "
                    "several turns. With no arguments: a CPU toy that builds a tiny model and shows the effect.",
        epilog="Flags left out take the toy's defaults with --model toy (the default), the recipe of "
               "docs/smollm2.md with --model smollm2-135m (built by `python smollm2.py`) and the paper's otherwise. "
               "Plan the memory of a big run with `python bench.py --estimate-memory [flags]`.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = next(t for t in typing.get_args(hints[f.name]) or [hints[f.name]] if t is not type(None))
        presets = [f"; {name}: {preset[f.name]}" for name, preset in toy.PRESETS.items()
                   if preset.get(f.name, f.default) != f.default]
        default = f"default: {f.default}" + "".join(presets)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + f.name.replace("_", "-"), default=None, help=f"{f.metadata['help']} ({default})",
                            choices=f.metadata.get("choices"), **extra)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed stage")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    preset = toy.PRESETS.get(args["model"] or Config.model, {})
    given = {k for k, v in args.items() if v is not None}
    return Config(**{**preset, **{k: args[k] for k in given}}), resume, given


def main(argv=None):
    """The command: bad input ends in one message and exit status 2, before any work where it can."""
    import checks  # settings, model lookup, run folder, resume: checked before the method runs
    import report  # the table, metrics.png and report.html: for reading the results, not the method

    cfg, resume, given = parse_args(argv)
    cfg.device = init_distributed() or cfg.device
    start = time.time()
    try:
        cfg, base_path, teacher_path, train_problems, eval_problems = checks.prepare(cfg, resume, given)
        metrics = run(cfg, base_path, train_problems, eval_problems, teacher_path)
    except (checks.ConfigError, TrainingError, data.DataError, M.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, safetensors.SafetensorError) as e:  # a full disk, a folder that cannot be written
        print(f"error: {e}; free some space (or fix the folder), then run the command again with --resume "
              "(finished stages are kept)", file=sys.stderr)
        raise SystemExit(2) from None
    if is_main():
        print(f"\n{report.format_table(metrics)}\n")
        report.write_report(cfg.out)
        print(f"done in {(time.time() - start) / 60:.1f} min; results in {cfg.out}/ (metrics.json, metrics.png, "
              "report.html)")


if __name__ == "__main__":
    main()
