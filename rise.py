"""
rise.py -- RISE, Recursive Introspection (Qu et al. 2024): collect multi-turn rollouts, weight every
turn by its advantage, fine-tune, evaluate; and the command that runs it all.

    python rise.py                                   # CPU toy: builds a tiny model, runs RISE on it
    python rise.py --model mistral-7b --turns 5      # the paper's setting, on a GPU, GSM8K
    python rise.py --help

The method, and where each piece lives (paper sections in brackets):
  rollout            one question becomes a T-turn episode [§2]: at turn t the model reads the question
                     and its earlier attempts, each followed by feedback, and writes a new attempt. N
                     candidates are sampled per turn; the episode continues from the best one (RISE-Self,
                     best-of-N self-improvement [§4]) or from a teacher's (RISE-Distill [§4]); with an
                     oracle it stops at the first correct answer. KV caches are reused across turns.
  advantages         a candidate's reward minus the mean reward of the N candidates of its turn [§3]
  awr_weights        exp(advantage / beta), clipped (advantage-weighted regression [§3])
  training_examples  every (state, candidate) pair of an episode: the state is context, only the
                     candidate is trained, weighted by its AWR weight
  awr_loss / train   the weighted negative log-likelihood of each response, normalised by its tokens;
                     AdamW with warmup, gradient clipping and accumulation
  evaluate           p1@t (oracle), m1@t (majority over turns, no oracle) against the parallel
                     baselines pass@t and maj@t at the same sample budget [§5], with 95% intervals
  run                collect -> train -> evaluate, --iterations times, each stage resumable
  build_toy_base     the CPU default: a tiny Llama trained from scratch on data.py's toy task

Data flows one way: data.py builds states, model.py samples, verify.py scores, this file weights and
trains. Outputs (--out DIR): config.json, metrics.json, metrics.png, iterK/trajectories.jsonl,
iterK/policy/ (a Hugging Face checkpoint), eval_NAME.jsonl, and state.json (the completed stages).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import model as M
import verify

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    model: str = "toy"  # a checkpoint directory, a known name (see MODEL_NAMES) or "toy"
    teacher: str | None = None  # RISE-Distill: this checkpoint writes turns 2..T
    train_data: str = "gsm8k:train"  # data.load_problems spec or a .jsonl path
    eval_data: str = "gsm8k:test"
    train_problems: int | None = None  # use the first K training problems (None: all)
    eval_problems: int | None = None
    turns: int = 5  # T: attempts per episode
    samples: int = 4  # N: candidates sampled per turn during collection (best-of-N)
    iterations: int = 1  # collect -> train -> evaluate rounds (the paper's Iteration 1, 2)
    collect_feedback: str = "oracle"  # oracle: told "incorrect", stops when right; neutral: never told; mixed: half each
    context: str = "all"  # all: the state holds every earlier attempt (paper); last: only the latest
    temperature: float = 1.0  # sampling temperature for collection and evaluation (official: 1.0)
    top_p: float = 1.0
    max_new_tokens: int = 512  # per attempt
    weighting: str = "awr"  # awr: exp(advantage / beta); official: exp(reward / 0.4), chosen turns only
    beta: float = 1.0  # AWR temperature: lower = greedier (weight concentrates on the best candidates)
    max_weight: float = 20.0  # AWR clips weights here (Peng et al. 2019 use 20)
    normalize_advantages: bool = True  # divide a turn's advantages by their standard deviation
    skip_uniform_turns: bool = True  # drop turns whose N candidates all scored the same (no signal)
    lr: float = 1e-5  # AdamW peak learning rate (official: 1e-5); far below pre-training rates
    epochs: int = 2
    batch_size: int = 16  # examples per optimizer step (official: 16)
    micro_batch: int = 4  # examples per forward pass; batch_size / micro_batch accumulation steps
    warmup: float = 0.04  # fraction of steps with a linear warm-up (official: 0.04), then cosine decay
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0  # > 0: train rank-R LoRA adapters on every projection instead of all weights
    lora_alpha: float = 32.0  # LoRA scale alpha / rank
    grad_checkpoint: bool = False  # recompute each layer's activations in backward: ~layers x less memory
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP) instead of DDP
    amp: bool | None = None  # bfloat16 autocast in training; default: on for CUDA and bf16-capable CPUs
    rows_per_batch: int = 64  # sequences sampled together per generate call (memory vs speed)
    seed: int = 0
    toy_pretrain_steps: int | None = None  # shorten the toy base's pre-training (tests); see ToyRecipe
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    device: str | None = None
    out: str = "runs/rise"


# The CPU toy's defaults (rise.py with no arguments); any flag still overrides them. Chosen by runs on
# the 2-core CPU of README (500 held-out problems, same base): collecting with the oracle's feedback
# beat "mixed" on p1@5 after one iteration (81.6 vs 78.0) and a second iteration added 6 points more;
# lr 3e-5, far below pre-training's 2e-3, keeps turn-1 accuracy from collapsing.
TOY_PRESET = dict(train_data="toy:train", eval_data="toy:test", train_problems=2000, eval_problems=500,
                  samples=4, iterations=2, collect_feedback="oracle", max_new_tokens=40, lr=3e-5, epochs=1,
                  batch_size=64, micro_batch=32, rows_per_batch=512, amp=False, out="runs/toy")

# Short names resolved offline: $RISE_MODELS/<name or repo name>, else the Hugging Face cache.
MODEL_NAMES = {
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "llama2-7b": "meta-llama/Llama-2-7b-chat-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def resolve_model(name: str) -> Path:
    """A checkpoint directory for `name`, found without the network, or an error saying where we looked."""
    looked = []
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looked.append(str(path))
    repo = MODEL_NAMES.get(name, name)
    roots = [Path(os.environ["RISE_MODELS"])] if os.environ.get("RISE_MODELS") else []
    for root in roots:
        for candidate in (root / name, root / repo.split("/")[-1], root / repo):
            if (candidate / "config.json").is_file():
                return candidate
            looked.append(str(candidate))
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted((s for s in snapshots.glob("*") if (s / "config.json").is_file()), key=lambda s: s.stat().st_mtime)
    if found:
        return found[-1]
    looked.append(str(snapshots / "*"))
    known = ", ".join(MODEL_NAMES)
    raise SystemExit(f"error: model {name!r} not found. Looked in:\n  " + "\n  ".join(looked) +
                     f"\nrise never downloads. On a machine with network, fetch it with\n"
                     f"  huggingface-cli download {repo}\n"
                     f"(into the Hugging Face cache), or put the checkpoint directory in $RISE_MODELS, or pass "
                     f"its path. Known names: {known}.")


# --------------------------------------------------------------------------------------------
# Rollouts (paper §2, §4)
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    text: str  # the attempt as stored (data.attempt_text: no end-of-turn token)
    answer: str | None  # verify.extract_answer
    reward: float  # verify.reward: 1 correct, 0 wrong, -1 no answer


@dataclass
class Episode:
    """One question's T-turn episode: all N candidates of each turn, and which one it continued from."""
    problem: data.Problem
    feedback: str  # "oracle" or "neutral"
    turns: list[list[Candidate]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)

    @property
    def attempts(self) -> list[str]:
        return [turn[c].text for turn, c in zip(self.turns, self.chosen)]

    @property
    def correct(self) -> list[bool]:
        """Was the attempt the episode kept at each turn right?"""
        return [turn[c].reward == 1.0 for turn, c in zip(self.turns, self.chosen)]


@dataclass
class Policy:
    """Something that writes attempts: a model, its tokenizer and the prompts it is asked with."""
    model: M.Transformer
    tokenizer: M.Tokenizer
    prompts: data.Prompts

    def stop_strings(self) -> tuple[str, ...]:
        # base models under the plain template go on to write the user's next turn themselves
        return () if self.tokenizer.chat_template else ("\nUser:",)


def score(problem: data.Problem, text: str) -> Candidate:
    return Candidate(text, verify.extract_answer(text), verify.reward(text, problem.answer))


def rollout(policy: Policy, problems: list[data.Problem], cfg: Config, *, turns: int, samples: int,
            feedback: str, teacher: Policy | None = None, seed: int = 0, progress=None) -> list[Episode]:
    """Episodes for `problems`, sampled together: len(problems) * samples rows in one KV cache.

    At each turn every live episode gets `samples` candidates from its current state; it keeps the
    first best one (official code: first argmax of reward), and all rows of that episode continue from
    it (the cache rows are copied). With feedback="oracle" an episode ends at its first correct
    answer. The cache of each row is reused from turn to turn: only the feedback is encoded. With a
    teacher (RISE-Distill), the policy writes turn 1 and the teacher every later turn.
    """
    N = samples
    episodes = [Episode(p, feedback) for p in problems]
    live = list(range(len(problems)))  # episodes still running; row r belongs to episode live[r // N]
    writer, cache, generator, sampled = None, None, None, []
    for t in range(turns):
        if not live:
            break
        current = teacher if teacher is not None and t > 0 else policy
        tok = current.tokenizer
        if current is not writer or cfg.context != "all":
            # a new writer (or a state that is not an extension of the last): encode states afresh
            writer = current
            prompts = [data.render_state(tok, data.state_messages(episodes[i].problem, episodes[i].attempts,
                                                                  current.prompts, feedback, cfg.context))
                       for i in live for _ in range(N)]
            cache = M.KVCache.for_model(current.model, len(prompts), max(map(len, prompts)) + cfg.max_new_tokens)
            generator = torch.Generator(device=cache.device).manual_seed(seed + t)
        else:
            # continue each row's cache: end of the kept attempt, the feedback, the next turn's prompt
            prompts = []
            for i, ids in zip(live, sampled):
                ep = episodes[i]
                more = data.continuation_tokens(tok, ep.problem, ep.attempts, ids, current.prompts, feedback,
                                                current.model.args.eos_ids)
                prompts += [more] * N
        outs = M.generate(current.model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, stop_strings=current.stop_strings(), tokenizer=tok,
                          generator=generator, cache=cache)
        keep_rows, sampled, still_live = [], [], []
        for k, i in enumerate(live):
            rows = outs[k * N:(k + 1) * N]
            candidates = [score(episodes[i].problem, data.attempt_text(tok, ids, current.model.args.eos_ids))
                          for ids in rows]
            best = max(range(N), key=lambda j: (candidates[j].reward, -j))  # first argmax
            episodes[i].turns.append(candidates)
            episodes[i].chosen.append(best)
            if feedback == "oracle" and candidates[best].reward == 1.0:
                continue  # the oracle stops a solved episode
            still_live.append(i)
            sampled.append(rows[best])
            keep_rows += [k * N + best] * N
        live = still_live
        if live and turns > t + 1:
            cache.reorder(keep_rows)  # drop finished episodes; every row continues from the kept attempt
        if progress is not None:
            progress.update(len(outs))
    return episodes


def rollout_all(policy: Policy, problems: list[data.Problem], cfg: Config, *, turns: int, samples: int,
                feedback: str, teacher: Policy | None = None, seed: int = 0, desc: str = "rollout") -> list[Episode]:
    """rollout() over all problems, in batches of about cfg.rows_per_batch rows, with a progress bar.
    Under torchrun each rank rolls out its shard() with its own seed; every rank gets all episodes back."""
    mine = shard(problems)
    seed += 1_000_003 * rank()
    per_batch = max(1, cfg.rows_per_batch // samples)
    episodes = []
    with tqdm(total=len(mine) * samples * turns, desc=desc, unit="attempt", dynamic_ncols=True,
              disable=not is_main()) as bar:
        for start in range(0, len(mine), per_batch):
            episodes += rollout(policy, mine[start:start + per_batch], cfg, turns=turns, samples=samples,
                                feedback=feedback, teacher=teacher, seed=seed + start, progress=bar)
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


def official_weight(reward: float) -> float:
    """The official RISE code's weight: exp(reward / 0.4) per sample, no baseline, no clip."""
    return math.exp(reward / 0.4)


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 on the trained attempt (and its end-of-turn token)
    weight: float
    turn: int


def training_examples(episodes: list[Episode], policy: Policy, cfg: Config) -> list[Example]:
    """(state, candidate, weight) triples of every turn of every episode.

    awr: all N candidates of a turn, weighted by exp(advantage / beta); turns whose candidates all
    scored the same carry no information about what is better and are dropped (skip_uniform_turns).
    official: only the candidate each episode kept, weighted exp(reward / 0.4).
    """
    examples = []
    for ep in episodes:
        for t, candidates in enumerate(ep.turns):
            state = data.state_messages(ep.problem, ep.attempts[:t], policy.prompts, ep.feedback, cfg.context)
            rewards = [c.reward for c in candidates]
            if cfg.weighting == "official":
                picked = [(candidates[ep.chosen[t]], official_weight(candidates[ep.chosen[t]].reward))]
            else:
                if cfg.skip_uniform_turns and len(set(rewards)) == 1:
                    continue
                weights = awr_weights(advantages(rewards, cfg.normalize_advantages), cfg.beta, cfg.max_weight)
                picked = list(zip(candidates, weights))
            for candidate, weight in picked:
                ids, mask = data.training_example(policy.tokenizer, state + [{"role": "assistant",
                                                                             "content": candidate.text}],
                                                  policy.model.args.eos_ids)
                examples.append(Example(ids, mask, weight, t + 1))
    return examples


def batch_tensors(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded (B, T) ids and loss mask, and (B,) weights. The mask comes from each example's
    own lengths, never from searching for pad ids (pad often equals EOS, which must be trained)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T)
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, :len(e.mask)] = torch.tensor(e.mask, dtype=torch.float)
    weights = torch.tensor([e.weight for e in examples])
    return ids.to(device), mask.to(device), weights.to(device)


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1, (B, T-1), at temperature 1 (we train the policy itself,
    not the tempered sampler), computed in float32."""
    logits = model(ids[:, :-1]).float()
    return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def awr_loss(model, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of weight * (mean negative log-likelihood of the response's tokens).
    The caller divides by the number of examples per optimizer step."""
    logp = token_logprobs(model, ids)
    target = mask[:, 1:]
    per_example = -(logp * target).sum(1) / target.sum(1).clamp(min=1)
    return (weights * per_example).sum()


def lr_at(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to 10%."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def use_amp(cfg: Config, device: torch.device) -> bool:
    """bfloat16 autocast pays off on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16)."""
    if cfg.amp is not None:
        return cfg.amp
    if device.type == "cuda":
        return True
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


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


def train(model: M.Transformer, examples: list[Example], cfg: Config, pad_id: int, seed: int = 0,
          desc: str = "train") -> dict:
    """Weighted fine-tuning (AWR) of `model` in place: `epochs` passes over the examples, AdamW,
    batch_size examples per optimizer step in micro-batches of micro_batch (gradient accumulation).

    Under torchrun every rank holds all examples and takes every world_size-th of each step's batch;
    gradients are averaged by DDP (or FSDP), so a step equals one process on the whole batch.
    """
    if not examples:
        return {"steps": 0, "loss": float("nan"), "examples": 0}
    device = model.model.embed_tokens.weight.device
    model.gradient_checkpointing = cfg.grad_checkpoint
    module = wrap_for_training(model, cfg)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, cfg.warmup))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp(cfg, device))
    R, W = rank(), world_size()
    module.train()
    losses = []
    with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not is_main()) as bar:
        for _ in range(cfg.epochs):
            order = examples[:]
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                batch = sorted(order[start:start + cfg.batch_size], key=lambda e: len(e.ids))  # less padding
                mine = batch[R::W]
                # every rank runs the same number of micro-batches (the gradient sync happens on the last);
                # a rank short of examples runs a zero-weight copy of one
                n_micro = math.ceil(math.ceil(len(batch) / W) / cfg.micro_batch)
                mine += [dataclasses.replace(batch[0], weight=0.0)] * (n_micro * cfg.micro_batch - len(mine))
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for m in range(n_micro):
                    last = m == n_micro - 1
                    sync = contextlib.nullcontext()
                    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not last:
                        sync = module.no_sync()
                    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP
                        module.set_requires_gradient_sync(last)
                    ids, mask, weights = batch_tensors(mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch],
                                                       pad_id, device)
                    with sync:
                        with amp:  # DDP averages over ranks: scale by W so the step's loss is the batch mean
                            loss = awr_loss(module, ids, mask, weights) * W / len(batch)
                        loss.backward()
                    step_loss += loss.detach()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                schedule.step()
                if distributed():
                    torch.distributed.all_reduce(step_loss)
                losses.append(step_loss.item() / W)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
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


def majority_correct(candidates: list[Candidate]) -> bool:
    """Is the most common answer right? Ties go to the most recent of the tied answers; attempts with
    no answer do not vote."""
    votes = [(verify.canonical_answer(c.answer), c.reward == 1.0) for c in candidates if c.answer is not None]
    votes = [v for v in votes if v[0] is not None]
    if not votes:
        return False
    counts = Counter(answer for answer, _ in votes)
    top = max(counts.values())
    for answer, correct in reversed(votes):
        if counts[answer] == top:
            return correct
    return False


def p1_at(episodes: list[Episode], t: int) -> list[bool]:
    """With an oracle: solved at some turn <= t (the episode stopped there)."""
    return [any(ep.correct[:t]) for ep in episodes]


def m1_at(episodes: list[Episode], t: int) -> list[bool]:
    """Without an oracle: the majority answer of the first t sequential turns is right."""
    return [majority_correct([turn[c] for turn, c in zip(ep.turns[:t], ep.chosen[:t])]) for ep in episodes]


def pass_at(parallel: list[Episode], t: int) -> list[bool]:
    """Parallel baseline: one of t independent first-turn samples is right (same budget as p1@t)."""
    return [any(c.reward == 1.0 for c in ep.turns[0][:t]) for ep in parallel]


def maj_at(parallel: list[Episode], t: int) -> list[bool]:
    """Parallel baseline: the majority of t independent first-turn samples is right (m5@t1 at t=5)."""
    return [majority_correct(ep.turns[0][:t]) for ep in parallel]


def summarize(hits: list[bool]) -> dict:
    lo, hi = wilson_interval(sum(hits), len(hits))
    return {"acc": sum(hits) / max(1, len(hits)), "lo": lo, "hi": hi, "n": len(hits)}


def evaluate(policy: Policy, problems: list[data.Problem], cfg: Config, seed: int, name: str) -> tuple[dict, dict]:
    """All four metrics for t = 1..T on held-out problems, from three sets of rollouts: T turns with the
    oracle (p1), T turns with neutral feedback (m1), T independent first-turn samples (pass, maj)."""
    T = cfg.turns
    runs = {
        "oracle": rollout_all(policy, problems, cfg, turns=T, samples=1, feedback="oracle", seed=seed,
                              desc=f"eval {name}: oracle"),
        "neutral": rollout_all(policy, problems, cfg, turns=T, samples=1, feedback="neutral", seed=seed + 1,
                               desc=f"eval {name}: no oracle"),
        "parallel": rollout_all(policy, problems, cfg, turns=1, samples=T, feedback="neutral", seed=seed + 2,
                                desc=f"eval {name}: parallel"),
    }
    metrics = {
        "p1": [summarize(p1_at(runs["oracle"], t)) for t in range(1, T + 1)],
        "m1": [summarize(m1_at(runs["neutral"], t)) for t in range(1, T + 1)],
        "pass": [summarize(pass_at(runs["parallel"], t)) for t in range(1, T + 1)],
        "maj": [summarize(maj_at(runs["parallel"], t)) for t in range(1, T + 1)],
        # accuracy of the t-th attempt alone, without an oracle: does a later turn do better?
        "turn": [summarize([ep.correct[t - 1] for ep in runs["neutral"]]) for t in range(1, T + 1)],
    }
    return metrics, runs


METRIC_LABELS = {"p1": "p1@t  (oracle, sequential)", "pass": "pass@t (parallel)",
                 "m1": "m1@t  (no oracle, sequential)", "maj": "maj@t (parallel)", "turn": "turn t alone"}


def format_table(metrics: dict) -> str:
    """A markdown table: one row per metric and turn, one column per policy, accuracy [95% interval]."""
    names = list(metrics)
    T = len(next(iter(metrics.values()))["p1"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRIC_LABELS.items():
        for t in range(1, T + 1):
            cells = [f"{100 * m['acc']:.1f} [{100 * m['lo']:.1f}, {100 * m['hi']:.1f}]"
                     for m in (metrics[name][key][t - 1] for name in names)]
            lines.append(f"| {label.replace('@t', f'@{t}').replace(' t ', f' {t} ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(metrics: dict, path: Path) -> None:
    """Accuracy against turn: sequential (solid) vs parallel (dashed), with and without an oracle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = [("with an oracle", "p1", "pass"), ("without an oracle", "m1", "maj")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, seq, par) in zip(axes, panels):
        for color, (name, m) in zip(colors, metrics.items()):
            turns = range(1, len(m[seq]) + 1)
            for key, style in ((seq, "-o"), (par, "--s")):
                acc = [100 * x["acc"] for x in m[key]]
                ax.plot(turns, acc, style, color=color, label=f"{name} {key}@t", markersize=4)
                ax.fill_between(turns, [100 * x["lo"] for x in m[key]], [100 * x["hi"] for x in m[key]],
                                color=color, alpha=0.08)
        ax.set_title(title)
        ax.set_xlabel("turn t (sequential) / samples t (parallel)")
        ax.set_xticks(list(turns))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Run directory: atomic writes, resumable stages
# --------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader (or a resumed run) sees the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def episode_record(ep: Episode) -> dict:
    return {"id": ep.problem.id, "question": ep.problem.question, "reference": ep.problem.answer,
            "feedback": ep.feedback, "chosen": ep.chosen,
            "turns": [[dataclasses.asdict(c) for c in turn] for turn in ep.turns]}


def episode_from_record(r: dict) -> Episode:
    return Episode(data.Problem(r["question"], r["reference"], r["id"]), r["feedback"],
                   [[Candidate(**c) for c in turn] for turn in r["turns"]], r["chosen"])


def write_episodes(path: Path, episodes: list[Episode]) -> None:
    write_atomic(path, "".join(json.dumps(episode_record(ep)) + "\n" for ep in episodes))


def read_episodes(path: Path) -> list[Episode]:
    return [episode_from_record(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


class RunState:
    """state.json: the stages already completed, so --resume skips them."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.done = json.loads(self.path.read_text())["done"] if self.path.is_file() else []

    def complete(self, stage: str) -> None:
        self.done.append(stage)
        if is_main():
            write_atomic(self.path, json.dumps({"done": self.done}, indent=1))

    def __contains__(self, stage: str) -> bool:
        return stage in self.done


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
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
        return device
    return "cpu"


def shard(problems: list) -> list:
    """This rank's problems: every world_size-th, starting at its rank."""
    return problems[rank()::world_size()]


def gather_episodes(episodes: list[Episode]) -> list[Episode]:
    """Every rank's episodes (of its shard()), back in problem order, on every rank."""
    if not distributed():
        return episodes
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, episodes)
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


# --------------------------------------------------------------------------------------------
# The toy base model (CPU default)
# --------------------------------------------------------------------------------------------


@dataclass
class ToyRecipe:
    """How the CPU toy's base model is made, in two phases of pre-training from scratch:
      1. arithmetic: single-turn problems with their correct solutions, until it can add and subtract;
      2. episodes of a noisy student: a fresh attempt is right with probability p_right (a wrong one
         has one arithmetic slip, carried through the later steps), and when asked to try again it
         repeats its previous attempt with probability p_repeat -- the paper's observation (§1, §7)
         that a model prompted to try again mostly hands back the same answer.
    The result answers some but far from all problems at turn 1 and gains little from later turns:
    the starting point RISE is meant to improve."""
    n_train: int = 20_000  # toy problems (data.toy_splits); RISE later trains on a subset of these
    n_test: int = 500
    seed: int = 0
    max_value: int = 30  # every number in a problem is at most this (data.make_toy_problems)
    p_right: float = 0.4
    p_repeat: float = 0.6
    turns: int = 5
    arithmetic_steps: int = 700  # optimizer steps of phase 1
    episode_steps: int = 250  # optimizer steps of phase 2
    batch_size: int = 64
    lr: float = 2e-3
    dim: int = 128
    n_layers: int = 4

    def key(self) -> str:
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def split(self) -> dict:
        return dict(n_train=self.n_train, n_test=self.n_test, seed=self.seed, max_value=self.max_value)


def toy_args(recipe: ToyRecipe, vocab_size: int) -> M.ModelArgs:
    return M.ModelArgs(dim=recipe.dim, n_layers=recipe.n_layers, n_heads=4, n_kv_heads=2, head_dim=recipe.dim // 4,
                       hidden_dim=3 * recipe.dim, vocab_size=vocab_size, norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=True, max_seq_len=1024)


def slip(solution: str, rng: random.Random) -> str:
    """The solution with one arithmetic slip: one step's result is off, and later steps carry it on."""
    lines = solution.split("\n")[:-1]  # "37+48=85", "85-19=66"; the last line is "#### 66"
    wrong = rng.randrange(len(lines))
    value, out = None, []
    for i, line in enumerate(lines):
        left, _ = line.split("=")
        op = next(c for c in left[1:] if c in "+-*")
        a, b = left.split(op, 1) if left[0] != "-" else (left[:left.index(op, 1)], left[left.index(op, 1) + 1:])
        a = int(a) if value is None else value
        value = {"+": a + int(b), "-": a - int(b), "*": a * int(b)}[op]
        if i == wrong:
            value = max(0, value + rng.choice([-10, -2, -1, 1, 2, 10])) or value + 1
        out.append(f"{a}{op}{b}={value}")
    return "\n".join(out + [f"#### {value}"])


def toy_episode(problem: data.Problem, recipe: ToyRecipe, rng: random.Random) -> tuple[list[dict], str]:
    """One synthetic episode of the noisy student, under the oracle (stop when right) or neutral protocol."""
    feedback = rng.choice(["oracle", "neutral"])
    attempts = []
    for _ in range(recipe.turns):
        if attempts and rng.random() < recipe.p_repeat:
            attempt = attempts[-1]
        else:
            attempt = problem.answer if rng.random() < recipe.p_right else slip(problem.answer, rng)
        attempts.append(attempt)
        if feedback == "oracle" and attempt == problem.answer:
            break
    messages = data.state_messages(problem, attempts[:-1], data.TOY_PROMPTS, feedback)
    return messages + [{"role": "assistant", "content": attempts[-1]}], feedback


def all_turns_example(tokenizer: M.Tokenizer, messages: list[dict], eos_ids) -> Example:
    """One sequence that trains every assistant turn of an episode (pre-training is not RISE: every
    turn of the synthetic student is a target). Pieces come from data.training_example, whose prefixes
    agree token for token under the toy's character-level tokenizer."""
    ids, mask = data.training_example(tokenizer, messages, eos_ids)
    for i, m in enumerate(messages[:-1]):
        if m["role"] == "assistant":
            sub_ids, sub_mask = data.training_example(tokenizer, messages[:i + 1], eos_ids)
            assert ids[:len(sub_ids)] == sub_ids
            mask[:len(sub_mask)] = [a | b for a, b in zip(mask, sub_mask)]
    return Example(ids, mask, 1.0, 0)


def toy_recipe(cfg: Config) -> ToyRecipe:
    """The recipe a run uses; --toy-pretrain-steps N shortens both phases (N each) for quick tests."""
    n = cfg.toy_pretrain_steps
    return ToyRecipe() if n is None else ToyRecipe(arithmetic_steps=n, episode_steps=n)


def toy_cache_dir() -> Path:
    return Path(os.environ.get("RISE_CACHE", "~/.cache/rise")).expanduser()


def build_toy_base(recipe: ToyRecipe | None = None, cache_dir: Path | None = None) -> Path:
    """The toy base checkpoint: a tiny Llama trained from scratch (see ToyRecipe), saved in Hugging Face
    format and loaded back like any checkpoint. Built once per recipe, then cached."""
    recipe = recipe or ToyRecipe()
    path = (cache_dir or toy_cache_dir()) / f"toy-base-{recipe.key()}"
    if (path / "config.json").is_file():
        return path
    tmp_tok = Path(tempfile_dir(path.parent))
    tokenizer = M.Tokenizer(data.write_toy_tokenizer(tmp_tok))
    torch.manual_seed(recipe.seed)
    args = toy_args(recipe, tokenizer.vocab_size)
    args.bos_id, args.eos_ids = tokenizer.bos_id, (tokenizer.eos_id,)
    model = M.Transformer(args)
    for name, p in model.named_parameters():  # GPT-2 style init: small normal weights, unit norms
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    problems, _ = data.toy_splits(**recipe.split())
    rng = random.Random(recipe.seed)
    eos = args.eos_ids
    draw = lambda n: [problems[rng.randrange(len(problems))] for _ in range(n)]  # noqa: E731
    phases = [("arithmetic", recipe.arithmetic_steps,
               lambda p: data.state_messages(p, [], data.TOY_PROMPTS) + [{"role": "assistant", "content": p.answer}]),
              ("noisy episodes", recipe.episode_steps, lambda p: toy_episode(p, recipe, rng)[0])]
    stats = {}
    for name, steps, make in phases:
        examples = [all_turns_example(tokenizer, make(p), eos) for p in draw(steps * recipe.batch_size)]
        # float32: at this width bf16 autocast's casts cost more than its matrix units save (a phase-1
        # step took 650 ms with it, 360 ms without, on the 2-core Sapphire Rapids of README)
        cfg = Config(lr=recipe.lr, epochs=1, batch_size=recipe.batch_size, micro_batch=recipe.batch_size,
                     warmup=0.05, weight_decay=0.1, amp=False)
        stats[name] = train(model, examples, cfg, tokenizer.pad_id, seed=recipe.seed, desc=f"toy base: {name}")
    M.save(model, path, tokenizer_dir=tmp_tok)
    write_atomic(path / "recipe.json", json.dumps({**dataclasses.asdict(recipe), **stats}, indent=1))
    shutil.rmtree(tmp_tok, ignore_errors=True)
    return path


def tempfile_dir(parent: Path) -> str:
    import tempfile
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=".toy-tokenizer.", dir=parent)


# --------------------------------------------------------------------------------------------
# Memory: what a run needs, estimated before it starts
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


def memory_estimate(args: M.ModelArgs, cfg: Config, device_type: str, world: int = 1) -> dict[str, dict[str, float]]:
    """GiB one device needs in each stage of a run. Stages run one after the other and free their memory,
    so the peak is the larger of the two. A rough but conservative bill: weights, gradients, AdamW's two
    moments, activations of one micro-batch, logits, and the KV cache of one batch of rollouts."""
    GiB = 2 ** 30
    P = parameter_count(args)
    low = device_type == "cuda" if cfg.dtype is None else cfg.dtype in ("bfloat16", "float16")
    wbytes = 2 if low else 4
    seq = 256 + cfg.turns * (cfg.max_new_tokens + 64)  # the longest state: prompt + T attempts and feedbacks
    kv_per_token = args.n_layers * 2 * args.n_kv_heads * args.head_dim * wbytes
    rollout = {"weights": P * wbytes / GiB,
               "KV cache (rows_per_batch x longest state)": cfg.rows_per_batch * seq * kv_per_token / GiB,
               "logits of one decoding step": cfg.rows_per_batch * args.vocab_size * 4 / GiB}
    shard = world if cfg.fsdp else 1
    if cfg.lora_rank:
        trainable = lora_parameter_count(args, cfg.lora_rank)
        training = {"frozen weights": P * wbytes / GiB,
                    "LoRA adapters + gradients + AdamW (fp32)": trainable * 16 / GiB}
    else:
        master = 4 if cfg.dtype is None else wbytes
        training = {"weights (fp32 master)" if master == 4 else "weights": P * master / shard / GiB,
                    "gradients": P * master / shard / GiB, "AdamW moments (fp32)": P * 8 / shard / GiB}
    act_bytes = 2 if (low or use_amp(cfg, torch.device(device_type))) else 4
    per_token_layer = (6 * args.dim + 4 * args.hidden_dim) * act_bytes  # what one layer keeps for backward
    tokens = cfg.micro_batch * seq
    if cfg.grad_checkpoint:  # keep each layer's input; recompute one layer at a time
        act = tokens * (args.n_layers * args.dim * act_bytes + per_token_layer)
    else:
        act = tokens * args.n_layers * per_token_layer
    training["activations (micro_batch x longest state)"] = act / GiB
    training["logits, log-probs and their gradient"] = tokens * args.vocab_size * 10 / GiB
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


def check_memory(base_path: Path, cfg: Config, refuse: bool = True) -> dict:
    """Print what the run will need; refuse, naming flags that would fit, when the device has less.
    The device is cfg.device (default: cuda if there is one); for an estimate alone (refuse=False)
    it need not exist here, so `--estimate-memory --device cuda` plans a GPU run on a laptop."""
    args = M.ModelArgs.from_config(json.loads((base_path / "config.json").read_text()))
    device, _ = M.default_placement(cfg.device)
    world = world_size() if distributed() else int(os.environ.get("WORLD_SIZE", "1"))  # (plan a torchrun run)
    estimate = memory_estimate(args, cfg, device.type, world)
    available = device_memory_gib(device) if refuse or device.type != "cuda" or torch.cuda.is_available() else None
    if is_main():
        have = f", {available:.0f} GiB available" if available is not None else ""
        tqdm.write(f"memory estimate per {device.type} device ({parameter_count(args) / 1e9:.2f}B parameters"
                   f"{have}; {world} process{'es' if world > 1 else ''}{', FSDP' if cfg.fsdp else ''}):\n{format_estimate(estimate)}")
    if refuse and peak_gib(estimate) > 0.92 * available:
        options = [("--grad-checkpoint", dict(grad_checkpoint=True)), ("--micro-batch 1", dict(micro_batch=1)),
                   ("--lora-rank 16 --grad-checkpoint", dict(lora_rank=16, grad_checkpoint=True)),
                   ("--lora-rank 16 --grad-checkpoint --micro-batch 1 --rows-per-batch 16",
                    dict(lora_rank=16, grad_checkpoint=True, micro_batch=1, rows_per_batch=16))]
        fits = [flags for flags, change in options
                if peak_gib(memory_estimate(args, dataclasses.replace(cfg, **change), device.type, world))
                <= 0.92 * available]
        hint = f"add {fits[0]}" if fits else "shard the model over several GPUs: torchrun --nproc_per_node=8 " \
                                            "rise.py --fsdp ..."
        raise SystemExit(f"error: this run needs about {peak_gib(estimate):.0f} GiB per device but the {device.type} "
                         f"device has {available:.0f} GiB. To fit, {hint}.")
    return estimate


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def load_policy(path: Path, cfg: Config, prompts: data.Prompts, training: bool = False) -> Policy:
    """A checkpoint as a Policy. For training: LoRA adapters added (only they train) if lora_rank > 0,
    else float32 master weights (bfloat16 autocast does the arithmetic) unless --dtype says otherwise."""
    dtype = cfg.dtype or (None if not training or cfg.lora_rank else "float32")
    model, tokenizer = M.load(path, dtype=getattr(torch, dtype) if dtype else None, device=cfg.device)
    if training and cfg.lora_rank:
        M.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    return Policy(model, tokenizer, prompts)  # (with --fsdp, wrap_for_training shards it layer by layer)


def save_policy(model: M.Transformer, path: Path, base_path: Path, cfg: Config) -> None:
    """The trained policy as a plain Hugging Face checkpoint (LoRA merged into the weights), in the dtype
    inference uses; rank 0 writes it. Adapters alone are kept beside it (adapter.safetensors)."""
    if cfg.lora_rank and is_main():
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in M.lora_state_dict(model).items()},
                  path.parent / "adapter.safetensors")
    if cfg.lora_rank:
        M.merge_lora(model)
    state = None
    if cfg.fsdp and distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        _, dtype = M.default_placement(cfg.device, getattr(torch, cfg.dtype) if cfg.dtype else None)
        M.save(model, path, tokenizer_dir=base_path, state_dict=state, dtype=dtype)
    barrier()


def run(cfg: Config, resume: bool = False) -> dict:
    """The whole method: evaluate the base, then `iterations` times collect -> train -> evaluate.
    Each stage loads what it needs from disk and marks itself done in state.json when its files are
    written, so an interrupted run resumes at the first unfinished stage with the same result."""
    out = Path(cfg.out)
    state = RunState(out)
    if state.done and not resume:
        raise SystemExit(f"error: {out} already holds a run (stages done: {', '.join(state.done)}). "
                         f"Pass --resume to continue it, or choose another --out.")
    if resume and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
        cfg = Config(**{**saved, "out": cfg.out, "device": cfg.device})  # a resumed run keeps its settings
    elif is_main():
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))

    recipe = toy_recipe(cfg)
    if cfg.model == "toy":
        if is_main():
            build_toy_base(recipe)
        barrier()
    base_path = build_toy_base(recipe) if cfg.model == "toy" else resolve_model(cfg.model)
    check_memory(base_path, cfg)
    prompts = data.TOY_PROMPTS if cfg.train_data.startswith("toy") else data.GSM8K_PROMPTS
    train_problems = data.load_problems(cfg.train_data, **recipe.split())[:cfg.train_problems]
    eval_problems = data.load_problems(cfg.eval_data, **recipe.split())[:cfg.eval_problems]  # the base's split
    teacher = load_policy(resolve_model(cfg.teacher), cfg, prompts) if cfg.teacher else None
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    def evaluate_stage(name: str, path: Path):
        if f"eval:{name}" in state:
            return
        result, runs = evaluate(load_policy(path, cfg, prompts), eval_problems, cfg, cfg.seed + 1000, name)
        metrics[name] = result
        if is_main():
            for kind, episodes in runs.items():
                write_episodes(out / "eval" / f"{name}_{kind}.jsonl", episodes)
            write_atomic(metrics_path, json.dumps(metrics, indent=1))
            plot(metrics, out / "metrics.png")
            print(f"\n{format_table(metrics)}\n", flush=True)
        state.complete(f"eval:{name}")

    evaluate_stage("base", base_path)
    policy_path = base_path
    for k in range(1, cfg.iterations + 1):
        it = out / f"iter{k}"
        if f"collect:{k}" not in state:
            policy = load_policy(policy_path, cfg, prompts)
            # "mixed": every other problem with the oracle's feedback, the rest with the neutral one
            plan = [(cfg.collect_feedback, train_problems)] if cfg.collect_feedback != "mixed" else \
                [("oracle", train_problems[0::2]), ("neutral", train_problems[1::2])]
            episodes = []
            for feedback, problems in plan:
                episodes += rollout_all(policy, problems, cfg, turns=cfg.turns, samples=cfg.samples,
                                        feedback=feedback, teacher=teacher, seed=cfg.seed + 100 * k,
                                        desc=f"iter {k}: collect ({feedback})")
            del policy
            if is_main():
                write_episodes(it / "trajectories.jsonl", episodes)
                log_collection(episodes, k)
            state.complete(f"collect:{k}")
        barrier()
        if f"train:{k}" not in state:
            policy = load_policy(policy_path, cfg, prompts, training=True)
            examples = training_examples(read_episodes(it / "trajectories.jsonl"), policy, cfg)
            torch.manual_seed(cfg.seed + k)
            stats = train(policy.model, examples, cfg, policy.tokenizer.pad_id, seed=cfg.seed + k,
                          desc=f"iter {k}: train")
            save_policy(policy.model, it / "policy", base_path, cfg)
            if is_main():
                write_atomic(it / "train.json", json.dumps(stats, indent=1))
            state.complete(f"train:{k}")
            del policy
        policy_path = it / "policy"
        evaluate_stage(f"iter{k}", policy_path)
    return metrics


def log_collection(episodes: list[Episode], k: int) -> None:
    """What collection found, turn by turn: how many episodes were still going, and in how many of them
    some candidate was right (the turns that give AWR something to learn from)."""
    T = max(len(ep.turns) for ep in episodes)
    for t in range(T):
        live = [ep for ep in episodes if len(ep.turns) > t]
        any_right = sum(any(c.reward == 1.0 for c in ep.turns[t]) for ep in live)
        tqdm.write(f"iter {k} collect, turn {t + 1}: {len(live)} episodes, {any_right} with a right candidate")


def parse_args(argv=None) -> tuple[Config, bool, bool]:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="RISE (Recursive Introspection, Qu et al. 2024): teach a model to improve its own answer over "
                    "several turns. With no arguments: a CPU toy that builds a tiny model and shows the effect.",
        epilog="Flags left out take the toy's defaults with --model toy (the default) and the paper's otherwise.")
    add = parser.add_argument
    add("--model", default=defaults.model, help="checkpoint directory, a known name (" + ", ".join(MODEL_NAMES) +
        ") found offline in $RISE_MODELS or the Hugging Face cache, or 'toy'")
    add("--teacher", default=None, help="RISE-Distill: a stronger checkpoint that writes turns 2..T (default: none, RISE-Self)")
    add("--train-data", default=None, help="gsm8k:train, toy:train or a .jsonl file (question/answer fields); "
        "GSM8K is read from $RISE_DATA_DIR, or else ../shared/data")
    add("--eval-data", default=None, help="gsm8k:test, math:test, toy:test or a .jsonl file")
    add("--train-problems", type=int, default=None, help="use only the first K training problems")
    add("--eval-problems", type=int, default=None, help="use only the first K evaluation problems")
    add("--turns", type=int, default=defaults.turns, help="T, attempts per episode")
    add("--samples", type=int, default=None, help="N, candidates per turn when collecting (best-of-N)")
    add("--iterations", type=int, default=None, help="collect -> train -> evaluate rounds")
    add("--feedback", dest="collect_feedback", choices=["oracle", "neutral", "mixed"], default=None,
        help="collection feedback: oracle says 'incorrect' and stops at the first right answer; neutral never "
             "tells; mixed: half the problems each way")
    add("--context", choices=["all", "last"], default=defaults.context,
        help="state = question + all earlier attempts (paper) or only the latest (official evaluation code)")
    add("--temperature", type=float, default=defaults.temperature, help="sampling temperature (0 = greedy)")
    add("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass")
    add("--max-new-tokens", type=int, default=None, help="token budget of one attempt")
    add("--weighting", choices=["awr", "official"], default=defaults.weighting,
        help="awr: exp(advantage/beta) over all candidates; official: exp(reward/0.4) on kept attempts only")
    add("--beta", type=float, default=defaults.beta, help="AWR temperature (lower = greedier)")
    add("--max-weight", type=float, default=defaults.max_weight, help="AWR weight clip")
    add("--no-normalize-advantages", dest="normalize_advantages", action="store_false",
        help="use reward - mean without dividing by the turn's standard deviation")
    add("--keep-uniform-turns", dest="skip_uniform_turns", action="store_false",
        help="also train on turns whose candidates all scored the same (weight 1 each)")
    add("--lr", type=float, default=None, help="AdamW peak learning rate")
    add("--epochs", type=int, default=None, help="passes over the collected examples per iteration")
    add("--batch-size", type=int, default=None, help="examples per optimizer step")
    add("--micro-batch", type=int, default=None, help="examples per forward pass (gradient accumulation)")
    add("--warmup", type=float, default=defaults.warmup, help="warm-up fraction of the steps")
    add("--rows-per-batch", type=int, default=None, help="sequences sampled together")
    add("--lora-rank", type=int, default=defaults.lora_rank,
        help="train rank-R LoRA adapters on the attention and MLP projections (0: full fine-tuning)")
    add("--lora-alpha", type=float, default=defaults.lora_alpha, help="LoRA scale is alpha / rank")
    add("--grad-checkpoint", action="store_true", help="recompute activations in backward (less memory)")
    add("--fsdp", action="store_true", help="under torchrun: shard the model (FSDP) instead of replicating it (DDP)")
    add("--amp", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast in training (default: on for CUDA and CPUs with bf16 units; toy: off)")
    add("--seed", type=int, default=defaults.seed, help="seeds sampling, shuffling and the toy's data")
    add("--toy-pretrain-steps", type=int, default=None,
        help="optimizer steps of each phase of the toy base's pre-training (default: ToyRecipe's; the base is "
             "built once per setting, then cached in $RISE_CACHE)")
    add("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
        help="default: bfloat16 on GPU, float32 on CPU")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--out", default=None, help="run directory (config, trajectories, metrics, checkpoints)")
    add("--resume", action="store_true", help="continue the run in --out from its last completed stage")
    add("--estimate-memory", action="store_true",
        help="print the memory the run would need per device (--device cuda plans a GPU run from any machine; "
             "the model directory needs only its config.json) and exit")
    for action in parser._actions:  # say each default, and the toy's where it differs
        if action.nargs == 0 or "default" in (action.help or "default"):  # switches, and those that say it
            continue
        default = action.default if action.default is not None else getattr(defaults, action.dest, None)
        default = "all" if default is None and action.dest.endswith("_problems") else default
        toy = TOY_PRESET.get(action.dest, default)
        action.help += f" (default: {default}" + (f"; toy: {toy})" if toy != default else ")")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    estimate_only = args.pop("estimate_memory")
    preset = TOY_PRESET if args["model"] == "toy" else {}
    values = {**dataclasses.asdict(defaults), **preset, **{k: v for k, v in args.items() if v is not None}}
    return Config(**values), resume, estimate_only


def main(argv=None):
    cfg, resume, estimate_only = parse_args(argv)
    if estimate_only:
        base = build_toy_base(toy_recipe(cfg)) if cfg.model == "toy" else resolve_model(cfg.model)
        check_memory(base, cfg, refuse=False)
        return
    cfg.device = init_distributed() or cfg.device
    start = time.time()
    run(cfg, resume)
    if is_main():
        print(f"done in {(time.time() - start) / 60:.1f} min; results in {cfg.out}/ (metrics.json, metrics.png)")


if __name__ == "__main__":
    main()
