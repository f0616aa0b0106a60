"""
data.py -- problems, prompts and the multi-turn RISE episode.

RISE (Qu et al. 2024) turns a single-turn question into a multi-turn MDP (paper §2): the state s_t at
turn t is the question followed by every earlier attempt, each followed by feedback; the action is the
next attempt. This file builds those states as chat messages and token ids, and nothing else: it never
samples (model.py), scores (verify.py) or trains (rise.py). Data flows one way, out of this file.

What is here, top to bottom:
  Problem, load_gsm8k, load_math,     question + reference answer, read from local JSON lines only
  load_problems("gsm8k:test")         (never the network); see data_dir() for where the files live
  Tokenizer, PLAIN_CHAT_TEMPLATE      a checkpoint's tokenizer.json through the `tokenizers` library, and
                                      its own Jinja chat template rendered the way transformers renders it
  Prompts, GSM8K_PROMPTS              the instruction and the two kinds of feedback: "oracle" (the
                                      official "The answer is incorrect...") and "neutral" (no
                                      correctness information, for the m1@t majority-over-turns metric)
  state_messages                      the chat messages of s_t (context "all" = the paper's state,
                                      "last" = only the latest attempt, as the official evaluation)
  render_state, continuation_tokens   s_t as token ids, and the tokens that turn a KV cache holding
                                      s_t + a sampled attempt into s_{t+1} (nothing is re-encoded)
  attempt_text, end_of_turn_id        sampled ids -> the attempt as stored; the token closing a turn
  training_example                    (ids, loss_mask) of one turn: only the last attempt is trained

Every function that turns messages into text goes through the checkpoint's own chat template
(Tokenizer.apply_chat_template), so what the model reads here is byte for byte what
transformers would give it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
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
    """A data file (problems, tokenizer) that is malformed (the message names the file and the line)."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file that is not there (the message says what to provide, or how to point rise at the data)."""


def data_dir() -> Path:
    """$RISE_DATA_DIR, else ../shared/data beside this repository (holding gsm8k/ and math/)."""
    if os.environ.get("RISE_DATA_DIR"):
        return Path(os.environ["RISE_DATA_DIR"])
    return Path(__file__).resolve().parent.parent / "shared" / "data"


def read_problems(path: str | Path, id_prefix: str) -> list[Problem]:
    """Problems of a .jsonl file, one JSON object a line, with either GSM8K's fields (question, answer)
    or MATH's (problem, solution). Blank lines are skipped; anything else malformed is an error."""
    path = Path(path)
    if path.is_dir() or path.is_symlink() and not path.exists():
        what = "a folder" if path.is_dir() else "a link that leads nowhere (or in a loop)"
        raise DataError(f"{path}: {what}, not a .jsonl file; pass the file itself")
    if not path.is_file():
        raise MissingDataError(f"{path}: no such file. Set RISE_DATA_DIR to the folder holding gsm8k/train.jsonl, "
                               f"gsm8k/test.jsonl and math/test.jsonl (now {data_dir()}), or pass the .jsonl path.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); give a .jsonl file") from None
    problems = []
    for n, line in enumerate(lines, start=1):
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
    if not problems:
        raise DataError(f"{path}: holds no problems; give a file with one JSON object (question, answer) a line")
    return problems


def load_gsm8k(split: str = "train", path: str | Path | None = None) -> list[Problem]:
    """GSM8K (7,473 train / 1,319 test); `path` overrides the .jsonl file. Ids: gsm8k-test-17."""
    return read_problems(path or data_dir() / "gsm8k" / f"{split}.jsonl", f"gsm8k-{split}")


def load_math(path: str | Path | None = None) -> list[Problem]:
    """The 1,000-problem MATH test subset (answers are full solutions with a final \\boxed{})."""
    return read_problems(path or data_dir() / "math" / "test.jsonl", "math-test")


def load_problems(spec: str) -> list[Problem]:
    """"gsm8k:train", "gsm8k:test", "math:test" or a path to a .jsonl file (the CPU toy's "toy:*" and
    SmolLM2's "arith:*" are made by toy.py; rise.py reads those)."""
    name, _, split = spec.partition(":")
    if name == "gsm8k" and split in ("train", "test"):
        return load_gsm8k(split)
    if name == "math" and split == "test":
        return load_math()
    if spec.endswith(".jsonl"):
        return read_problems(spec, Path(spec).stem)
    raise DataError(f"unknown problem set {spec!r}: use gsm8k:train, gsm8k:test, math:test, toy:train, toy:dev, "
                     "toy:test, arith:train, arith:dev, arith:test or a path to a .jsonl file")


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------

# Used when a checkpoint has no chat template (base models): plain "User:/Assistant:" turns, each
# assistant turn closed by the EOS token so a fine-tuned model learns where an attempt ends.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _token_content(token) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """A checkpoint's tokenizer.json (via `tokenizers`) + tokenizer_config.json: BOS rule, special tokens,
    chat template. A missing or unreadable tokenizer.json is a DataError naming the file."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise MissingDataError(f"{file}: no such file (a fast-tokenizer file is required)")
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise DataError(f"{file}: not a readable tokenizer ({e})") from None
        config_path = Path(path) / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {name: _token_content(self.config.get(name))
                        for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = self.tk.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None
        self.eos_id = self.tk.token_to_id(self.special["eos_token"]) if self.special["eos_token"] else None
        self.pad_id = self.tk.token_to_id(self.special["pad_token"]) if self.special["pad_token"] else self.eos_id
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        if self.chat_template is None and (Path(path) / "chat_template.jinja").is_file():
            self.chat_template = (Path(path) / "chat_template.jinja").read_text()
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. BOS is added only where tokenizer_config.json says so (add_bos_token);
        without that key, tokenizer.json's own post-processor decides, as in transformers.
        Rendered chats carry their own BOS: encode them with add_special_tokens=False."""
        if not add_special_tokens or ("add_bos_token" not in self.config and "add_eos_token" not in self.config):
            return self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.config.get("add_bos_token") and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.config.get("add_eos_token") and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}, ...] with the checkpoint's Jinja chat template, in the
        same sandboxed environment transformers uses, so the text is identical to its
        apply_chat_template(tokenize=False). Base models without a template get PLAIN_CHAT_TEMPLATE."""
        if self._template is None:
            self._template = compile_chat_template(self.chat_template or PLAIN_CHAT_TEMPLATE)
        specials = {k: v for k, v in self.special.items() if v is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **specials)


def compile_chat_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


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

# The CPU toy's prompts (toy.py) are short: every token costs the tiny model compute. The
# feedback still restates the question, as the official one does: the next attempt is then written right
# after the question rather than right after the wrong attempt, which anchors it (docs/toy-experiments.md).
TOY_PROMPTS = Prompts(instruction="{question}", oracle_feedback="Wrong. {question}",
                      neutral_feedback="Retry. {question}")



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


def stop_strings(tokenizer) -> tuple[str, ...]:
    """Where sampling stops besides the end-of-turn token: base models under PLAIN_CHAT_TEMPLATE go on to
    write the user's next turn themselves."""
    return () if tokenizer.chat_template else ("\nUser:",)


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
    content ("" for ChatML, Llama 3 and Mistral; " " for PLAIN_CHAT_TEMPLATE); close is the
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
    gap = head[len(cached):]  # "" except for templates like PLAIN_CHAT_TEMPLATE (see attempt_text)
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
# Episodes as they are stored: iterK/trajectories.jsonl and eval/*.jsonl of a run
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One sampled attempt and its score; collected ones also carry what training made of them."""
    text: str  # the attempt as stored (attempt_text: no end-of-turn token)
    answer: str | None  # verify.extract_answer
    reward: float  # verify.reward: 1 correct, 0 wrong, -1 no answer
    advantage: float | None = None  # set by rise.weigh for the collected candidates that are trained
    weight: float | None = None  # the AWR weight training uses (None: not trained)


@dataclass
class Episode:
    """One question's T-turn episode: all N candidates of each turn, and which one it continued from."""
    problem: Problem
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


def episode_record(ep: Episode) -> dict:
    """One line of a .jsonl of episodes (the format report.py reads)."""
    return {"id": ep.problem.id, "question": ep.problem.question, "reference": ep.problem.answer,
            "feedback": ep.feedback, "chosen": ep.chosen, "turns": [[asdict(c) for c in turn] for turn in ep.turns]}


def episodes_to_jsonl(episodes: list[Episode]) -> str:
    return "".join(json.dumps(episode_record(ep)) + "\n" for ep in episodes)


def episodes_from_jsonl(text: str) -> list[Episode]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Episode(Problem(r["question"], r["reference"], r["id"]), r["feedback"],
                    [[Candidate(**c) for c in turn] for turn in r["turns"]], r["chosen"]) for r in records]


@dataclass
class Example:
    """One trained (state, candidate) pair as token ids."""
    ids: list[int]
    mask: list[int]  # 1 on the trained attempt (and its end-of-turn token)
    weight: float  # its AWR weight (rise.weigh)
    turn: int


def training_examples(episodes: list[Episode], tokenizer, prompts: Prompts, eos_ids, context: str = "all"
                      ) -> list[Example]:
    """Every candidate that has a weight, as an Example: the state it was sampled from (question, the
    episode's kept earlier attempts, feedback) is context, only the candidate is trained."""
    examples = []
    for ep in episodes:
        for t, candidates in enumerate(ep.turns):
            state = state_messages(ep.problem, ep.attempts[:t], prompts, ep.feedback, context)
            for c in candidates:
                if c.weight is not None:
                    ids, mask = training_example(tokenizer, state + [{"role": "assistant", "content": c.text}], eos_ids)
                    examples.append(Example(ids, mask, c.weight, t + 1))
    return examples
