"""Bad input through the command line (issue: bad input), each in a subprocess as a user would meet it:
exit status 2, one message that names the input, no traceback, and nothing written or marked done
that must not be. Small toy runs (a 40-step toy base, cached in $RISE_CACHE)."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--toy-pretrain-steps", "40", "--train-problems", "8", "--eval-problems", "6", "--turns", "2",
        "--samples", "2", "--max-new-tokens", "16", "--iterations", "1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "rise.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def assert_user_error(done: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, no traceback, and one error line naming every one of `names`; returns that line."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def toy_base() -> Path:
    sys.path.insert(0, str(ROOT))
    import checks
    import toy

    return toy.build_base(checks.pretrain, toy.recipe(40))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A whole tiny 1-iteration run; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = cli(*TINY, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def broken_checkpoint(toy_base: Path, tmp_path: Path, how: str) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(toy_base, path)
    weights = path / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif how == "garbage weights":
        weights.write_bytes(os.urandom(4096))
    elif how == "unsupported architecture":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif how == "config.json not JSON":
        (path / "config.json").write_text("{'hidden_size': 128,")
    elif how == "truncated tokenizer.json":
        (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text()[:500])
    return path


@pytest.mark.parametrize("how, names", [
    ("no weights", ["ckpt", "model.safetensors"]),
    ("truncated weights", ["model.safetensors", "truncated"]),
    ("garbage weights", ["model.safetensors"]),
    ("unsupported architecture", ["GPT2LMHeadModel"]),
    ("config.json not JSON", ["config.json"]),
    ("truncated tokenizer.json", ["tokenizer.json"]),
])
def test_bad_checkpoint(toy_base, tmp_path, how, names):
    model = broken_checkpoint(toy_base, tmp_path, how)
    done = cli(*TINY, "--model", str(model), "--train-data", "toy:train", "--eval-data", "toy:test",
               "--out", str(tmp_path / "out"))
    assert_user_error(done, *names)
    assert not (tmp_path / "out").exists()  # refused before any work: nothing written


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("content, names", [
    (['{"question": "Ann has 3 cups.", "answer": "#### 3"}', '{"question": "q", "answer": '], ["line 2", "JSON"]),
    (['{"question": "Ann has 3 cups."}'], ["line 1", "'answer'"]),
    ([], ["no problems"]),
    (None, ["no such file"]),
])
def test_bad_training_data(tmp_path, content, names):
    data = tmp_path / "train.jsonl"
    if content is not None:
        jsonl(data, content)
    done = cli(*TINY, "--train-data", str(data), "--out", str(tmp_path / "out"))
    assert_user_error(done, str(data), *names)
    assert not (tmp_path / "out").exists()


def test_a_question_too_long_for_the_context_is_refused_before_any_work(tmp_path):
    data = jsonl(tmp_path / "train.jsonl", ['{"question": "Ann has 3 cups.", "answer": "#### 3"}',
                                            json.dumps({"question": "Ann has 3 cups. " * 650_000, "answer": "#### 3"})])
    assert data.stat().st_size > 10_000_000
    done = cli(*TINY, "--train-data", str(data), "--out", str(tmp_path / "out"))
    assert_user_error(done, "train-1", "--max-new-tokens", "context of 1024 tokens")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, rule", [
    ("--turns", "0", ">= 1"), ("--samples", "0", ">= 1"), ("--batch-size", "0", ">= 1"),
    ("--lr", "nan", "finite"), ("--lr", "0", "> 0"), ("--temperature", "-1", ">= 0"),
    ("--max-new-tokens", "0", ">= 1"), ("--eval-problems", "-5", ">= 1"), ("--top-p", "1.5", "<= 1"),
])
def test_out_of_range_settings(tmp_path, flag, value, rule):
    done = cli(*TINY, flag, value, "--out", str(tmp_path / "out"))
    assert_user_error(done, f"{flag} {value}", rule)
    assert not (tmp_path / "out").exists()  # config.json never holds a NaN


def test_a_diverging_lr_stops_training_saves_nothing_and_resume_repairs_it(tmp_path):
    out = tmp_path / "out"
    steps = ["--keep-uniform-turns", "--batch-size", "1", "--micro-batch", "1", "--epochs", "2"]
    done = cli(*TINY, *steps, "--lr", "1e10", "--out", str(out))
    assert_user_error(done, "diverged", "--lr")
    assert json.loads((out / "state.json").read_text())["done"] == ["eval:base", "collect:1"]
    assert not (out / "iter1" / "policy").exists()  # no non-finite policy saved
    done = cli(*TINY, *steps, "--resume", "--lr", "1e-4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["done"][-2:] == ["train:1", "eval:iter1"]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-4  # the run records the new setting


def test_resume_cleans_an_interrupted_save_and_continues_with_more_iterations(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    leftover = out / "iter1" / ".policy.k9x2"  # what `kill -9` during a save leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    state = json.loads((out / "state.json").read_text())["done"]
    (out / "state.json").write_text(json.dumps({"done": [s for s in state if s not in ("train:1", "eval:iter1")]}))
    done = cli(*TINY, "--resume", "--iterations", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not leftover.exists()
    assert set(json.loads((out / "metrics.json").read_text())) == {"base", "iter1", "iter2"}
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "iter2" / "policy", out / "iter2" / "policy" / "model.safetensors"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_resume_refuses_a_changed_setting_and_a_folder_with_no_run(finished_run, tmp_path):
    done = cli(*TINY, "--resume", "--turns", "3", "--samples", "4", "--out", str(finished_run))
    assert_user_error(done, "--turns 3 (the run has 2)", "--samples 4 (the run has 2)")
    done = cli(*TINY, "--resume", "--out", str(tmp_path / "nothing"))
    assert_user_error(done, "nothing", "holds no run")
    assert not (tmp_path / "nothing").exists()


def test_resume_refuses_a_config_written_by_another_version(finished_run, tmp_path):
    """A config.json without a setting would resume with Config's default for it (for the toy, not the
    toy's preset), and one with an unknown setting cannot be read: both are named, and nothing runs."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    saved = json.loads((out / "config.json").read_text())
    state = (out / "state.json").read_text()
    (out / "config.json").write_text(json.dumps({**{k: v for k, v in saved.items() if k != "keep"}, "old_flag": 1}))
    done = cli(*TINY, "--resume", "--iterations", "2", "--out", str(out))
    assert_user_error(done, "config.json", "keep", "old_flag")
    assert (out / "state.json").read_text() == state and not (out / "iter2").exists()


def test_output_folder_that_cannot_be_used(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_user_error(cli(*TINY, "--out", str(blocker / "run")), "--out", "a-file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "iter1").write_text("in the way")
    assert_user_error(cli(*TINY, "--out", str(out)), "iter1", "is a file")
    assert sorted(p.name for p in out.iterdir()) == ["iter1"]  # refused before the base evaluation
