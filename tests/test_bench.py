"""bench.py's GPU check, run through its whole code path on a tiny model on the CPU (the real one needs
CUDA: `python bench.py --gpu-check --device cuda`)."""

import math

import pytest

import bench
import model as M


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gpu_check_runs_a_rollout_and_an_awr_step_on_cpu(lora_rank):
    r = bench.gpu_check("tiny", device="cpu", lora_rank=lora_rank, rows=4, turns=2, prompt_len=12, attempt_tokens=10,
                        feedback_len=3, train_examples=4, micro_batch=2)
    tiny = M.Transformer(M.ModelArgs(**bench.CHECK_SIZES["tiny"]))
    assert r["parameters"] == sum(p.numel() for p in tiny.parameters())
    assert r["decode_tok_s"] > 0 and r["train_tok_s"] > 0
    assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["weights_moved"]
    assert r["example_tokens"] == 12 + 2 * 10 + 3  # the whole state up to its last attempt
    assert 0 < r["planned_rollout_gib"] < r["planned_peak_gib"]
    bench.print_gpu_check(r)


def test_the_7b_check_is_mistral_7b_shaped():
    assert bench.parameter_count(M.ModelArgs(**bench.CHECK_SIZES["7b"])) == 7_241_732_096  # Mistral-7B-v0.2's count


def test_the_training_step_comparison_runs_both_engines(tiny_checkpoints):
    """bench's AWR-step timing of model.py against transformers, on a tiny checkpoint (the code path only:
    speed is measured by `python bench.py`, never asserted)."""
    import argparse

    r = bench.worker_train(argparse.Namespace(model=str(tiny_checkpoints["tied"]), dtype="float32", device="cpu",
                                              reps=1), micro_batch=8)
    assert r["ours_train_s"] > 0 and r["hf_train_s"] > 0 and r["matmul_gflops"] > 0
    assert r["train_tokens"] == 16 * 64 and r["hf_positions"] == 16 * 420
    # rise runs each micro-batch's two states once, then their 4 attempts (64 tokens and the state's last)
    assert r["ours_positions"] == 2 * (208 + 4 * 65) + 2 * (355 + 4 * 65)


def test_the_collection_timing_counts_what_generate_samples_and_prefills(tiny_checkpoints):
    import argparse

    r = bench.worker_collect(argparse.Namespace(model=str(tiny_checkpoints["tied"]), dtype="float32", device="cpu"),
                             problems=2)
    assert 1 <= r["calls"] <= 10 and 0 < r["sampled"] <= 2 * 4 * 5 * 64  # (two calls a turn: encode, sample)
    assert r["prefilled"] > 0 and r["collect_s"] > 0 and 1 <= r["turns"] <= 5


def test_the_rollout_split_times_prefill_decoding_and_sampling_apart_and_restores_the_model(tiny_checkpoints):
    import data
    import rise

    cfg = rise.Config(model=str(tiny_checkpoints["tied"]), rows_per_batch=8, max_new_tokens=2, temperature=0.7,
                      dtype="float32")
    policy = rise.load_policy(tiny_checkpoints["tied"], cfg, data.TOY_PROMPTS)
    policy.model.args.max_seq_len = 1024  # five turns of the tiny tokenizer's long encodings (rotary: any length)
    forward, sample = M.Transformer.forward, M.sample
    rows = bench.rollout_split(policy, cfg)
    assert M.Transformer.forward is forward and M.sample is sample  # the timing wrappers are gone again
    assert [name.split(",")[0] for name, *_ in rows] == ["5 turns", "collection: best of 4 x 5 turns",
                                                         "5 parallel samples"]
    assert [name.split(", ")[-1] for name, *_ in rows] == ["8 problems", "2 problems", "1 problems"]
    for _, total, prefill, decode, sampling in rows:
        assert prefill > 0 and decode > 0 and sampling > 0 and prefill + decode + sampling <= total


def test_the_recipe_floor_recounts_the_work_a_run_did(smollm2_dir, tmp_path, monkeypatch):
    """bench.py --recipe-floor counts a finished run's work again from its files: the tokens generate sampled (to
    within re-tokenising the stored texts), exactly the tokens training trained, no more positions than training
    ran, and for every stage a floor below the time it took."""
    from collections import Counter

    import rise
    import toy

    monkeypatch.setenv("RISE_CACHE", str(smollm2_dir.parent.parent))
    monkeypatch.delenv("RISE_MODELS", raising=False)
    counted, generate, logprobs = Counter(), M.generate, rise.token_logprobs

    def counting_generate(*args, **kwargs):
        outs = generate(*args, **kwargs)
        counted["sampled"] += sum(map(len, outs))
        return outs

    def counting_logprobs(model, ids, positions, segments, targets, owner):
        counted["trained"] += int((owner >= 0).sum())
        counted["positions"] += int((segments >= 0).sum())
        return logprobs(model, ids, positions, segments, targets, owner)

    monkeypatch.setattr(M, "generate", counting_generate)
    monkeypatch.setattr(rise, "token_logprobs", counting_logprobs)
    problems = toy.write_problems(tmp_path / "arith", {"train": 4, "dev": 0, "test": 3}, steps=1, max_value=20)
    rise.main(["--model", "smollm2-135m", "--train-data", str(problems / "train.jsonl"), "--eval-data",
               str(problems / "test.jsonl"), "--turns", "2", "--samples", "2", "--max-new-tokens", "24",
               "--keep-uniform-turns", "--epochs", "1", "--batch-size", "4", "--micro-batch", "2",
               "--out", str(tmp_path / "run")])
    rates, stages = bench.recipe_floor(tmp_path / "run")
    assert [s["stage"] for s in stages] == ["evaluation of base", "collection 1", "training 1", "evaluation of iter1"]
    sampled = sum(s.get("sampled", 0) for s in stages)
    assert abs(sampled - counted["sampled"]) <= 0.05 * counted["sampled"]
    assert stages[2]["trained"] == counted["trained"] > 0 and stages[2]["positions"] <= counted["positions"]
    assert rates["gflops"] > 0 and all(0 < s["floor_s"] < s["took_s"] for s in stages)
