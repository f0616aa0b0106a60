"""Bad input through the command line (issue: bad input), each in a subprocess as a user would meet it:
exit status 2, one message that names the input, no traceback, and nothing written or marked done
that must not be. Small toy runs (a 40-step toy base, cached in $RISE_CACHE)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("kind, names", [("folder", ["a folder"]), ("link loop", ["leads nowhere"])])
def test_a_data_path_that_is_no_file_says_what_it_is(tmp_path, kind, names):
    data = tmp_path / "train.jsonl"
    if kind == "folder":
        data.mkdir()
    else:
        data.symlink_to(data)
    assert_user_error(cli(*TINY, "--train-data", str(data), "--out", str(tmp_path / "out")), str(data), *names)


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


# --- every file checked, every flag validated, every turn fits, runs cannot collide -------------------

def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def hostile_checkpoint(toy_base: Path, tmp_path: Path, how: str) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(toy_base, path)
    config, tok_config = path / "config.json", path / "tokenizer_config.json"
    if how == "num_attention_heads 0":
        edit_json(config, lambda c: {**c, "num_attention_heads": 0})
    elif how == "config.json a list":
        config.write_text("[]")
    elif how == "hidden_size a string":
        edit_json(config, lambda c: {**c, "hidden_size": "128"})
    elif how == "generation_config eos a string":
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</a>"}))
    elif how == "tokenizer_config not JSON":
        tok_config.write_text("chat_template: {{ messages }}")
    elif how == "template raises":
        edit_json(tok_config, lambda c: {**c, "chat_template": "{{ raise_exception('no system role here') }}"})
    elif how == "template syntax error":
        edit_json(tok_config, lambda c: {**c, "chat_template": "{% for m in messages %}{{ m.content }"})
    elif how == "added token past the vocabulary":
        tok = json.loads((path / "tokenizer.json").read_text())
        size = json.loads(config.read_text())["vocab_size"]
        tok["added_tokens"].append({"id": size, "content": "<extra>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        (path / "tokenizer.json").write_text(json.dumps(tok))
    elif how == "index without weight_map":
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return path


@pytest.mark.parametrize("how, names", [
    ("num_attention_heads 0", ["config.json", "'num_attention_heads'", "positive integer"]),
    ("config.json a list", ["config.json", "list", "not an object"]),
    ("hidden_size a string", ["config.json", "'hidden_size'", "'128'"]),
    ("generation_config eos a string", ["generation_config.json", "'eos_token_id'"]),
    ("tokenizer_config not JSON", ["tokenizer_config.json", "not a readable JSON"]),
    ("template raises", ["chat template", "no system role here"]),
    ("template syntax error", ["chat template", "TemplateSyntaxError"]),
    ("added token past the vocabulary", ["vocab_size", "no embedding"]),
    ("index without weight_map", ["model.safetensors.index.json", "'weight_map'", "missing"]),
])
def test_every_checkpoint_file_is_checked_before_any_work(toy_base, tmp_path, how, names):
    model = hostile_checkpoint(toy_base, tmp_path, how)
    done = cli(*TINY, "--model", str(model), "--train-data", "toy:train", "--eval-data", "toy:test",
               "--out", str(tmp_path / "out"))
    assert_user_error(done, *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight, value, names", [
    ("model.embed_tokens.weight", float("nan"), ["model.embed_tokens.weight", "NaN"]),
    ("model.norm.weight", 3e38, ["logits", "not finite"]),  # every weight finite (< 3.4e38), the logits not
])
def test_a_checkpoint_whose_weights_or_logits_are_not_finite_is_refused(toy_base, tmp_path, weight, value, names):
    from safetensors.torch import load_file, save_file

    model = hostile_checkpoint(toy_base, tmp_path, "as is")
    weights = load_file(model / "model.safetensors")
    weights[weight][:] = value
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    done = cli(*TINY, "--model", str(model), "--train-data", "toy:train", "--eval-data", "toy:test", "--out", str(out))
    assert_user_error(done, str(model), *names)
    assert not (out / "state.json").exists() and not (out / "metrics.json").exists()


def test_a_lone_surrogate_in_a_short_question_is_refused_before_the_base_evaluation(tmp_path):
    data = jsonl(tmp_path / "train.jsonl", ['{"question": "Ann has 3 cups.", "answer": "#### 3"}',
                                            '{"question": "Ann has \\ud800 cups.", "answer": "#### 3"}'])
    done = cli(*TINY, "--train-data", str(data), "--out", str(tmp_path / "out"))
    assert_user_error(done, str(data), "train-1", "not valid Unicode")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, names", [
    (["--device", "nonsense"], ["--device nonsense", "cpu, cuda"]),
    (["--device", f"cuda:{torch.cuda.device_count()}"], [f"--device cuda:{torch.cuda.device_count()}", "GPU"]),
    (["--seed", "-1"], ["--seed -1", ">= 0"]),
    (["--dtype", "float16"], ["--dtype float16", "AdamW", "bfloat16"]),
    (["--fsdp"], ["--fsdp", "torchrun"]),
    (["--samples", "1000000"], ["1000000 rows", "--rows-per-batch 512"]),
    (["--turns", "10000", "--rows-per-batch", "100000", "--context", "all"], ["at turn 10000", "context of 1024"]),
    (["--turns", "5", "--max-new-tokens", "200", "--context", "all"], ["at turn 5", "context of 1024", "--turns"]),
])
def test_flags_and_the_states_of_every_turn_are_checked_before_any_work(tmp_path, flags, names):
    done = cli(*TINY, *flags, "--out", str(tmp_path / "out"))
    assert_user_error(done, *names)
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    slow = [*TINY[:-4], "--turns", "2", "--samples", "2", "--eval-problems", "200", "--iterations", "1"]
    first = subprocess.Popen([sys.executable, str(ROOT / "rise.py"), *slow, "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # base.json is written once the first run holds the lock
            if (out / "base.json").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could start"
        assert_user_error(cli(*slow, "--out", str(out)), "another rise run", ".lock")
    finally:
        first.kill()  # kill -9: its lock goes with it
        first.wait()
    resume = ["--resume"] if (out / "state.json").exists() else []
    done = cli(*TINY, *resume, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("damage, names", [
    ("state.json truncated", ["state.json", "not a readable JSON"]),
    ("state.json wrong shape", ["state.json", "'done'"]),
    ("config.json not JSON", ["config.json", "not a readable JSON"]),
    ("config.json wrong type", ["--turns 'two'", "int"]),
])
def test_a_damaged_run_folder_is_named_on_resume(finished_run, tmp_path, damage, names):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    if damage == "state.json truncated":
        (out / "state.json").write_text((out / "state.json").read_text()[:7])
    elif damage == "state.json wrong shape":
        (out / "state.json").write_text(json.dumps({"done": "eval:base"}))
    elif damage == "config.json not JSON":
        (out / "config.json").write_text("{")
    else:
        edit_json(out / "config.json", lambda c: {**c, "turns": "two"})
    assert_user_error(cli(*TINY, "--resume", "--out", str(out)), *names)


def test_resume_runs_again_a_stage_whose_files_are_gone(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "iter1" / "trajectories.jsonl").unlink()
    done = cli(*TINY, "--resume", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "collect:1" in done.stdout + done.stderr
    assert (out / "iter1" / "trajectories.jsonl").is_file()
    assert json.loads((out / "state.json").read_text())["done"] == ["eval:base", "collect:1", "train:1", "eval:iter1"]


def test_resume_accepts_the_same_base_moved_and_refuses_another(toy_base, tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(toy_base, first)
    out = tmp_path / "out"
    args = [*TINY, "--train-data", "toy:train", "--eval-data", "toy:test", "--iterations", "0", "--out", str(out)]
    assert cli(*args, "--model", str(first)).returncode == 0
    first.rename(moved)
    done = cli(*args, "--resume", "--model", str(moved))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model"] == str(moved)
    edit_json(moved / "config.json", lambda c: {**c, "rms_norm_eps": 1e-6})  # another checkpoint now
    assert_user_error(cli(*args, "--resume"), str(moved), "not the base checkpoint")


def test_a_full_disk_is_one_error_leaves_no_temporary_file_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import errno

    import rise

    out = tmp_path / "run"
    real = Path.write_bytes

    def full(self, content):
        if self.name.endswith(".tmp") and "iter1" in self.name + str(self.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, content)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(SystemExit) as stop:
        rise.main([*TINY, "--out", str(out)])
    assert stop.value.code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(Path, "write_bytes", real)
    rise.main([*TINY, "--resume", "--out", str(out)])
    assert json.loads((out / "state.json").read_text())["done"][-1] == "eval:iter1"


def test_a_run_started_on_a_gpu_resumes_on_the_cpu_with_device_cpu(finished_run, tmp_path):
    """The saved settings are checked for type and range alone; the device is checked once --device applies."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    edit_json(out / "config.json", lambda c: {**c, "device": "cuda:7"})
    assert_user_error(cli(*TINY, "--resume", "--out", str(out)), "--device cuda:7")
    done = cli(*TINY, "--resume", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
