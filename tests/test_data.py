"""Tests of data.py: loading, the episode's states and their tokens, training masks."""

import json
import shutil
import string
from pathlib import Path

import pytest

import data
import toy
from data import GSM8K_PROMPTS, Problem, Prompts, Tokenizer
from model import load
from tests.conftest import write_tiny_tokenizer

PROBLEM = Problem("Tom has {3} apples and buys 4 more. How many?", "3+4=7\n#### 7", "p-0")
ATTEMPTS = ["3+4=8. The answer is \\boxed{8}.", "Tom has 3 apples.\n3 + 5 = 8\nSo \\boxed{8}",
            "3+4 = 7, so \\boxed{7}"]

# --------------------------------------------------------------------------------------------
# Tokenizers with the chat templates of real model families, built from the tiny BPE of conftest
# --------------------------------------------------------------------------------------------

# Meta-Llama-3-8B-Instruct's template, verbatim: note the `| trim` of every message
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.2's template, verbatim
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def edit_tokenizer(src: Path, dst: Path, add: list[str] = (), **config) -> Path:
    """A copy of a tokenizer dir with extra special tokens and tokenizer_config.json entries (None removes)."""
    from tokenizers import Tokenizer as HFTokenizer

    shutil.copytree(src, dst)
    tk = HFTokenizer.from_file(str(dst / "tokenizer.json"))
    tk.add_special_tokens(list(add))
    tk.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config)
    (dst / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


def write_metaspace_tokenizer(path: Path) -> Path:
    """A SentencePiece-style BPE ("▁" marks spaces, one prepended at the start of a string) like Mistral's."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = ["[INST] Solve the following math problem step by step. [/INST] The answer is 42.</s>",
            "The answer is incorrect. Please try again. Here's the question: Tom has 3 apples?"] * 50
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list(string.printable) + ["▁"])
    tk.train_from_iterator(text, trainer)
    path.mkdir(parents=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": MISTRAL_TEMPLATE}))
    return path


DIRS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, smollm2_dir) -> dict[str, tuple[Tokenizer, tuple[int, ...]]]:
    """name -> (tokenizer, eos_ids as model.load would give them); DIRS[name] is its directory."""
    root = tmp_path_factory.mktemp("tokenizers")
    write_tiny_tokenizer(root / "chatml")  # ChatML, BOS in the template, pad </s> != eos <|im_end|>
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    made = {
        "chatml": root / "chatml",
        "smollm2": smollm2_dir,  # ChatML with a default system message, pad == eos
        # a base model: no template (data.PLAIN_CHAT_TEMPLATE), pad == eos == </s>
        "plain": edit_tokenizer(root / "chatml", root / "plain", chat_template=None, eos_token="</s>",
                                pad_token="</s>"),
        "llama3": edit_tokenizer(root / "chatml", root / "llama3", add=llama3, chat_template=LLAMA3_TEMPLATE,
                                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None,
                                 add_bos_token=False),
        "mistral": write_metaspace_tokenizer(root / "mistral"),
        "toy": toy.write_tokenizer(root / "toy"),
    }
    out = {}
    DIRS.update(made)
    for name, path in made.items():
        tk = Tokenizer(path)
        eos_ids = (tk.eos_id,)
        if name == "llama3":  # Llama 3's generation_config lists <|end_of_text|> first
            eos_ids = (tk.tk.token_to_id("<|end_of_text|>"), tk.eos_id)
        out[name] = (tk, eos_ids)
    return out


# --------------------------------------------------------------------------------------------
# Loading problems
# --------------------------------------------------------------------------------------------


def test_load_gsm8k_and_math():
    train, test, math = data.load_gsm8k("train"), data.load_gsm8k("test"), data.load_math()
    assert (len(train), len(test), len(math)) == (7473, 1319, 1000)
    assert test[0].question.startswith("Janet") and test[0].answer.endswith("#### 18")
    assert test[17].id == "gsm8k-test-17" and train[0].id == "gsm8k-train-0"
    assert math[0].id == "math-test-0" and "\\boxed{1000000}" in math[0].answer
    assert len(data.load_problems("gsm8k:test")) == 1319 and len(data.load_problems("math:test")) == 1000
    assert len({p.id for p in train}) == len(train)


def test_data_dir_env_override_and_jsonl_path(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    lines = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    monkeypatch.setenv("RISE_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.load_gsm8k("test") == [Problem("1+1?", "#### 2", "gsm8k-test-0"), Problem("2+2?", "#### 4", "gsm8k-test-1")]
    mixed = tmp_path / "mine.jsonl"  # a path: either field layout, line by line
    mixed.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"problem": "x?", "solution": "\\boxed{1}"}) + "\n")
    assert [p.answer for p in data.load_problems(str(mixed))] == ["#### 2", "\\boxed{1}"]
    with pytest.raises(data.MissingDataError, match="RISE_DATA_DIR"):
        data.load_math()


def test_missing_file_error(tmp_path):
    path = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        data.load_gsm8k("train", path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value) and "RISE_DATA_DIR" in str(e.value)
    with pytest.raises(ValueError, match="unknown problem set"):
        data.load_problems("gsm8k:dev")


@pytest.mark.parametrize("bad_line, why", [('{"question": "q3", "answer": ', "not valid JSON"),
                                           ('{"question": "q3"}', "'answer'"),
                                           ('{"question": "q3", "answer": 18}', "not a string"),
                                           ('["q3", "18"]', "JSON object")])
def test_malformed_line_error(tmp_path, bad_line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": "#### 2"}\n' + bad_line + "\n")
    with pytest.raises(data.DataError) as e:
        data.read_problems(path, "bad")
    assert str(path) in str(e.value) and "line 3" in str(e.value) and why in str(e.value)


# --------------------------------------------------------------------------------------------
# States as messages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feedback", ["oracle", "neutral"])
@pytest.mark.parametrize("context", ["all", "last"])
def test_state_messages(feedback, context):
    q = PROBLEM.question
    first = {"role": "user", "content": "Solve the following math problem step by step. Put your final answer "
                                        "in \\boxed{}.\n\n" + q}  # braces in the question survive
    reply = {"role": "user", "content": ("The answer is incorrect. Please try again. Here's the question: " + q)
             if feedback == "oracle" else ("Review your previous answer and try again. Here's the question: " + q)}
    a1, a2 = ({"role": "assistant", "content": a} for a in ATTEMPTS[:2])
    expected = {1: [first], 2: [first, a1, reply], 3: [first, a1, reply, a2, reply] if context == "all"
                else [first, a2, reply]}
    for t in (1, 2, 3):
        assert data.state_messages(PROBLEM, ATTEMPTS[:t - 1], GSM8K_PROMPTS, feedback, context) == expected[t]
    system = Prompts("Q: {question}", "No.", "Again.", system="Be brief.")
    assert data.state_messages(PROBLEM, ATTEMPTS[:1], system, feedback, context) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: " + q},
        {"role": "assistant", "content": ATTEMPTS[0]}, {"role": "user", "content": "No." if feedback == "oracle"
                                                        else "Again."}]
    with pytest.raises(ValueError):
        data.state_messages(PROBLEM, [], feedback="none")


def test_toy_state_is_short(tokenizers):
    tk, _ = tokenizers["toy"]
    problem = toy.make_problems(1, seed=0)[0]
    text = tk.apply_chat_template(data.state_messages(problem, ["1+1=2\n#### 2"], data.TOY_PROMPTS))
    assert text == f"<u>{problem.question}<a>1+1=2\n#### 2</a><u>Wrong. {problem.question}<a>"
    neutral = data.state_messages(problem, ["x"], data.TOY_PROMPTS, feedback="neutral")
    assert neutral[-1]["content"] == f"Retry. {problem.question}"


# --------------------------------------------------------------------------------------------
# States as tokens: identical to transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "smollm2", "toy"])
def test_render_matches_transformers(tokenizers, name):
    from transformers import AutoTokenizer

    tk, _ = tokenizers[name]
    reference = AutoTokenizer.from_pretrained(DIRS[name])
    for feedback in ("oracle", "neutral"):
        for t in (1, 2, 3):
            messages = data.state_messages(PROBLEM, ATTEMPTS[:t - 1], feedback=feedback)
            text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
            assert tk.apply_chat_template(messages) == text
            assert data.render_state(tk, messages) == list(ids)


def test_render_tiny_checkpoint(tiny_checkpoints):
    from transformers import AutoTokenizer

    model, tk = load(tiny_checkpoints["llama2_mha"]), Tokenizer(tiny_checkpoints["llama2_mha"])
    reference = AutoTokenizer.from_pretrained(tiny_checkpoints["llama2_mha"])
    messages = data.state_messages(PROBLEM, ATTEMPTS[:2])
    ids = data.render_state(tk, messages)
    assert ids == list(reference.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert ids.count(tk.bos_id) == 1 and ids[0] == tk.bos_id  # the template's BOS, not a second one
    assert data.end_of_turn_id(tk, model.args.eos_ids) == tk.tk.token_to_id("<|im_end|>")


# --------------------------------------------------------------------------------------------
# KV-cache continuation: s_t + sampled attempt + continuation == s_{t+1}
# --------------------------------------------------------------------------------------------

GAP = {"plain": " "}  # the plain template writes "Assistant: x" after a prompt ending in "Assistant:"


def sampled_ids(tk, state_text: str, sample: str) -> list[int]:
    """The ids a model would have sampled for `sample` after the state: its tokenization in context."""
    before = tk.encode(state_text, add_special_tokens=False)
    after = tk.encode(state_text + sample, add_special_tokens=False)
    assert after[:len(before)] == before, "test attempt merges with the prompt; choose another"
    return after[len(before):]


@pytest.mark.parametrize("name", ["chatml", "smollm2", "plain", "llama3", "mistral", "toy"])
@pytest.mark.parametrize("closed", [True, False], ids=["ends-with-eos", "hit-max-tokens"])
@pytest.mark.parametrize("feedback", ["oracle", "neutral"])
def test_continuation_rebuilds_next_state(tokenizers, name, closed, feedback):
    tk, eos_ids = tokenizers[name]
    prompts = data.TOY_PROMPTS if name == "toy" else GSM8K_PROMPTS
    problem = toy.make_problems(1, seed=3)[0] if name == "toy" else PROBLEM
    attempts = ["37+4=41\n#### 41", "3-1=2\n#### 2", "9+9=18\n#### 18"] if name == "toy" else ATTEMPTS
    end = data.end_of_turn_id(tk, eos_ids)
    cache = data.render_state(tk, data.state_messages(problem, [], prompts, feedback))
    for t in range(3):
        state_text = tk.decode(cache, skip_special_tokens=False)
        sample = sampled_ids(tk, state_text, GAP.get(name, "") + attempts[t]) + ([end] if closed else [])
        assert data.attempt_text(tk, sample, eos_ids) == attempts[t]
        cache += sample + data.continuation_tokens(tk, problem, attempts[:t + 1], sample, prompts, feedback, eos_ids)
        fresh = data.state_messages(problem, attempts[:t + 1], prompts, feedback)
        assert tk.decode(cache, skip_special_tokens=False) == tk.apply_chat_template(fresh)
        if name in ("chatml", "smollm2", "toy"):  # here even the ids agree with encoding s_{t+1} afresh
            assert cache == data.render_state(tk, fresh)


def test_continuation_without_sample_and_other_eos(tokenizers):
    tk, eos_ids = tokenizers["chatml"]
    prefix = data.render_state(tk, data.state_messages(PROBLEM, ATTEMPTS[:1]))
    # attempt_ids=None: a teacher wrote the attempt, the cache holds only s_t
    ids = prefix + data.continuation_tokens(tk, PROBLEM, ATTEMPTS[:2], None, eos_ids=eos_ids)
    assert tk.decode(ids, skip_special_tokens=False) == tk.apply_chat_template(data.state_messages(PROBLEM, ATTEMPTS[:2]))
    # Llama 3 closing its turn with <|end_of_text|> instead of the template's <|eot_id|>: no second marker
    tk, eos_ids = tokenizers["llama3"]
    prefix = data.render_state(tk, data.state_messages(PROBLEM, []))
    sample = tk.encode(ATTEMPTS[0], add_special_tokens=False) + [eos_ids[0]]
    text = tk.decode(prefix + sample + data.continuation_tokens(tk, PROBLEM, ATTEMPTS[:1], sample, eos_ids=eos_ids),
                     skip_special_tokens=False)
    fresh = tk.apply_chat_template(data.state_messages(PROBLEM, ATTEMPTS[:1]))
    assert text == fresh.replace(ATTEMPTS[0] + "<|eot_id|>", ATTEMPTS[0] + "<|end_of_text|>")
    with pytest.raises(ValueError, match="context='all'"):
        data.continuation_tokens(tk, PROBLEM, ATTEMPTS[:1], sample, eos_ids=eos_ids, context="last")


# --------------------------------------------------------------------------------------------
# Training examples: the loss mask covers exactly the last attempt and its end-of-turn token
# --------------------------------------------------------------------------------------------

MARKER = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "plain": "</s>", "llama3": "<|eot_id|>",
          "mistral": "</s>", "toy": "</a>"}


@pytest.mark.parametrize("name", ["chatml", "smollm2", "plain", "llama3", "mistral", "toy"])
def test_training_example_masks(tokenizers, name):
    tk, eos_ids = tokenizers[name]
    if name in ("smollm2", "plain"):
        assert tk.pad_id == tk.eos_id  # the case where searching for EOS/pad would break the mask
    end = data.end_of_turn_id(tk, eos_ids)
    assert tk.decode([end], skip_special_tokens=False) == MARKER[name]
    for t in (1, 2, 3):
        messages = data.state_messages(PROBLEM, ATTEMPTS[:t - 1]) + [{"role": "assistant", "content": ATTEMPTS[t - 1]}]
        ids, mask = data.training_example(tk, messages, eos_ids)
        gap = GAP.get(name, "")
        assert len(ids) == len(mask) and set(mask) == {0, 1}
        assert sum(mask) == len(tk.encode(gap + ATTEMPTS[t - 1], add_special_tokens=False)) + 1
        assert mask == sorted(mask) and mask[-1] == 1 and ids[-1] == end  # one trained span, at the end
        trained = tk.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        assert trained == gap + ATTEMPTS[t - 1] + MARKER[name]
        # the context is exactly the state the attempt was sampled from, and the whole is the rendered turn
        assert ids[:mask.index(1)] == data.render_state(tk, messages[:-1])
        whole = tk.decode(ids, skip_special_tokens=False)
        if name == "mistral":  # SentencePiece encodes an attempt on its own as "▁3+4..." (as a model samples
            whole = whole.replace("[/INST] ", "[/INST]")  # it after "[/INST]"), so it reads " 3+4" in context
        assert tk.apply_chat_template(messages, add_generation_prompt=False).startswith(whole)
    with pytest.raises(ValueError):
        data.training_example(tk, data.state_messages(PROBLEM, ATTEMPTS[:1]), eos_ids)
