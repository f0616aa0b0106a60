"""toy.py: the CPU toy's task generator, its tokenizer (against transformers) and its held-out split."""

import re

import pytest

import checks
import data
import rise
import toy
import verify
from data import Problem

# --------------------------------------------------------------------------------------------
# The toy task and its tokenizer
# --------------------------------------------------------------------------------------------

STEP = re.compile(r"^(\d+)([-+*])(\d+)=(\d+)$")


def check_toy(problem: Problem, steps: int, max_value: int, ops: str):
    *lines, final = problem.answer.split("\n")
    assert len(lines) == steps and final.startswith("#### ")
    value = int(problem.question.split(" has ")[1].split()[0])
    numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
    assert numbers[0] == value and all(0 <= n <= max_value for n in numbers)
    for line, operand in zip(lines, numbers[1:]):
        a, op, b, c = STEP.match(line).groups()
        assert int(a) == value and int(b) == operand and op in ops  # the steps follow the question
        value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
        assert int(c) == value and 0 <= value <= max_value  # the arithmetic is right, never negative
    assert final == f"#### {value}"


def test_toy_problems():
    problems = toy.make_problems(300, seed=7)
    assert problems == toy.make_problems(300, seed=7)  # deterministic under a seed
    assert [p.question for p in problems] != [p.question for p in toy.make_problems(300, seed=8)]
    assert len({p.question for p in problems}) == 300
    for p in problems:
        check_toy(p, 2, 99, "+-")
        assert 40 <= len(p.question) <= 90 and p.question.isascii() and p.answer.isascii()
    for steps, max_value, ops in [(1, 20, "+"), (4, 50, "+-"), (3, 99, "+-*"), (2, 9, "-")]:
        for p in toy.make_problems(100, seed=1, steps=steps, max_value=max_value, ops=ops):
            check_toy(p, steps, max_value, ops)
    assert any("*" in p.answer for p in toy.make_problems(50, seed=1, ops="+-*"))
    with pytest.raises(ValueError, match="distinct"):
        toy.make_problems(200, seed=0, steps=1, max_value=2, ops="+")  # only 100 such questions


def test_toy_solutions_verify():
    verify = pytest.importorskip("verify")
    for p in toy.make_problems(100, seed=2, steps=3, ops="+-*"):
        final = p.answer.rsplit("#### ", 1)[1]
        assert verify.extract_answer(p.answer) == final and verify.is_correct(p.answer, p.answer)
        assert verify.is_correct(f"blah\n#### {final}", p.answer)
        assert not verify.is_correct(f"#### {int(final) + 1}", p.answer)


def test_toy_splits_are_disjoint():
    split = toy.splits(2000, 200, seed=5, n_dev=100, steps=3)
    train, test, dev = split["train"], split["test"], split["dev"]
    assert (len(train), len(test)) == (2000, 200)
    assert not {p.question for p in train} & {p.question for p in test}
    assert len(dev) == 100 and not {p.question for p in dev} & {p.question for p in train + test}
    assert dev[0].id == "toy-dev-0" and toy.splits(2000, 200, seed=5, steps=3)["test"] == test  # dev changes nothing
    assert train[0].id == "toy-train-0" and test[199].id == "toy-test-199"
    assert split == toy.splits(2000, 200, seed=5, n_dev=100, steps=3)
    assert all(len(p.answer.split("\n")) == 4 for p in test)
    # rise.py's "toy:test" is the held-out split the toy base was built with
    assert checks.load_problems("toy:test", None, rise.Config()) == toy.splits(20_000, 500, seed=0, max_value=30)["test"]
    assert checks.load_problems("toy:dev", 50, rise.Config()) == toy.splits(20_000, 500, 0, 500, max_value=30)["dev"][:50]


def test_base_cache_key_changes_with_the_recipe_and_the_toy_prompts(monkeypatch):
    """A cached base is reused only for the recipe, the prompts and the tokenizer it was built with: the
    feedback and the words are part of the base's training episodes, so a base built with other prompts or
    other tokens must never be reused (docs/toy-experiments.md)."""
    key = toy.Recipe().key()
    assert toy.Recipe().key() == key
    assert toy.Recipe(p_repeat=0.5).key() != key
    monkeypatch.setattr(toy, "OBJECTS", toy.OBJECTS + ["kites"])  # another word: another tokenizer
    assert toy.Recipe().key() != key
    monkeypatch.setattr(toy, "OBJECTS", toy.OBJECTS[:-1])
    assert toy.Recipe().key() == key
    bare = data.Prompts(instruction="{question}", oracle_feedback="Wrong.", neutral_feedback="Retry.")
    monkeypatch.setattr(data, "TOY_PROMPTS", bare)
    assert toy.Recipe().key() != key


def test_toy_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tk = data.Tokenizer(toy.write_tokenizer(tmp_path))
    reference = AutoTokenizer.from_pretrained(tmp_path)
    texts = [p.question + "\n" + p.answer for p in toy.make_problems(50, seed=0, ops="+-*")]
    texts += ["".join(map(chr, range(32, 127))) + "\n", data.TOY_PROMPTS.oracle_feedback, data.TOY_PROMPTS.neutral_feedback,
              "  two  spaces \n\n", "Annie hash more apples####7"]
    for text in texts:
        ids = tk.encode(text)
        assert tk.decode(ids) == text and reference.decode(ids) == text  # any text, no BOS, no unknown token
        assert reference(text)["input_ids"] == ids and tk.tk.token_to_id("<unk>") not in ids
    # the toy's words are one token each, with their leading space; digits one token each
    question = "Ann has 37 apples. She loses 19. How many apples now?"
    text = question + "\n37-19=18\n#### 18"
    pieces = [tk.decode([i]) for i in tk.encode(text)]
    assert pieces[:8] == ["Ann", " has", " ", "3", "7", " apples", ".", " She"]
    assert pieces[-5:] == ["\n", "####", " ", "1", "8"]
    assert len(pieces) < len(text) / 2
    problem = toy.make_problems(1, seed=0)[0]
    messages = data.state_messages(problem, ["1+1=2\n#### 2"], data.TOY_PROMPTS)
    assert reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tk.apply_chat_template(messages)
    assert tk.eos_id == tk.tk.token_to_id("</a>") and tk.pad_id != tk.eos_id
    assert tk.vocab_size == len(toy.SPECIAL_TOKENS) + 96 + 2 * len(toy.words()) + 1


def test_write_problems_gives_disjoint_jsonl_splits_that_rise_reads(tmp_path):
    folder = toy.write_problems(tmp_path, {"train": 30, "dev": 10, "test": 20}, steps=1, max_value=20)
    sets = {name: data.load_problems(str(folder / f"{name}.jsonl")) for name in ("train", "dev", "test")}
    assert {name: len(problems) for name, problems in sets.items()} == {"train": 30, "dev": 10, "test": 20}
    questions = [{p.question for p in problems} for problems in sets.values()]
    assert sum(map(len, questions)) == len(set.union(*questions))  # no question in two splits
    for p in sets["test"]:  # one step, every number within the bound, and the reference scores as right
        assert p.answer.count("\n") == 1 and all(0 <= int(n) <= 20 for n in re.findall(r"\d+", p.answer))
        assert verify.reward(p.answer, p.answer) == 1.0


def test_arith_sets_are_the_files_toy_py_writes_and_rise_reads_them_in_place(tmp_path):
    """arith:train/dev/test (SmolLM2's recipe) are made in place, equal to `python toy.py --problems DIR`."""
    folder = toy.write_problems(tmp_path, toy.ARITH_SIZES, **toy.ARITH)
    cfg = rise.Config(model="smollm2-135m")
    for split, n in toy.ARITH_SIZES.items():
        written = [p.question for p in data.load_problems(str(folder / f"{split}.jsonl"))]
        in_place = checks.load_problems(f"arith:{split}", None, cfg)
        assert [p.question for p in in_place] == written and len(written) == n
    assert len(checks.load_problems("arith:test", 7, cfg)) == 7
    with pytest.raises(data.DataError, match="arith:valid: no such split; use arith:train"):
        checks.load_problems("arith:valid", None, cfg)


def test_the_smollm2_preset_applies_to_its_name_only_and_flags_override_it():
    cfg, _, _ = rise.parse_args(["--model", "smollm2-135m"])
    assert (cfg.train_data, cfg.eval_data, cfg.max_new_tokens, cfg.lr) == ("arith:train", "arith:test", 64, 3e-5)
    cfg, _, given = rise.parse_args(["--model", "smollm2-135m", "--lr", "1e-4", "--eval-data", "arith:dev"])
    assert (cfg.lr, cfg.eval_data, cfg.temperature) == (1e-4, "arith:dev", 0.7)
    assert given == {"model", "lr", "eval_data"}
    cfg, _, _ = rise.parse_args(["--model", "mistral-7b"])
    assert (cfg.train_data, cfg.max_new_tokens, cfg.lr) == ("gsm8k:train", rise.Config.max_new_tokens, rise.Config.lr)


def test_help_shows_the_toy_and_smollm2_defaults(capsys):
    with pytest.raises(SystemExit):
        rise.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1e-05; toy: 0.0002; smollm2-135m: 3e-05)" in text
    assert "python smollm2.py" in text
