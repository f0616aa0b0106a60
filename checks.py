"""
checks.py -- what rise.py's command line does before the method runs: settings within their ranges, the
model found by name without the network, the run folder usable, a resumed run's settings, the problems
loaded and the checkpoint able to hold them. None of it is RISE; rise.run starts where this ends.

    cfg, base, teacher, train_problems, eval_problems = checks.prepare(cfg, resume, given)

Every failure is a ConfigError (or data.DataError, model.CheckpointError) whose message names the input and
the fix; rise.main prints it as one `error:` line and exits with status 2, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
from pathlib import Path

import data
import model as M
import rise
from rise import Config


class ConfigError(ValueError):
    """A setting, output folder or resumed run that cannot work; the message names it and the fix."""


LIMITS = {"min": (">=", operator.ge), "gt": (">", operator.gt), "max": ("<=", operator.le)}  # opt()'s rules


def check_settings(cfg: Config) -> None:
    """Every setting finite and within its field's range (rise.opt's min/gt/max)."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number")
        limits = [(sign, f.metadata[key], ok) for key, (sign, ok) in LIMITS.items() if key in f.metadata]
        if value is not None and not all(ok(value, bound) for _, bound, ok in limits):
            required = " and ".join(f"{sign} {bound}" for sign, bound, _ in limits)
            raise ConfigError(f"{flag} {value}: must be {required}")


def differences(cfg: Config) -> str:
    """The settings in which this run differs from Config's defaults, as the flags that set them."""
    flags = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value != f.default:
            flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(flags) or "none"


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
    $RISE_CACHE/models, where `python tests/smollm2.py` writes smollm2-135m), or the
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
    """The first `limit` problems of a data.load_problems set; "toy:train" / "toy:test" are the toy base's."""
    if spec.startswith("toy:"):
        import toy
        return toy.recipe(cfg.toy_pretrain_steps).problems(spec.removeprefix("toy:"))[:limit]
    return data.load_problems(spec)[:limit]


def resumed_config(cfg: Config, given: set[str]) -> Config:
    """The settings of the run in --out, and of the flags given now, those that may change (resume=True)."""
    path = Path(cfg.out) / "config.json"
    if not (path.parent / "state.json").is_file() or not path.is_file():
        raise ConfigError(f"--resume: {path.parent} holds no run to resume; leave out --resume to start one there")
    saved = json.loads(path.read_text())
    mismatched = set(saved) ^ {f.name for f in dataclasses.fields(Config)}  # another version of rise wrote it
    if mismatched:
        raise ConfigError(f"--resume: {path} was not written by this version of rise (settings missing or new: "
                          f"{', '.join(sorted(mismatched))}); add or remove them there, or start a new run elsewhere")
    saved = Config(**saved)
    changed = {name for name in given if getattr(cfg, name) != getattr(saved, name)}
    refused = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)} (the run has {getattr(saved, f.name)})"
               for f in dataclasses.fields(cfg) if f.name in changed and not f.metadata.get("resume")]
    if refused:
        raise ConfigError("--resume continues a run with its own settings; these differ: " + ", ".join(refused) +
                          ". Leave them out, or start a new run with another --out.")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in changed})


def check_out(out: Path, cfg: Config, resume: bool) -> None:
    """The run folder can be made and written, holds no other run unless resumed, and no file sits where
    the run will write a folder."""
    done = rise.stages_done(out)
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


def check_fits(path: Path, problems: list[data.Problem], prompts: data.Prompts, cfg: Config) -> None:
    """The checkpoint's config, tokenizer and weight headers are usable, and the longest first turn plus
    an attempt fits its context."""
    args = M.check_checkpoint(path)
    tokens, problem = data.longest_first_turn(data.Tokenizer(path), problems, prompts)
    if tokens + cfg.max_new_tokens > args.max_seq_len:
        raise ConfigError(f"problem {problem.id}: its first turn is {tokens} tokens, and with --max-new-tokens "
                          f"{cfg.max_new_tokens} that is over {path}'s context of {args.max_seq_len} tokens; "
                          "lower --max-new-tokens or remove the problem from the data")


def prepare(cfg: Config, resume: bool, given: set[str]):
    """Everything checked before any work: returns the settings to run with (a resumed run's own), the base
    and teacher checkpoints, and the training and evaluation problems."""
    cfg = resumed_config(cfg, given) if resume else cfg
    check_settings(cfg)
    check_out(Path(cfg.out), cfg, resume)
    if rise.is_main():
        print(f"settings that differ from Config's defaults: {differences(cfg)}", flush=True)
    train_problems = load_problems(cfg.train_data, cfg.train_problems, cfg)
    eval_problems = load_problems(cfg.eval_data, cfg.eval_problems, cfg)
    base = base_checkpoint(cfg)
    teacher = resolve_model(cfg.teacher) if cfg.teacher else None
    for path in filter(None, [base, teacher]):
        check_fits(path, train_problems + eval_problems, rise.prompts_for(cfg), cfg)
    return cfg, base, teacher, train_problems, eval_problems
