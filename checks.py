"""
checks.py -- what rise.py's command line does before the method runs: every flag, every file rise will read
(checkpoint, tokenizer, data, a resumed run's folder) and every state the run can reach, checked before any
work; and the run folder locked so that two runs cannot write it at once. None of it is RISE; rise.run
starts where this ends.

    cfg, base, teacher, train_problems, eval_problems = checks.prepare(cfg, resume, given)

Every failure is a ConfigError (or data.DataError, model.CheckpointError) whose message names the input and
the fix; rise.main prints it as one `error:` line and exits with status 2. One mechanism reads every JSON
file: read_json, with the fields rise uses and what each must be.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import operator
import os
import typing
from pathlib import Path

import jinja2
import torch

import data
import model as M
import rise
from rise import Config


class ConfigError(ValueError):
    """A setting, file, output folder or resumed run that cannot work; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# Files: every JSON file rise reads, parsed and checked field by field
# --------------------------------------------------------------------------------------------


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# A rule is (test, what it must be); a file's fields map each name to (required, rule).
POSITIVE_INT = (lambda v: _integer(v) and v > 0, "a positive integer")
POSITIVE = (lambda v: (_integer(v) or isinstance(v, float)) and v > 0, "a positive number")
FLAG = (lambda v: isinstance(v, bool), "true or false")
TOKEN_IDS = (lambda v: _integer(v) and v >= 0 or isinstance(v, list) and all(_integer(i) and i >= 0 for i in v),
             "a token id or a list of them")
TOKEN = (lambda v: isinstance(v, (str, dict)), "a token's text or an object with its content")
STAGES = (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of stage names")

CHECKPOINT_FILES = {
    "config.json": {
        **{name: (True, POSITIVE_INT) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "vocab_size")},
        **{name: (False, POSITIVE_INT) for name in ("num_key_value_heads", "head_dim", "max_position_embeddings")},
        "rms_norm_eps": (False, POSITIVE), "rope_theta": (False, POSITIVE), "tie_word_embeddings": (False, FLAG),
        "eos_token_id": (False, TOKEN_IDS), "bos_token_id": (False, TOKEN_IDS)},
    "generation_config.json": {"eos_token_id": (False, TOKEN_IDS)},
    "tokenizer_config.json": {
        "chat_template": (False, (lambda v: isinstance(v, (str, list)), "a Jinja template or a list of them")),
        **{name: (False, TOKEN) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "add_bos_token": (False, FLAG), "add_eos_token": (False, FLAG)},
    "model.safetensors.index.json": {"weight_map": (True, (lambda v: isinstance(v, dict) and bool(v) and all(
        isinstance(f, str) for f in v.values()), "an object mapping tensor names to file names"))},
}


def read_json(path: Path, fields: dict, fix: str):
    """A JSON object read from `path` whose `fields` (name -> (required, (test, what))) hold what rise
    needs; optional fields may be absent or null. Anything else is one ConfigError naming the file, the
    field and `fix`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a JSON {type(value).__name__}, not an object; {fix}")
    for name, (required, (test, what)) in fields.items():
        if value.get(name) is None and not required:
            continue
        if not test(value.get(name)):
            found = repr(value[name]) if name in value else "missing"
            raise ConfigError(f"{path}: field {name!r} is {found}, but must be {what}; {fix}")
    return value


def check_checkpoint_files(path: Path) -> dict:
    """Every JSON file of a checkpoint folder that rise reads, checked; returns its config.json."""
    fix = "repair the file, or fetch the checkpoint again"
    if not (path / "config.json").is_file():
        raise M.CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    files = {name: read_json(path / name, fields, fix) for name, fields in CHECKPOINT_FILES.items()
             if (path / name).is_file()}
    config = files["config.json"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv or not config.get("head_dim") and config["hidden_size"] % heads:
        raise ConfigError(f"{path / 'config.json'}: num_attention_heads ({heads}) must be a multiple of "
                          f"num_key_value_heads ({kv}), and hidden_size ({config['hidden_size']}) of "
                          f"num_attention_heads unless head_dim is given; {fix}")
    return config


def fingerprint(path: Path) -> str:
    """What identifies a checkpoint wherever it lies: its config.json, and its weight files' names and sizes."""
    digest = hashlib.sha1((path / "config.json").read_bytes())
    for file in M.weight_files(path):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

LIMITS = {"min": (">=", operator.ge), "gt": (">", operator.gt), "max": ("<=", operator.le)}  # opt()'s rules


def check_fields(cfg: Config) -> None:
    """Every setting of its field's type, finite, within its range (rise.opt's min/gt/max) and choices."""
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            if not (float in kinds and _integer(value)):  # JSON writes 2.0 as 2.0, but a person may write 2
                raise ConfigError(f"{flag} {value!r}: must be {' or '.join(k.__name__ for k in kinds)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number")
        limits = [(sign, f.metadata[key], ok) for key, (sign, ok) in LIMITS.items() if key in f.metadata]
        if value is not None and not all(ok(value, bound) for _, bound, ok in limits):
            required = " and ".join(f"{sign} {bound}" for sign, bound, _ in limits)
            raise ConfigError(f"{flag} {value}: must be {required}")
        if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
            raise ConfigError(f"{flag} {value}: must be one of {', '.join(f.metadata['choices'])}")


def check_settings(cfg: Config) -> None:
    """check_fields, then what the settings name outside rise: the device, the precision training supports,
    torchrun; and the rows one problem needs at once."""
    check_fields(cfg)
    try:
        device = torch.device(cfg.device or "cpu")
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {cfg.device}: not a device torch knows; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {cfg.device}: rise runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} GPU(s) that torch "
                          "can use; leave out --device to run on the CPU")
    if cfg.dtype == "float16" and cfg.iterations and not cfg.lora_rank:
        raise ConfigError("--dtype float16: AdamW cannot train float16 weights (its update is 0/0 wherever a "
                          "gradient is 0, at any --lr); use --dtype bfloat16 or float32, or train LoRA adapters "
                          "(--lora-rank 16), which are float32")
    if cfg.fsdp and "RANK" not in os.environ:
        raise ConfigError("--fsdp shards the model over the processes torchrun starts; run "
                          "`torchrun --nproc_per_node=N rise.py --fsdp ...`, or leave out --fsdp")
    widest = max(cfg.samples, cfg.first_samples or 0, cfg.turns)  # evaluation samples T turn-1 answers at once
    if widest > cfg.rows_per_batch:
        raise ConfigError(f"one problem needs {widest} rows at once (the largest of --samples, --first-samples and "
                          f"--turns), more than --rows-per-batch {cfg.rows_per_batch}; raise --rows-per-batch or "
                          "lower them")


def differences(cfg: Config) -> str:
    """The settings in which this run differs from Config's defaults, as the flags that set them."""
    flags = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value != f.default:
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(flags) or "none"


# --------------------------------------------------------------------------------------------
# Models and problems
# --------------------------------------------------------------------------------------------

# Short names resolved offline: $RISE_MODELS/<name or repo name>, else the Hugging Face cache.
MODEL_NAMES = {
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "llama2-7b": "meta-llama/Llama-2-7b-chat-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def resolve_model(name: str) -> Path:
    """A checkpoint directory found without the network: the path `name`, $RISE_MODELS/<name> (default
    $RISE_CACHE/models, where `python smollm2.py` writes smollm2-135m), or the
    Hugging Face cache's snapshot that refs/main names (what `huggingface-cli download` fetched last)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo = MODEL_NAMES.get(name, name)
    models = Path(os.environ.get("RISE_MODELS") or os.environ.get("RISE_CACHE", "~/.cache/rise") + "/models")
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    cached = hub.expanduser() / f"models--{repo.replace('/', '--')}"
    ref = (cached / "refs" / "main").read_text().strip() if (cached / "refs" / "main").is_file() else "<refs/main>"
    candidates = [models.expanduser() / name, models.expanduser() / repo.split("/")[-1], cached / "snapshots" / ref]
    found = [c for c in candidates if (c / "config.json").is_file()]
    if not found:
        raise M.CheckpointError(f"model {name!r} not found in {', '.join(map(str, [path] + candidates))}. rise never "
                                f"downloads: fetch it elsewhere with `huggingface-cli download {repo}`, or put its "
                                f"folder in $RISE_MODELS, or pass its path. Known names: {', '.join(MODEL_NAMES)}")
    return found[0]


def pretrain(model: M.Transformer, examples: list[data.Example], settings: dict, pad_id: int, seed: int,
             desc: str) -> dict:
    """rise.train with the toy's own settings: the loop toy.build_base pre-trains with (toy.py sits below
    rise.py and does not import it)."""
    return rise.train(model, examples, Config(**settings), pad_id, seed, desc)


def base_checkpoint(cfg: Config) -> Path:
    """The checkpoint RISE starts from; the toy's is built (once, by rank 0) and cached."""
    if cfg.model != "toy":
        return resolve_model(cfg.model)
    import toy
    if rise.is_main():
        toy.build_base(pretrain, toy.recipe(cfg.toy_pretrain_steps))
    rise.barrier()
    return toy.build_base(pretrain, toy.recipe(cfg.toy_pretrain_steps))


def load_problems(spec: str, limit: int | None, cfg: Config) -> list[data.Problem]:
    """The first `limit` problems of a data.load_problems set ("toy:train" / "toy:test" are the toy
    base's, "arith:train" / "arith:test" SmolLM2's), every one of them text that can be encoded."""
    if spec.startswith("toy:"):
        import toy
        problems = toy.recipe(cfg.toy_pretrain_steps).problems(spec.removeprefix("toy:"))[:limit]
    elif spec.startswith("arith:"):
        import toy
        problems = toy.arith_problems(spec.removeprefix("arith:"))[:limit]
    else:
        problems = data.load_problems(spec)[:limit]
    for p in problems:
        try:
            (p.question + p.answer).encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" from a JSON escape
            raise data.DataError(f"{spec}: problem {p.id} is not valid Unicode text ({e.reason} at "
                                 f"{e.object[e.start:e.end]!r}); fix or remove it") from None
    return problems


def longest_state(tokenizer: data.Tokenizer, problems: list[data.Problem], prompts: data.Prompts,
                  cfg: Config) -> tuple[int, data.Problem]:
    """(tokens, problem) of the longest sequence a run can reach: the state at the last turn, with every
    earlier attempt in view at its full budget, under either feedback, plus its own attempt. Looked for
    among the 8 longest questions by characters (a question's tokens grow with its characters)."""
    in_view = cfg.turns - 1 if cfg.context == "all" else min(1, cfg.turns - 1)
    longest = sorted(problems, key=lambda p: len(p.question))[-8:]
    states = [(len(data.render_state(tokenizer, data.state_messages(p, ["0"] * (cfg.turns - 1), prompts,
                                                                    protocol, cfg.context))), p)
              for p in longest for protocol in ("oracle", "neutral")]
    tokens, problem = max(states, key=lambda state: state[0])
    return tokens + (in_view + 1) * cfg.max_new_tokens, problem


def check_fits(path: Path, problems: list[data.Problem], prompts: data.Prompts, cfg: Config) -> None:
    """The checkpoint's files are usable, its tokenizer's ids have embeddings, its chat template renders
    an episode, and the longest sequence of any turn fits its context."""
    check_checkpoint_files(path)
    args = M.check_checkpoint(path)
    tokenizer = data.Tokenizer(path)
    if tokenizer.vocab_size > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens (added tokens included), but "
                          f"config.json's vocab_size is {args.vocab_size}: ids from {args.vocab_size} on have no "
                          "embedding; remove those added tokens from tokenizer.json or use a matching checkpoint")
    try:
        tokens, problem = longest_state(tokenizer, problems, prompts, cfg)
        if cfg.context == "all":  # states grow turn by turn as continuations of the last
            data.end_of_turn_id(tokenizer, args.eos_ids)
    except jinja2.TemplateError as e:
        raise ConfigError(f"{path}: its chat template fails to render an episode ({type(e).__name__}: {e}); fix "
                          "chat_template in tokenizer_config.json (or chat_template.jinja)") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}; use --context last") from None
    if tokens > args.max_seq_len:
        raise ConfigError(f"problem {problem.id}: at turn {cfg.turns} its state and attempt can reach {tokens} tokens "
                          f"(--turns {cfg.turns}, --max-new-tokens {cfg.max_new_tokens}, --context {cfg.context}), "
                          f"over {path}'s context of {args.max_seq_len} tokens; lower --turns or --max-new-tokens, "
                          "use --context last, or remove the problem from the data")


# --------------------------------------------------------------------------------------------
# The run folder: one run at a time, and a resumed run's settings and finished stages
# --------------------------------------------------------------------------------------------

_LOCK = None  # this process's open lock file: the lock lasts while it is open


def lock(out: Path) -> None:
    """One run at a time in a folder: an exclusive lock on OUT/.lock. The system drops it when the process
    ends, however it ends, so a killed run's lock never blocks --resume."""
    global _LOCK
    if _LOCK is not None:
        _LOCK.close()  # the lock of an earlier run in this process (tests run several)
    out.mkdir(parents=True, exist_ok=True)
    _LOCK = open(out / ".lock", "a")
    try:
        fcntl.flock(_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"--out {out}: another rise run is working in this folder (it holds {out}/.lock); "
                          "wait for it to end, or choose another --out") from None


def stages_done(out: Path) -> list[str]:
    """The stages of the run in `out` that finished, from its state.json once checked (rise.stages_done reads
    the same file during the run, after this has vouched for it)."""
    if not (out / "state.json").exists():
        return []
    return read_json(out / "state.json", {"done": (True, STAGES)}, "delete it to run every stage again, or start "
                     "a new run with another --out")["done"]


def intact(out: Path, stage: str, metrics: dict) -> bool:
    """Are the files a finished stage wrote still there and readable?"""
    kind, _, name = stage.partition(":")
    try:
        if kind == "eval":
            return name in metrics and all((out / "eval" / f"{name}_{k}.jsonl").is_file()
                                           for k in ("oracle", "neutral", "parallel"))
        if kind == "collect":
            return bool(data.episodes_from_jsonl((out / f"iter{name}" / "trajectories.jsonl").read_text()))
        if kind == "train":
            M.check_checkpoint(out / f"iter{name}" / "policy")
            return (out / f"iter{name}" / "train.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or not what rise writes
        return False
    return False


def check_stages(out: Path) -> None:
    """--resume: a stage stays done only while its files are intact; from the first that is missing or
    damaged on, the stages run again (state.json is rewritten to say so)."""
    done = stages_done(out)
    metrics_path = out / "metrics.json"
    metrics = read_json(metrics_path, {}, "delete it to evaluate again") if metrics_path.exists() else {}
    kept = list(itertools.takewhile(lambda stage: intact(out, stage, metrics), done))
    if kept != done and rise.is_main():
        print(f"--resume: the files of stage {done[len(kept)]} are missing or damaged; it and the stages after it "
              "run again", flush=True)
        rise.write_atomic(out / "state.json", json.dumps({"done": kept}, indent=1))


def resumed_config(cfg: Config, given: set[str]) -> Config:
    """The settings of the run in --out, and of the flags given now, those that may change (resume=True).
    The base checkpoint must be the one the run started from (base.json), though it may have moved."""
    out = Path(cfg.out)
    fix = "repair it, or start a new run with another --out"
    if not stages_done(out) or not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} holds no run to resume; leave out --resume to start one there")
    saved = read_json(out / "config.json", {}, fix)
    mismatched = set(saved) ^ {f.name for f in dataclasses.fields(Config)}  # another version of rise wrote it
    if mismatched:
        raise ConfigError(f"--resume: {out / 'config.json'} was not written by this version of rise (settings missing "
                          f"or new: {', '.join(sorted(mismatched))}); add or remove them there, or start a new run "
                          "elsewhere")
    saved = Config(**saved)
    check_fields(saved)  # (the device and the rest are checked once the flags given now are applied)
    changed = {name for name in given if getattr(cfg, name) != getattr(saved, name)}
    if (out / "base.json").is_file() and saved.model != "toy":  # the run's own base, perhaps moved
        base = resolve_model(cfg.model if "model" in changed else saved.model)
        if fingerprint(base) != read_json(out / "base.json", {}, fix).get("fingerprint"):
            raise ConfigError(f"--resume: {base} is not the base checkpoint this run started from (its config.json "
                              f"or weight files differ from those {out / 'base.json'} records); give --model the "
                              "run's own base, or start a new run with another --out")
        if "model" in changed:
            changed.discard("model")
            saved = dataclasses.replace(saved, model=cfg.model)
    refused = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)} (the run has {getattr(saved, f.name)})"
               for f in dataclasses.fields(cfg) if f.name in changed and not f.metadata.get("resume")]
    if refused:
        raise ConfigError("--resume continues a run with its own settings; these differ: " + ", ".join(refused) +
                          ". Leave them out, or start a new run with another --out.")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in changed})


def check_out(out: Path, cfg: Config, resume: bool) -> None:
    """The run folder can be made and written, holds no other run unless resumed, and no file sits where
    the run will write a folder."""
    done = stages_done(out)
    if done and not resume:
        raise ConfigError(f"--out {out} already holds a run (stages done: {', '.join(done)}); "
                          "pass --resume to continue it, or choose another --out")
    existing = next(path for path in [out, *out.parents] if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create or write a folder there ({existing} is not a writable "
                          "folder); choose another --out")
    for folder in [out / "eval"] + [out / f"iter{k}" for k in range(1, cfg.iterations + 1)]:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {out}: {folder} is a file where the run writes a folder; move it away")


def prepare(cfg: Config, resume: bool, given: set[str]):
    """Everything checked before any work, then the run folder locked: returns the settings to run with (a
    resumed run's own), the base and teacher checkpoints, and the training and evaluation problems."""
    out = Path(cfg.out)
    cfg = resumed_config(cfg, given) if resume else cfg
    check_settings(cfg)
    check_out(out, cfg, resume)
    if rise.is_main():
        print(f"settings that differ from Config's defaults: {differences(cfg)}", flush=True)
    train_problems = load_problems(cfg.train_data, cfg.train_problems, cfg)
    eval_problems = load_problems(cfg.eval_data, cfg.eval_problems, cfg)
    base = base_checkpoint(cfg)
    teacher = resolve_model(cfg.teacher) if cfg.teacher else None
    for path in filter(None, [base, teacher]):
        check_fits(path, train_problems + eval_problems, rise.prompts_for(cfg), cfg)
    if rise.is_main():
        lock(out)
        check_out(out, cfg, resume)  # again, under the lock: a run may have finished here meanwhile
        if resume:
            check_stages(out)
        else:
            rise.write_atomic(out / "base.json", json.dumps({"path": str(base), "fingerprint": fingerprint(base)}))
    rise.barrier()
    return cfg, base, teacher, train_problems, eval_problems
