"""
toy.py -- the CPU toy that `python rise.py` runs with no arguments: a task, a tokenizer and a tiny base
model, everything RISE needs to show its effect in minutes on a laptop. None of it is the method.

    python rise.py                      # builds the toy base once (cached in $RISE_CACHE), then runs RISE
    python toy.py --problems DIR        # toy problems as .jsonl files, for a real model

What is here, top to bottom:
  make_problems, splits    short multi-step arithmetic word problems with GSM8K-style solutions
                           ("37+48=85\\n85-19=66\\n#### 66"), so verify.py scores them like GSM8K
  words, write_tokenizer   a Hugging Face tokenizer directory, a token per word and per digit, with a
                           tiny chat template
  PRESET                   the rise.py settings `python rise.py` uses for it
  SMOLLM2_PRESET, arith_problems   `python rise.py --model smollm2-135m`'s settings and one-step problems
  Recipe, build_base       how the base model is pre-trained from scratch (two phases, see Recipe), and
                           the builder that caches it as an ordinary Hugging Face checkpoint
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import model as M

# --------------------------------------------------------------------------------------------
# The task: multi-step arithmetic word problems
# --------------------------------------------------------------------------------------------

# Small lists keep questions short and their vocabulary small: each word is one token (write_tokenizer).
NAMES = [("Ann", "She"), ("Bob", "He"), ("Cal", "He"), ("Dee", "She"), ("Eve", "She"), ("Max", "He"),
         ("Sam", "He"), ("Zoe", "She"), ("Tom", "He"), ("Amy", "She")]
OBJECTS = ["apples", "pens", "coins", "cards", "eggs", "books", "shells", "balls", "cups", "hats"]
STEPS = {"+": "{p} gets {x} more.", "-": "{p} loses {x}.", "*": "{p} then has {x} times as many."}
OPENING, ENDING = "{name} has {value} {objects}.", "How many {objects} now?"
MAX_FACTOR = 5  # "*" multiplies by 2..5: small operands, the task stays mental arithmetic


def _problem(rng: random.Random, steps: int, max_value: int, ops: str) -> tuple[str, str]:
    """One (question, solution); every value, operand and intermediate result lies in [0, max_value]."""
    while True:  # rare dead ends (e.g. only "*" allowed and the value too large) draw again
        name, pronoun = rng.choice(NAMES)
        objects = rng.choice(OBJECTS)
        value = rng.randint(1, max_value)
        sentences, lines = [OPENING.format(name=name, value=value, objects=objects)], []
        for _ in range(steps):
            feasible = [op for op in ops if (op == "+" and value < max_value) or (op == "-" and value > 0)
                        or (op == "*" and 0 < value and 2 * value <= max_value)]
            if not feasible:
                break
            op = rng.choice(feasible)
            if op == "+":
                x = rng.randint(1, max_value - value)
                new = value + x
            elif op == "-":
                x = rng.randint(1, value)
                new = value - x
            else:
                x = rng.randint(2, min(MAX_FACTOR, max_value // value))
                new = value * x
            sentences.append(STEPS[op].format(p=pronoun, x=x))
            lines.append(f"{value}{op}{x}={new}")
            value = new
        else:
            sentences.append(ENDING.format(objects=objects))
            return " ".join(sentences), "\n".join(lines + [f"#### {value}"])


def make_problems(n: int, seed: int, steps: int = 2, max_value: int = 99, ops: str = "+-") -> list[data.Problem]:
    """n distinct toy problems, the same for the same arguments, e.g.
        "Ann has 37 apples. She gets 48 more. She loses 19. How many apples now?"
        "37+48=85\\n85-19=66\\n#### 66"   (GSM8K's format: verify.py scores it the same way)
    Difficulty: steps (operations per problem), max_value (bound on every number), ops (from "+-*")."""
    if steps < 1 or max_value < 2 or not ops or set(ops) - set(STEPS):
        raise ValueError(f"need steps >= 1, max_value >= 2 and ops from '+-*' (got {steps}, {max_value}, {ops!r})")
    rng = random.Random(seed)
    seen, problems = set(), []
    for _ in range(50 * n + 1000):  # distinct questions; a tiny problem space runs out rather than loops
        if len(problems) == n:
            break
        question, solution = _problem(rng, steps, max_value, ops)
        if question not in seen:
            seen.add(question)
            problems.append(data.Problem(question, solution, f"toy-{len(problems)}"))
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct toy problems with steps={steps}, max_value={max_value}, "
                         f"ops={ops!r}; ask for fewer or make the task harder")
    return problems


def splits(n_train: int, n_test: int, seed: int, n_dev: int = 0, **difficulty) -> dict[str, list[data.Problem]]:
    """Disjoint train, test and dev sets (no question in two), drawn together so they cannot overlap; the
    dev set comes last, so asking for one leaves train and test as they are."""
    problems = make_problems(n_train + n_test + n_dev, seed, **difficulty)
    bounds = {"train": (0, n_train), "test": (n_train, n_train + n_test), "dev": (n_train + n_test, len(problems))}
    return {name: [data.Problem(p.question, p.answer, f"toy-{name}-{i}") for i, p in enumerate(problems[a:b])]
            for name, (a, b) in bounds.items()}


# --------------------------------------------------------------------------------------------
# Tokenizer and prompts
# --------------------------------------------------------------------------------------------

# A compact chat template: "<u>question<a>attempt</a><u>Wrong. question<a>". "</a>" closes an
# assistant turn and is the EOS token; the generation prompt is "<a>".
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{{ m['content'] }}</a>"
    "{% else %}<u>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<u>", "<a>", "</a>"]


def words() -> list[str]:
    """Every word of the toy's questions and feedback: names, pronouns, objects, verbs."""
    text = " ".join([f"{name} {pronoun}" for name, pronoun in NAMES] + OBJECTS + list(STEPS.values())
                    + [OPENING, ENDING, data.TOY_PROMPTS.oracle_feedback, data.TOY_PROMPTS.neutral_feedback])
    found = set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", text)))
    return sorted(w for w in found if len(w) > 1)  # a single letter is a character token already


def write_tokenizer(path: str | Path) -> Path:
    """The toy model's Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json): one token
    per word of the toy's text (words(), with and without a leading space) and for "####", and one per
    character for everything else, digits included, as Llama's tokenizer splits numbers into digits. Any
    text encodes (a misspelt word falls back to characters) and decodes back exactly. Words as tokens
    halve the toy's sequences against one token per character, and with them the cost of every step.
    Readable by data.Tokenizer and transformers.AutoTokenizer alike, with identical ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    names = words()
    pieces = [" " + w for w in names] + names + ["####"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars + pieces)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    longest_first = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(f"{longest_first}|[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # pieces joined back with nothing in between
    tk.add_special_tokens(SPECIAL_TOKENS)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</a>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }, indent=2))
    return path


# rise.py's defaults for the toy (`python rise.py` with no arguments); any flag still overrides them. Chosen
# on the development split (toy:dev; the evidence is in docs/toy-experiments.md): one sample at turn 1, so
# training sees the model's typical mistakes; each episode goes on from an ordinary sample and its state
# holds only the last attempt, so every later turn looks like turn 2, where data is plentiful; beta 0.25
# gives the wrong candidates (mostly repeats) almost no weight; lr 2e-4 moves a tiny model in two iterations.
PRESET = dict(train_data="toy:train", eval_data="toy:test", train_problems=1000, eval_problems=500,
              samples=4, first_samples=1, keep="first", context="last", iterations=2, feedback="oracle",
              max_new_tokens=40, beta=0.25, lr=2e-4, epochs=2, batch_size=64, micro_batch=32, rows_per_batch=512,
              amp=False, dtype="float32", out="runs/toy")


# `python rise.py --model smollm2-135m` (after `python smollm2.py`): the real model's recipe, docs/smollm2.md,
# on one-step word problems made in place (arith:train, arith:dev, arith:test); any flag still overrides it.
# Micro-batches of 4 (the same gradient as 8) halve training's activations, and 100 rows a batch make the
# evaluation three equal batches whose KV cache is 0.4x that of 256 rows: the run peaks in training, under
# 6 GB, for 2.6 more minutes (docs/smollm2.md, the recipe).
SMOLLM2_PRESET = dict(train_data="arith:train", eval_data="arith:test", train_problems=300, eval_problems=300,
                      samples=4, temperature=0.7, max_new_tokens=64, lr=3e-5, epochs=1, batch_size=16, micro_batch=4,
                      rows_per_batch=100, iterations=1, out="runs/smollm2")
PRESETS = {"toy": PRESET, "smollm2-135m": SMOLLM2_PRESET}
ARITH = dict(steps=1, max_value=20, ops="+-")  # arith:*'s problems, drawn with seed 1
ARITH_SIZES = {"train": 2000, "dev": 500, "test": 500}


def arith_problems(split: str) -> list[data.Problem]:
    """arith:train/dev/test: the one-step problems SmolLM2's recipe uses ("Max has 12 pens. He gets 2 more.
    How many pens now?"), the same as `python toy.py --problems DIR` writes."""
    if split not in ARITH_SIZES:
        raise data.DataError(f"arith:{split}: no such split; use arith:train, arith:dev or arith:test")
    return splits(ARITH_SIZES["train"], ARITH_SIZES["test"], 1, n_dev=ARITH_SIZES["dev"], **ARITH)[split]


# --------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------


N_DEV = 500  # problems of the toy's development split (toy:dev), drawn after the test split


@dataclass
class Recipe:
    """How the CPU toy's base model is made, in two phases of pre-training from scratch:
      1. arithmetic: single-turn problems with their correct solutions, until it can add and subtract;
      2. episodes of a noisy student: a fresh attempt is right with probability p_right (a wrong one
         has one arithmetic slip, carried through the later steps), and when asked to try again it
         repeats its previous attempt with probability p_repeat -- the paper's observation (§1, §7)
         that a model prompted to try again mostly hands back the same answer.
    The result answers some but far from all problems at turn 1 and gains little from later turns:
    the starting point RISE is meant to improve."""
    n_train: int = 20_000  # toy problems (splits()); RISE later trains on a subset of these
    n_test: int = 500
    seed: int = 0
    max_value: int = 30  # every number in a problem is at most this (make_problems)
    p_right: float = 0.4
    p_repeat: float = 0.6
    # attempts per episode at most: PRESET's states (context "last") show one earlier attempt at every later
    # turn, so two suffice; a run with --context all meets longer states than the base ever saw
    turns: int = 2
    arithmetic_steps: int = 700  # optimizer steps of phase 1
    episode_steps: int = 250  # optimizer steps of phase 2
    batch_size: int = 64
    micro_batch: int = 32  # the same steps in half batches: less padding, so faster per step
    lr: float = 2e-3
    dim: int = 128
    n_layers: int = 4

    def key(self) -> str:
        """Names the cached base. The toy's prompts and tokenizer are part of it: the base is trained on
        episodes written with them, so a base built with other feedback or other tokens must not be reused."""
        spec = {**dataclasses.asdict(self), "prompts": dataclasses.asdict(data.TOY_PROMPTS), "words": words()}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]

    def problems(self, split: str) -> list[data.Problem]:
        """"train", "test" or "dev": the splits the base was built with (it never saw test or dev problems;
        settings are chosen on dev, results reported on test)."""
        if split not in ("train", "test", "dev"):
            raise data.DataError(f"toy:{split}: no such toy split; use toy:train, toy:test or toy:dev")
        return splits(self.n_train, self.n_test, self.seed, n_dev=N_DEV, max_value=self.max_value)[split]


def recipe(pretrain_steps: int | None = None) -> Recipe:
    """The recipe a run uses; rise.py's --toy-pretrain-steps N shortens both phases (N each) for quick tests."""
    return Recipe() if pretrain_steps is None else Recipe(arithmetic_steps=pretrain_steps, episode_steps=pretrain_steps)


def model_args(recipe: Recipe, vocab_size: int) -> M.ModelArgs:
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


def student_messages(problem: data.Problem, recipe: Recipe, rng: random.Random) -> list[dict]:
    """The chat messages of one synthetic episode of the noisy student, under the oracle or neutral protocol."""
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
    return messages + [{"role": "assistant", "content": attempts[-1]}]


def all_turns_example(tokenizer, messages: list[dict], eos_ids):
    """One sequence that trains every assistant turn of an episode (pre-training is not RISE: every
    turn of the synthetic student is a target). Pieces come from data.training_example, whose prefixes
    agree token for token under the toy's tokenizer: every message boundary is a special token."""
    ids, mask = data.training_example(tokenizer, messages, eos_ids)
    for i, m in enumerate(messages[:-1]):
        if m["role"] == "assistant":
            sub_ids, sub_mask = data.training_example(tokenizer, messages[:i + 1], eos_ids)
            assert ids[:len(sub_ids)] == sub_ids
            mask[:len(sub_mask)] = [a | b for a, b in zip(mask, sub_mask)]
    return data.Example(ids, mask, 1.0, 0)


def cache_dir() -> Path:
    return Path(os.environ.get("RISE_CACHE", "~/.cache/rise")).expanduser()


def build_base(pretrain, recipe: Recipe | None = None, cache: Path | None = None) -> Path:
    """The toy base checkpoint: a tiny Llama trained from scratch (see Recipe), saved in Hugging Face
    format and loaded back like any checkpoint. Built once per recipe and toy prompts (Recipe.key), then cached.
    pretrain(model, examples, settings, pad_id, seed, desc) is rise.py's training loop with the given
    settings (checks.pretrain): every example at weight 1, so the loop is plain fine-tuning."""
    recipe = recipe or Recipe()
    path = (cache or cache_dir()) / f"toy-base-{recipe.key()}"
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tempfile.mkdtemp(prefix=".toy-tokenizer.", dir=path.parent))
    tokenizer = data.Tokenizer(write_tokenizer(tok_dir))
    torch.manual_seed(recipe.seed)
    args = model_args(recipe, tokenizer.vocab_size)
    args.bos_id, args.eos_ids = tokenizer.bos_id, (tokenizer.eos_id,)
    model = M.Transformer(args)
    for p in model.parameters():  # GPT-2 style init: small normal weights, unit norms
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    problems = recipe.problems("train")
    rng = random.Random(recipe.seed)
    draw = lambda n: [problems[rng.randrange(len(problems))] for _ in range(n)]  # noqa: E731
    phases = [("arithmetic", recipe.arithmetic_steps,
               lambda p: data.state_messages(p, [], data.TOY_PROMPTS) + [{"role": "assistant", "content": p.answer}]),
              ("noisy episodes", recipe.episode_steps, lambda p: student_messages(p, recipe, rng))]
    stats = {}
    for name, steps, make in phases:
        examples = [all_turns_example(tokenizer, make(p), args.eos_ids) for p in draw(steps * recipe.batch_size)]
        # float32: at this width bf16 autocast's casts cost more than its matrix units save
        settings = dict(lr=recipe.lr, epochs=1, batch_size=recipe.batch_size, micro_batch=recipe.micro_batch,
                        warmup=0.05, weight_decay=0.1, amp=False)
        stats[name] = pretrain(model, examples, settings, tokenizer.pad_id, recipe.seed, f"toy base: {name}")
    M.save(model, path, tokenizer_dir=tok_dir)
    (path / "recipe.json").write_text(json.dumps({**dataclasses.asdict(recipe), **stats}, indent=1))
    shutil.rmtree(tok_dir, ignore_errors=True)
    return path


def write_problems(folder: str | Path, sizes: dict[str, int], seed: int = 1, **difficulty) -> Path:
    """train/dev/test .jsonl files of toy problems (one {"question", "answer"} per line, GSM8K's format) for
    rise.py's --train-data and --eval-data: the SmolLM2 recipe (docs/smollm2.md) uses one-step problems."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = splits(sizes["train"], sizes["test"], seed, n_dev=sizes["dev"], **difficulty)
    for name, problems in sets.items():
        lines = [json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in problems]
        (folder / f"{name}.jsonl").write_text("".join(lines))
    return folder


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write toy problems as .jsonl files, for a real model. (The toy "
                                     "base is built by `python rise.py`, which caches it.)")
    parser.add_argument("--problems", metavar="FOLDER", required=True, help="write FOLDER/{train,dev,test}.jsonl")
    parser.add_argument("--steps", type=int, default=ARITH["steps"], help="operations per problem (with --problems)")
    parser.add_argument("--max-value", type=int, default=ARITH["max_value"], help="bound on every number")
    parser.add_argument("--ops", default=ARITH["ops"], help="operations, from '+-*' (with --problems)")
    parser.add_argument("--sizes", type=int, nargs=3, default=list(ARITH_SIZES.values()),
                        metavar=("TRAIN", "DEV", "TEST"))
    args = parser.parse_args()
    sizes = dict(zip(["train", "dev", "test"], args.sizes))
    print(write_problems(args.problems, sizes, steps=args.steps, max_value=args.max_value, ops=args.ops))
