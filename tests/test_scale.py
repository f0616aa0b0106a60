"""Scale (issue 5) on CPU: DDP / FSDP training and sharded rollouts under torchrun with gloo, LoRA
(before and after merging, and the merged checkpoint in transformers), and the memory estimate."""

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import bench
import checks
import data
import model as M
import rise
import toy
from data import Candidate, Episode
from tests.test_rise import examples_of

ROOT = Path(__file__).resolve().parents[1]


# --- shared with tests/dist_worker.py, which runs the same things under torchrun ---------------

def load_toy_policy(path: Path, cfg: rise.Config | None = None, training: bool = False) -> rise.Policy:
    # float32 (not the bf16 rise picks on bf16-capable CPUs): ranks and one process must agree to rounding
    return rise.load_policy(path, cfg or rise.Config(device="cpu", dtype="float32"), data.TOY_PROMPTS, training=training)


def awr_batch(policy: rise.Policy) -> list[data.Example]:
    """Two problems x three candidates (one right), of different lengths: 6 examples, AWR-weighted."""
    episodes = []
    for a, b in ((9, 4), (23, 17)):
        p = data.Problem(f"Bob has {a} pens. He loses {b}. How many pens now?", f"{a}-{b}={a - b}\n#### {a - b}", "t")
        cands = [Candidate(f"{a}-{b}={v}\n#### {v}", str(v), float(v == a - b)) for v in (a - b, a - b + 1, 100 + a)]
        episodes.append(Episode(p, "oracle", [cands], [0]))
    rise.weigh(episodes, rise.Config(beta=0.5))
    return examples_of(episodes, policy)


def awr_config(fsdp: bool = False, device: str | None = "cpu") -> rise.Config:
    # an uneven split on purpose: 6 examples over 2 ranks in micro-batches of 2 (one rank pads with a
    # zero-weight copy); float32 without autocast, so the comparison is exact to rounding
    return rise.Config(lr=1e-3, epochs=1, batch_size=6, micro_batch=2, warmup=0.0, amp=False, fsdp=fsdp,
                       device=device)


def rollout_problems() -> list[data.Problem]:
    return toy.make_problems(7, seed=3, max_value=30)


def rollout_config() -> rise.Config:
    return rise.Config(max_new_tokens=16, rows_per_batch=4, temperature=1.0, device="cpu")


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A tiny random toy-architecture checkpoint on disk, so separate processes load the same weights."""
    root = tmp_path_factory.mktemp("scale")
    tok = data.Tokenizer(toy.write_tokenizer(root / "tok"))
    torch.manual_seed(0)
    args = toy.model_args(toy.Recipe(dim=64, n_layers=2), tok.vocab_size)
    args.bos_id, args.eos_ids = tok.bos_id, (tok.eos_id,)
    model = M.Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return M.save(model, root / "ckpt", tokenizer_dir=root / "tok")


def torchrun(mode: str, checkpoint: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "dist_worker.py"), mode, str(checkpoint), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


# --- torchrun, gloo --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["awr", "fsdp"])
def test_one_awr_step_on_two_ranks_equals_one_process(toy_checkpoint, tmp_path, mode):
    torchrun(mode, toy_checkpoint, tmp_path / "dist.safetensors")
    distributed = load_file(tmp_path / "dist.safetensors")

    policy = load_toy_policy(toy_checkpoint)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    stats = rise.train(policy.model, awr_batch(policy), awr_config(), policy.tokenizer.pad_id, shuffle_seed=0)
    single = policy.model.state_dict()
    # the loss is the same weighted mean over the whole batch (AdamW's first step hides a gradient's
    # scale, so this is what shows that each rank's share was scaled right)
    assert json.loads((tmp_path / "dist.json").read_text())["loss"] == pytest.approx(stats["loss"], rel=1e-6)
    assert set(distributed) == set(single)
    moved = max((single[k] - before[k]).abs().max().item() for k in single)
    assert moved > 5e-4  # the step did something (AdamW moves a weight by up to lr), so agreeing means something
    assert max((distributed[k] - single[k]).abs().max().item() for k in single) <= 1e-5


def test_rollouts_of_two_ranks_are_the_union_of_their_shards(toy_checkpoint, tmp_path, monkeypatch):
    torchrun("rollout", toy_checkpoint, tmp_path / "dist.jsonl")
    together = [json.loads(line) for line in (tmp_path / "dist.jsonl").read_text().splitlines()]

    policy, problems = load_toy_policy(toy_checkpoint), rollout_problems()
    per_rank = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as under torchrun (OMP_NUM_THREADS=1)
    try:
        for r in range(2):  # each rank's work alone, in this one process
            monkeypatch.setattr(rise, "rank", lambda r=r: r)
            monkeypatch.setattr(rise, "world_size", lambda: 2)
            per_rank.append(rise.rollout_all(policy, problems, rollout_config(), [2, 2], "oracle", sampling_seed=7))
    finally:
        torch.set_num_threads(threads)
    assert [len(p) for p in per_rank] == [4, 3]
    assert [e.problem.id for e in per_rank[0]] == [p.id for p in problems[0::2]]
    union = [per_rank[i % 2][i // 2] for i in range(len(problems))]  # back in problem order
    assert together == [data.episode_record(ep) for ep in union]
    assert [r["id"] for r in together] == [p.id for p in problems]


# --- LoRA ------------------------------------------------------------------------------------------

def test_lora_before_and_after_merging_gives_the_same_logits(tiny_checkpoints):
    model = M.load(tiny_checkpoints["llama3_gqa"], device="cpu")
    keys = set(model.state_dict())
    ids = torch.randint(5, model.args.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids)
        trainable = M.add_lora(model, rank=4, alpha=8.0)
        assert trainable == bench.lora_parameter_count(model.args, 4)  # the memory estimate counts the same
        assert torch.equal(model(ids), plain)  # B starts at zero: adapters change nothing yet
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
        adapted = model(ids)
        assert (adapted - plain).abs().max() > 1e-2
        M.merge_lora(model)
        merged = model(ids)
    assert set(model.state_dict()) == keys  # an ordinary checkpoint again: Hugging Face's keys
    assert (merged - adapted).abs().max() <= 1e-5


def test_lora_trains_only_adapters_and_the_merged_checkpoint_loads_in_transformers(toy_checkpoint, tmp_path):
    cfg = rise.Config(lora_rank=4, lora_alpha=8.0, lr=1e-2, epochs=1, batch_size=6, micro_batch=3, warmup=0.0,
                      amp=False, device="cpu")
    policy = load_toy_policy(toy_checkpoint, cfg, training=True)
    base = {k: v.clone() for k, v in policy.model.state_dict().items() if ".lora_" not in k}
    rise.train(policy.model, awr_batch(policy), cfg, policy.tokenizer.pad_id, shuffle_seed=0)
    after = policy.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base weights are frozen
    assert any(after[k].abs().max() > 0 for k in after if k.endswith("lora_B"))  # the adapters moved

    out = tmp_path / "iter1" / "policy"
    rise.save_policy(policy.model, out, toy_checkpoint, cfg)
    adapters = load_file(tmp_path / "iter1" / "adapter.safetensors")
    assert len(adapters) == 2 * 7 * policy.model.args.n_layers and all(".lora_" in k for k in adapters)
    ours, tok = M.load(out, device="cpu"), data.Tokenizer(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base_model = M.load(toy_checkpoint, device="cpu")
    ids = torch.tensor([tok.encode("<u>Ann has 3 eggs. She gets 4 more. How many eggs now?<a>")])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
        assert (ours(ids) - base_model(ids)).abs().max() > 1e-3


# --- memory ----------------------------------------------------------------------------------------

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
              "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def test_parameter_count_matches_the_model():
    args = toy.model_args(toy.Recipe(dim=64, n_layers=3), 50)
    assert bench.parameter_count(args) == sum(p.numel() for p in M.Transformer(args).parameters())
    mistral = M.ModelArgs.from_config(MISTRAL_7B)
    assert bench.parameter_count(mistral) == 7_241_732_096  # Mistral-7B's published count


def test_memory_estimate_refuses_what_does_not_fit_and_names_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))  # a config is all an estimate needs
    monkeypatch.setattr(bench, "device_memory_gib", lambda device: 80.0)  # one 80 GB GPU
    full = rise.Config(device="cuda", max_new_tokens=400)
    with pytest.raises(SystemExit, match="needs about .* GiB per device but the cuda device has 80 GiB. "
                                         "To fit, add --lora-rank 16 --grad-checkpoint"):
        bench.check_memory(tmp_path, full)
    lora = rise.Config(device="cuda", max_new_tokens=400, lora_rank=16, grad_checkpoint=True)
    estimate = bench.check_memory(tmp_path, lora)
    assert bench.peak_gib(estimate) <= 0.92 * 80
    assert estimate["training"]["frozen weights"] == pytest.approx(7.24e9 * 2 / 2 ** 30, rel=1e-2)  # bf16
    printed = capsys.readouterr()
    assert "memory estimate per cuda device (7.24B parameters" in printed.out + printed.err
    # full fine-tuning over 8 GPUs with FSDP shards weights, gradients and AdamW state 8 ways
    args = M.ModelArgs.from_config(MISTRAL_7B)
    sharded = bench.memory_estimate(args, rise.Config(fsdp=True, grad_checkpoint=True, max_new_tokens=400), "cuda", 8)
    replicated = bench.memory_estimate(args, rise.Config(grad_checkpoint=True, max_new_tokens=400), "cuda", 8)
    assert sum(sharded["training"].values()) < 0.92 * 80 < sum(replicated["training"].values())


def test_memory_estimate_plans_rollouts_in_the_dtype_rise_rolls_out_in(monkeypatch):
    # a CPU with bf16 matrix units rolls out in bf16 (rise.load_policy), so its KV cache takes half the bytes
    args = M.ModelArgs.from_config(MISTRAL_7B)
    cfg = rise.Config(device="cpu", max_new_tokens=64, rows_per_batch=256)
    monkeypatch.setattr(rise, "fast_bf16", lambda cfg: True)
    bf16 = bench.memory_estimate(args, cfg, "cpu")["rollouts"]
    forced = bench.memory_estimate(args, dataclasses.replace(cfg, dtype="float32"), "cpu")["rollouts"]
    monkeypatch.setattr(rise, "fast_bf16", lambda cfg: False)
    fp32 = bench.memory_estimate(args, cfg, "cpu")["rollouts"]
    assert fp32["weights"] == pytest.approx(2 * bf16["weights"])
    cache = "KV cache (rows_per_batch x longest state)"
    assert fp32[cache] == pytest.approx(2 * bf16[cache])
    assert forced[cache] == fp32[cache]  # --dtype overrides the machine's choice, as in rise.load_policy


def test_a_whole_tiny_lora_run_saves_adapters_and_a_merged_policy(tmp_path):
    from tests.test_rise import tiny_run_args

    rise.main(tiny_run_args(tmp_path / "run", "--lora-rank", "4", "--grad-checkpoint"))
    it = tmp_path / "run" / "iter1"
    adapters = load_file(it / "adapter.safetensors")
    assert adapters and all(".lora_" in k for k in adapters)
    umask = os.umask(0)
    os.umask(umask)  # written atomically, as an ordinary file (safetensors' own save_file makes it 600)
    assert stat.S_IMODE((it / "adapter.safetensors").stat().st_mode) == 0o666 & ~umask
    assert not list(it.glob(".*.tmp"))
    assert any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # trained
    policy = M.load(it / "policy", device="cpu")
    base = M.load(toy.build_base(checks.pretrain, toy.recipe(40)), device="cpu")
    merged, original = policy.state_dict(), base.state_dict()
    assert set(merged) == set(original)  # merged: a plain checkpoint with the base's keys
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])  # the adapters are in it
    assert torch.equal(merged["model.norm.weight"], original["model.norm.weight"])  # and nothing else moved
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora_rank"] == 4
    assert set(json.loads((tmp_path / "run" / "metrics.json").read_text())) == {"base", "iter1"}


def test_bench_estimate_memory_plans_a_7b_run_from_its_config_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    flags = ["--model", str(tmp_path), "--device", "cuda", "--max-new-tokens", "512", "--lora-rank", "16",
             "--grad-checkpoint"]
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--estimate-memory", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory estimate per cuda device (7.24B parameters" in done.stdout
    assert "rollouts: 38.0 GiB" in done.stdout and "training: 19.7 GiB" in done.stdout  # docs/gpu.md's table
