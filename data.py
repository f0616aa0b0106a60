"""
data.py -- problems, prompts and the multi-turn RISE episode; the synthetic toy task.

RISE (Qu et al. 2024) turns a single-turn question into a multi-turn MDP (paper §2): the state s_t at
turn t is the question followed by every earlier attempt, each followed by feedback; the action is the
next attempt. This file builds those states as chat messages and token ids, and nothing else: it never
samples (model.py), scores (verify.py) or trains (rise.py). Data flows one way, out of this file.

What is here, top to bottom:
  Problem, load_gsm8k, load_math,     question + reference answer, read from local JSON lines only
  load_problems("gsm8k:test")         (never the network); see data_dir() for where the files live
  Prompts, GSM8K_PROMPTS,             the instruction and the two kinds of feedback: "oracle" (the
  TOY_PROMPTS                         official "The answer is incorrect...") and "neutral" (no
                                      correctness information, for the m1@t majority-over-turns metric)
  state_messages                      the chat messages of s_t (context "all" = the paper's state,
                                      "last" = only the latest attempt, as the official evaluation)
  render_state, continuation_tokens   s_t as token ids, and the tokens that turn a KV cache holding
                                      s_t + a sampled attempt into s_{t+1} (nothing is re-encoded)
  attempt_text, end_of_turn_id        sampled ids -> the attempt as stored; the token closing a turn
  training_example                    (ids, loss_mask) of one turn: only the last attempt is trained
  make_toy_problems, toy_splits,      the CPU default task: short multi-step arithmetic word problems
  write_toy_tokenizer                 with GSM8K-style solutions, and a character-level tokenizer

Every function that turns messages into text goes through the checkpoint's own chat template
(model.Tokenizer.apply_chat_template), so what the model reads here is byte for byte what
transformers would give it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    question: str
    answer: str  # the reference: a full solution ending in "#### N" (GSM8K, toy), a MATH solution, or a bare answer
    id: str


class DataError(ValueError):
    """A data file that is malformed (the message names the file and the line)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file that is not there (the message says how to point rise at the data)."""


def data_dir() -> Path:
    """$RISE_DATA_DIR, else ../shared/data beside this repository (holding gsm8k/ and math/)."""
    if os.environ.get("RISE_DATA_DIR"):
        return Path(os.environ["RISE_DATA_DIR"])
    return Path(__file__).resolve().parent.parent / "shared" / "data"


def read_problems(path: str | Path, id_prefix: str) -> list[Problem]:
    """Problems of a .jsonl file, one JSON object a line, with either GSM8K's fields (question, answer)
    or MATH's (problem, solution). Blank lines are skipped; anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: no such file. Set RISE_DATA_DIR to the folder holding gsm8k/train.jsonl, "
                               f"gsm8k/test.jsonl and math/test.jsonl (now {data_dir()}), or pass the .jsonl path.")
    problems = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}")
            keys = ("question", "answer") if "question" in record else ("problem", "solution")
            for key in keys:
                if not isinstance(record.get(key), str):
                    raise DataError(f"{path}, line {n}: field {key!r} is missing or not a string "
                                    "(expected question/answer or problem/solution)")
            problems.append(Problem(record[keys[0]], record[keys[1]], f"{id_prefix}-{len(problems)}"))
    return problems


def load_gsm8k(split: str = "train", path: str | Path | None = None) -> list[Problem]:
    """GSM8K (7,473 train / 1,319 test); `path` overrides the .jsonl file. Ids: gsm8k-test-17."""
    return read_problems(path or data_dir() / "gsm8k" / f"{split}.jsonl", f"gsm8k-{split}")


def load_math(path: str | Path | None = None) -> list[Problem]:
    """The 1,000-problem MATH test subset (answers are full solutions with a final \\boxed{})."""
    return read_problems(path or data_dir() / "math" / "test.jsonl", "math-test")


def load_problems(spec: str, **toy) -> list[Problem]:
    """"gsm8k:train", "gsm8k:test", "math:test", "toy:train", "toy:test" or a path to a .jsonl file.
    `toy` passes toy_splits' sizes, seed and difficulty knobs through (defaults: TOY_DEFAULTS)."""
    name, _, split = spec.partition(":")
    if name == "gsm8k" and split in ("train", "test"):
        return load_gsm8k(split)
    if name == "math" and split == "test":
        return load_math()
    if name == "toy" and split in ("train", "test"):
        train, test = toy_splits(**{**TOY_DEFAULTS, **toy})
        return train if split == "train" else test
    if spec.endswith(".jsonl"):
        return read_problems(spec, Path(spec).stem)
    raise ValueError(f"unknown problem set {spec!r}: use gsm8k:train, gsm8k:test, math:test, toy:train, "
                     "toy:test or a path to a .jsonl file")


# --------------------------------------------------------------------------------------------
# Prompts and feedback
# --------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    instruction: str  # first user turn; "{question}" marks where the question goes
    oracle_feedback: str  # after a wrong attempt, when an oracle says so (the episode stops at a right one)
    neutral_feedback: str  # no correctness information: the m1@t (majority over turns) evaluation
    system: str | None = None  # an optional system message before the first turn


def fill(template: str, question: str) -> str:
    # not str.format: the instruction itself holds braces ("\boxed{}")
    return template.replace("{question}", question)


# The official RISE code's convention: the final answer in \boxed{} (verify.py reads it), and after a wrong
# attempt its exact feedback, which repeats the question.
GSM8K_PROMPTS = Prompts(
    instruction="Solve the following math problem step by step. Put your final answer in \\boxed{}.\n\n{question}",
    oracle_feedback="The answer is incorrect. Please try again. Here's the question: {question}",
    neutral_feedback="Review your previous answer and try again. Here's the question: {question}",
)

# The toy model reads characters: every character of a prompt costs compute, so these are as short as can be.
TOY_PROMPTS = Prompts(instruction="{question}", oracle_feedback="Wrong.", neutral_feedback="Retry.")


# --------------------------------------------------------------------------------------------
# The episode: states s_t as messages and tokens (paper §2)
# --------------------------------------------------------------------------------------------


def state_messages(problem: Problem, attempts: list[str], prompts: Prompts = GSM8K_PROMPTS,
                   feedback: str = "oracle", context: str = "all") -> list[dict]:
    """The chat messages of state s_t, read by the model to write attempt t = len(attempts) + 1.

    Turn 1 is [system] + user(instruction with the question); each earlier attempt adds
    assistant(attempt) + user(feedback).
    feedback: "oracle" says the attempt was wrong. It is only true if the caller stops the episode at the
              first correct attempt, as the oracle does (p1@t); collection and p1@t evaluation must do so.
              "neutral" says nothing about correctness and never stops the episode (m1@t).
    context:  "all" keeps every earlier attempt (the paper's state s_t); "last" keeps only the most recent
              attempt and its feedback after the question (what the official code evaluated with).
    """
    if feedback not in ("oracle", "neutral"):
        raise ValueError(f"feedback must be 'oracle' or 'neutral', not {feedback!r}")
    if context not in ("all", "last"):
        raise ValueError(f"context must be 'all' or 'last', not {context!r}")
    reply = fill(prompts.oracle_feedback if feedback == "oracle" else prompts.neutral_feedback, problem.question)
    messages = [{"role": "system", "content": prompts.system}] if prompts.system is not None else []
    messages.append({"role": "user", "content": fill(prompts.instruction, problem.question)})
    for attempt in (attempts if context == "all" else attempts[-1:]):
        messages += [{"role": "assistant", "content": attempt}, {"role": "user", "content": reply}]
    return messages


def render_state(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a state, ending in the generation prompt. Templates write their own BOS, so the
    rendered text is encoded without adding special tokens (else BOS would appear twice)."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


# Stands in for an attempt so the template's text around an assistant turn can be read off by splitting.
_SLOT = "@@RISE_ATTEMPT@@"


def assistant_turn_layout(tokenizer, messages: list[dict]) -> tuple[str, str, str]:
    """How the template writes one more assistant turn after `messages`: (prompt, gap, close) with
    render(messages + [assistant(x)]) == prompt + gap + x + close, where prompt is render(messages) with
    the generation prompt. gap is what the template puts between the generation prompt and the
    content ("" for ChatML, Llama 3 and Mistral; " " for model.PLAIN_CHAT_TEMPLATE); close is the
    end-of-turn marker and anything up to the next turn."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    head, _, close = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _SLOT}],
                                                   add_generation_prompt=False).partition(_SLOT)
    if not head.startswith(prompt):
        raise ValueError("this chat template does not render a conversation as an extension of its earlier "
                         f"turns (the generation prompt {prompt[-40:]!r} is not followed by the next "
                         f"assistant turn {head[-40:]!r}); states cannot be built turn by turn with it")
    return prompt, head[len(prompt):], close


def end_of_turn_id(tokenizer, eos_ids=None) -> int:
    """The token that closes an assistant turn in this template: the first of eos_ids written after the
    content (ChatML <|im_end|>, Llama 3 <|eot_id|>, Mistral </s>, plain template: eos_token), else EOS."""
    eos_ids = set(eos_ids or ()) | ({tokenizer.eos_id} - {None})
    _, _, close = assistant_turn_layout(tokenizer, [{"role": "user", "content": "1+1?"}])
    return next((i for i in tokenizer.encode(close, add_special_tokens=False) if i in eos_ids), tokenizer.eos_id)


def attempt_text(tokenizer, attempt_ids: list[int], eos_ids=None) -> str:
    """The attempt as the episode stores it: the sampled text without its end-of-turn token and without
    the template's gap (the plain template renders "Assistant: x" after a prompt ending in "Assistant:",
    so a model writes " x"; storing "x" keeps later renders identical to the KV cache)."""
    eos_ids = set(eos_ids or ()) | {tokenizer.eos_id}
    if attempt_ids and attempt_ids[-1] in eos_ids:
        attempt_ids = attempt_ids[:-1]
    text = tokenizer.decode(attempt_ids, skip_special_tokens=True)
    _, gap, _ = assistant_turn_layout(tokenizer, [{"role": "user", "content": "1+1?"}])
    return text[len(gap):] if gap and text.startswith(gap) else text


def encode_after_special(tokenizer, text: str) -> list[int]:
    """Ids of `text` as they are when it follows a special token: a continuation follows the sample's
    end-of-turn token (or starts with the template's own). Encoding it alone would differ for
    SentencePiece-style tokenizers (Llama 2, Mistral), which put a "▁" (a space) before the start of a
    string but not after a special token; so encode it behind one (EOS) and drop that."""
    anchor = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if anchor is None:
        return tokenizer.encode(text, add_special_tokens=False)
    ids = tokenizer.encode(tokenizer.decode([anchor], skip_special_tokens=False) + text, add_special_tokens=False)
    assert ids[0] == anchor, "the anchor token was merged with the text"
    return ids[1:]


def continuation_tokens(tokenizer, problem: Problem, attempts: list[str], attempt_ids: list[int] | None,
                        prompts: Prompts = GSM8K_PROMPTS, feedback: str = "oracle", eos_ids=None,
                        context: str = "all") -> list[int]:
    """The tokens to append to a conversation holding s_t + the sampled attempt so that it becomes s_{t+1}.

    attempts:    every attempt so far, the one just sampled last (stored as attempt_text() returns it).
    attempt_ids: the sampled tokens of that attempt, already in the KV cache. If they end with an
                 end-of-turn token (one of eos_ids: the model closed its turn), the template's own marker
                 is not written again; if not (the sample hit max_new_tokens), it is. None: the cache
                 holds only s_t (e.g. a teacher wrote the attempt) and the attempt's tokens are included.
    Returns: [end-of-turn marker] + separator + user(feedback) + the next generation prompt, as ids. Decoded
    after the cache, the text equals a fresh render of s_{t+1} whenever the template writes the attempt
    verbatim (Llama 3's template trims it: an attempt with surrounding whitespace differs there).
    Only for context="all": with "last" the state drops earlier turns, so it is not an extension of s_t.
    """
    if context != "all":
        raise ValueError("continuation_tokens needs context='all': with 'last' s_{t+1} is not an extension of s_t")
    if not attempts:
        raise ValueError("attempts must end with the attempt just sampled")
    eos_ids = tuple(eos_ids or (tokenizer.eos_id,))
    cached = tokenizer.apply_chat_template(state_messages(problem, attempts[:-1], prompts, feedback))
    head, _, after = tokenizer.apply_chat_template(
        state_messages(problem, attempts[:-1] + [_SLOT], prompts, feedback)).partition(_SLOT)
    if not head.startswith(cached):
        raise ValueError("this chat template does not render s_{t+1} as an extension of s_t; "
                         "render each state afresh instead of continuing the cache")
    gap = head[len(cached):]  # "" except for templates like model.PLAIN_CHAT_TEMPLATE (see attempt_text)
    # `after` is everything the template writes after the attempt: end of turn, feedback, next prompt
    if attempt_ids is None:
        return tokenizer.encode(gap + attempts[-1] + after, add_special_tokens=False)
    if attempt_ids and attempt_ids[-1] in eos_ids:
        # the sample closed its own turn: drop the template's marker (whichever end-of-turn token it is)
        for i in eos_ids:
            marker = tokenizer.decode([i], skip_special_tokens=False)
            if marker and after.startswith(marker):
                after = after[len(marker):]
                break
    return encode_after_special(tokenizer, after)


def training_example(tokenizer, messages: list[dict], eos_ids=None) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for a conversation ending in the assistant turn being trained.

    ids = render(messages[:-1]) with the generation prompt + the attempt's tokens + its end-of-turn token,
    put together from pieces of known length: pad and EOS are often the same id, so searching for them
    would mask the end of the turn and the model would never learn to stop. loss_mask is 1 exactly on the
    attempt and its end-of-turn token. As in the official code, each prefix of an episode that ends in an
    assistant turn is one example, and only that last turn is trained (earlier attempts are context).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("training_example needs messages ending in the assistant turn to train")
    prompt, gap, _ = assistant_turn_layout(tokenizer, messages[:-1])
    context = tokenizer.encode(prompt, add_special_tokens=False)
    attempt = tokenizer.encode(gap + messages[-1]["content"], add_special_tokens=False)
    attempt.append(end_of_turn_id(tokenizer, eos_ids))
    return context + attempt, [0] * len(context) + [1] * len(attempt)


# --------------------------------------------------------------------------------------------
# The toy task: multi-step arithmetic word problems (the CPU default)
# --------------------------------------------------------------------------------------------

# Small lists keep questions short and their vocabulary easy for a tiny character-level model.
TOY_NAMES = [("Ann", "She"), ("Bob", "He"), ("Cal", "He"), ("Dee", "She"), ("Eve", "She"), ("Max", "He"),
             ("Sam", "He"), ("Zoe", "She"), ("Tom", "He"), ("Amy", "She")]
TOY_OBJECTS = ["apples", "pens", "coins", "cards", "eggs", "books", "shells", "balls", "cups", "hats"]
TOY_STEPS = {"+": "{p} gets {x} more.", "-": "{p} loses {x}.", "*": "{p} then has {x} times as many."}
TOY_MAX_FACTOR = 5  # "*" multiplies by 2..5: small operands, the task stays mental arithmetic
TOY_DEFAULTS = dict(n_train=20_000, n_test=500, seed=0)


def _toy_problem(rng: random.Random, steps: int, max_value: int, ops: str) -> tuple[str, str]:
    """One (question, solution); every value, operand and intermediate result lies in [0, max_value]."""
    while True:  # rare dead ends (e.g. only "*" allowed and the value too large) draw again
        name, pronoun = rng.choice(TOY_NAMES)
        objects = rng.choice(TOY_OBJECTS)
        value = rng.randint(1, max_value)
        sentences, lines = [f"{name} has {value} {objects}."], []
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
                x = rng.randint(2, min(TOY_MAX_FACTOR, max_value // value))
                new = value * x
            sentences.append(TOY_STEPS[op].format(p=pronoun, x=x))
            lines.append(f"{value}{op}{x}={new}")
            value = new
        else:
            sentences.append(f"How many {objects} now?")
            return " ".join(sentences), "\n".join(lines + [f"#### {value}"])


def make_toy_problems(n: int, seed: int, steps: int = 2, max_value: int = 99, ops: str = "+-") -> list[Problem]:
    """n distinct toy problems, the same for the same arguments, e.g.
        "Ann has 37 apples. She gets 48 more. She loses 19. How many apples now?"
        "37+48=85\\n85-19=66\\n#### 66"   (GSM8K's format: verify.py scores it the same way)
    Difficulty: steps (operations per problem), max_value (bound on every number), ops (from "+-*")."""
    if steps < 1 or max_value < 2 or not ops or set(ops) - set(TOY_STEPS):
        raise ValueError(f"need steps >= 1, max_value >= 2 and ops from '+-*' (got {steps}, {max_value}, {ops!r})")
    rng = random.Random(seed)
    seen, problems = set(), []
    for _ in range(50 * n + 1000):  # distinct questions; a tiny problem space runs out rather than loops
        if len(problems) == n:
            break
        question, solution = _toy_problem(rng, steps, max_value, ops)
        if question not in seen:
            seen.add(question)
            problems.append(Problem(question, solution, f"toy-{len(problems)}"))
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct toy problems with steps={steps}, max_value={max_value}, "
                         f"ops={ops!r}; ask for fewer or make the task harder")
    return problems


def toy_splits(n_train: int, n_test: int, seed: int, **difficulty) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and test sets (no question in both), drawn together so they cannot overlap."""
    problems = make_toy_problems(n_train + n_test, seed, **difficulty)
    train = [Problem(p.question, p.answer, f"toy-train-{i}") for i, p in enumerate(problems[:n_train])]
    test = [Problem(p.question, p.answer, f"toy-test-{i}") for i, p in enumerate(problems[n_train:])]
    return train, test


# A compact chat template: "<u>question<a>attempt</a><u>Wrong.<a>". "</a>" closes an
# assistant turn and is the EOS token; the generation prompt is "<a>".
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{{ m['content'] }}</a>"
    "{% else %}<u>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)
TOY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<u>", "<a>", "</a>"]


def write_toy_tokenizer(path: str | Path) -> Path:
    """A character-level Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) for the
    toy model: one token per character of printable ASCII and newline, plus the special tokens above.
    Readable by model.Tokenizer and transformers.AutoTokenizer alike, with identical ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(TOY_SPECIAL_TOKENS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character alone
    tk.decoder = decoders.Fuse()  # and joined back with nothing in between
    tk.add_special_tokens(TOY_SPECIAL_TOKENS)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</a>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": TOY_CHAT_TEMPLATE, "model_max_length": 4096,
    }, indent=2))
    return path
