"""model.py against transformers (float32, max abs logit difference <= 1e-4), and generate()'s
promises: batched == one-by-one, cached == uncached, multi-turn continuation == re-encoding."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers

import data
import model as M

TOL = 1e-4


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_tokens(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", ["llama2_mha", "llama3_gqa", "tied", "mistral_window", "sharded"])
def test_full_and_cached_logits_match_transformers(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    ours = M.load(path, device="cpu")
    ref = hf_model(path)
    T = 40  # > sliding window (8) and > llama3 original context (32)
    tokens = torch.tensor([random_tokens(T, ours.args.vocab_size, 1), random_tokens(T, ours.args.vocab_size, 2)])
    with torch.no_grad():
        expected = ref(tokens).logits
        full = ours(tokens)
        assert (full - expected).abs().max() <= TOL
        picked = torch.rand(2, T, generator=torch.Generator().manual_seed(0)) < 0.3  # the output matrix only there
        assert (ours(tokens, outputs=picked) - expected[picked]).abs().max() <= TOL
        # one token at a time through the KV cache
        cache = M.KVCache.for_model(ours, 2, T)
        for buffer in cache.k + cache.v:  # a decoding step reads the whole buffer: the mask must hide what is unwritten
            buffer.fill_(100.0)
        steps = torch.cat([ours(tokens[:, t:t + 1], cache=cache) for t in range(T)], 1)
        assert (steps - expected).abs().max() <= TOL
        # two chunks through the cache: the first is plain causal, the second needs a mask
        cache = M.KVCache.for_model(ours, 2, T)
        chunks = torch.cat([ours(tokens[:, :25], cache=cache), ours(tokens[:, 25:], cache=cache)], 1)
        assert (chunks - expected).abs().max() <= TOL


def test_model_args_from_configs(tiny_checkpoints):
    args = M.ModelArgs.from_config(json.loads((tiny_checkpoints["llama3_gqa"] / "config.json").read_text()))
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.dim) == (4, 2, 24, 64)
    assert args.rope_scaling["factor"] == 8.0 and args.rope_theta == 500000.0
    args = M.ModelArgs.from_config(json.loads((tiny_checkpoints["mistral_window"] / "config.json").read_text()))
    assert args.sliding_window == 8 and args.architecture == "MistralForCausalLM"
    # the newer `rope_parameters` spelling, a list of EOS ids, and HF's Mistral window default
    cfg = {"architectures": ["MistralForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 10, "eos_token_id": [2, 7],
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    args = M.ModelArgs.from_config(cfg)
    assert args.rope_theta == 1e6 and args.rope_scaling["factor"] == 32.0 and args.eos_ids == (2, 7)
    assert args.sliding_window == 4096 and args.n_kv_heads == 4 and args.head_dim == 8


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "disagree"),
])
def test_unsupported_config_is_refused_by_name(tiny_checkpoints, tmp_path, change, field):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama2_mha"], path)
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(M.CheckpointError, match=field):
        M.load(path, device="cpu")


def test_bad_checkpoints_give_one_clear_error(tiny_checkpoints, tmp_path):
    with pytest.raises(M.CheckpointError, match="does not exist"):
        M.load(tmp_path / "nowhere")
    path = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoints["llama2_mha"], path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(M.CheckpointError, match="model.safetensors: truncated or corrupt"):
        M.load(path, device="cpu")
    with pytest.raises(M.CheckpointError, match="model.safetensors: truncated or corrupt"):
        M.check_checkpoint(path)  # the same checks, reading no weight
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(M.CheckpointError, match="model.safetensors: truncated or corrupt"):
        M.load(path, device="cpu")
    # the tokenizer is data.py's: its files are data files
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(data.DataError, match="tokenizer.json: not a readable tokenizer"):
        data.Tokenizer(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(data.MissingDataError, match="tokenizer.json: no such file"):
        data.Tokenizer(path)
    # a shard the index lists must be there
    path = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["sharded"], path)
    next(path.glob("model-00001-of-*.safetensors")).unlink()
    with pytest.raises(M.CheckpointError, match="shard.*missing.*model-00001-of-"):
        M.load(path, device="cpu")
    # a key the config does not explain is listed by name
    path = tmp_path / "extra"
    shutil.copytree(tiny_checkpoints["tied"], path)
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(M.CheckpointError, match=r"missing \['model.norm.weight'\], unexpected \['lm_head.weight'\]"):
        M.load(path, device="cpu")


def test_prompt_longer_than_context_is_refused(tiny_checkpoints):
    model = M.load(tiny_checkpoints["tied"], device="cpu")
    with pytest.raises(ValueError, match="longer than the model's context of 256"):
        M.generate(model, [[5] * 300], max_new_tokens=1)


def hf_greedy(ref, prompt, n, eos):
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                       pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama3_gqa", "mistral_window"])
def test_greedy_generate_matches_transformers_batched_and_one_by_one(tiny_checkpoints, name):
    ours = M.load(tiny_checkpoints[name], device="cpu")
    ref = hf_model(tiny_checkpoints[name])
    prompts = [random_tokens(n, ours.args.vocab_size, 10 + n) for n in (3, 17, 9, 30)]
    eos = list(ours.args.eos_ids)
    batched = M.generate(ours, prompts, max_new_tokens=20)
    for prompt, got in zip(prompts, batched):
        assert got == hf_greedy(ref, prompt, 20, eos)
        assert got == M.generate(ours, [prompt], max_new_tokens=20)[0]


def test_cached_generation_equals_uncached(tiny_checkpoints):
    model = M.load(tiny_checkpoints["mistral_window"], device="cpu")
    prompt = random_tokens(6, model.args.vocab_size, 3)
    cached = M.generate(model, [prompt], max_new_tokens=25, eos_ids=[])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(25):  # re-run the whole sequence every step, no cache
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached[0] == seq[len(prompt):]


def test_multi_turn_continuation_equals_reencoding(tiny_checkpoints):
    """Three turns on ragged rows: appending feedback to each row's cache gives exactly what a fresh
    run over the whole conversation gives, both greedy and sampled (same seed, same random stream)."""
    model = M.load(tiny_checkpoints["llama3_gqa"], device="cpu")
    V = model.args.vocab_size
    questions = [random_tokens(n, V, n) for n in (5, 12, 8)]
    feedback = [[random_tokens(n, V, 100 + n) for n in (2, 7, 4)], [random_tokens(n, V, 200 + n) for n in (6, 1, 3)]]
    eos = [7, 9]  # frequent enough that rows end their attempts at different lengths
    cache = M.KVCache.for_model(model, 3, 16)  # small on purpose: it must grow
    history = [list(q) for q in questions]
    prompts = questions
    for turn in range(3):
        attempts = M.generate(model, prompts, max_new_tokens=12, eos_ids=eos, cache=cache)
        for b in range(3):
            fresh = M.generate(model, [history[b]], max_new_tokens=12, eos_ids=eos)[0]
            assert attempts[b] == fresh, (turn, b)
            history[b] += attempts[b]
            assert int(cache.lengths[b]) + len(cache.pending[b]) == len(history[b])  # cached + pending
        if turn < 2:
            prompts = feedback[turn]
            history = [h + f for h, f in zip(history, prompts)]
    assert len({len(h) for h in history}) == 3  # the rows really were ragged


def test_sampling_is_reproducible_and_respects_top_p(tiny_checkpoints):
    model = M.load(tiny_checkpoints["tied"], device="cpu")
    prompts = [random_tokens(4, model.args.vocab_size, 1)] * 4
    a = M.generate(model, prompts, max_new_tokens=15, temperature=1.0, seed=123, eos_ids=[])
    b = M.generate(model, prompts, max_new_tokens=15, temperature=1.0, seed=123, eos_ids=[])
    c = M.generate(model, prompts, max_new_tokens=15, temperature=1.0, seed=124, eos_ids=[])
    assert a == b and a != c and len({tuple(x) for x in a}) > 1
    # a tiny nucleus keeps only the most likely token: sampling becomes greedy
    greedy = M.generate(model, prompts[:1], max_new_tokens=15, eos_ids=[])
    assert M.generate(model, prompts[:1], max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=5, eos_ids=[]) == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    kept = {int(M.sample(logits, 1.0, 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert kept == {2, 3}  # p = .64, .24: the top two reach 0.7
    # one uniform number per row through the cumulative distribution: the softmax's frequencies
    draws = M.sample(logits.repeat(40_000, 1), 1.0, 1.0, torch.Generator().manual_seed(0))
    assert (torch.bincount(draws, minlength=4) / 40_000 - torch.softmax(logits[0], -1)).abs().max() < 0.01
    M.sample(logits, 0.5, 0.9)  # sampling works on a copy: the caller's float32 logits stay as they were
    assert logits.tolist() == [[0.0, 1.0, 2.0, 3.0]]


def test_stop_strings_and_eos_stop_each_row(tiny_checkpoints):
    model, tok = M.load(tiny_checkpoints["tied"], device="cpu"), data.Tokenizer(tiny_checkpoints["tied"])
    prompts = [tok.encode("The answer is"), tok.encode("Janet sells 16 - 3")]
    free = M.generate(model, prompts, max_new_tokens=30, eos_ids=[])
    stop = tok.decode(free[0][3:6], skip_special_tokens=False)
    stopped = M.generate(model, prompts, max_new_tokens=30, eos_ids=[], stop_strings=[stop], tokenizer=tok)
    assert stop in tok.decode(stopped[0], skip_special_tokens=False)
    assert len(stopped[0]) <= 6 and free[0][:len(stopped[0])] == stopped[0]
    eos = free[1][4]
    by_eos = M.generate(model, prompts, max_new_tokens=30, eos_ids=[eos])
    assert by_eos[1][-1] == eos and eos not in by_eos[1][:-1] and len(by_eos[1]) <= 5


def test_cache_reorder_continues_from_the_chosen_row(tiny_checkpoints):
    """Best-of-N: after sampling N candidates, every row continues from the chosen one's history."""
    model = M.load(tiny_checkpoints["llama2_mha"], device="cpu")
    V = model.args.vocab_size
    q = random_tokens(5, V, 0)
    cache = M.KVCache.for_model(model, 3, 64)
    cands = M.generate(model, [q] * 3, max_new_tokens=8, temperature=1.0, seed=0, cache=cache, eos_ids=[])
    cache.reorder([1, 1, 1])
    fb = random_tokens(3, V, 9)
    nxt = M.generate(model, [fb] * 3, max_new_tokens=8, cache=cache, eos_ids=[])
    assert nxt[0] == nxt[2] == M.generate(model, [q + cands[1] + fb], max_new_tokens=8, eos_ids=[])[0]


def test_save_roundtrip_loads_in_both(tiny_checkpoints, tmp_path):
    model = M.load(tiny_checkpoints["llama3_gqa"], device="cpu")
    out = M.save(model, tmp_path / "copy", tokenizer_dir=tiny_checkpoints["llama3_gqa"])
    again = M.load(out, device="cpu")
    assert M.check_checkpoint(out) == again.args == model.args
    tokens = torch.tensor([random_tokens(20, model.args.vocab_size, 0)])
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
        assert (hf_model(out)(tokens).logits - model(tokens)).abs().max() <= TOL


def test_tiny_tokenizer_matches_transformers(tiny_checkpoints):
    path = tiny_checkpoints["llama2_mha"]
    ours = data.Tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    for text in ["The answer is 42.", "  two  spaces\nnew line", "<|im_start|>user", "é ü 漢字 🙂", ""]:
        assert ours.encode(text) == ref.encode(text)  # BOS added, as tokenizer_config.json says
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.encode("x")[0] == ours.bos_id == 1
    ours.config["add_bos_token"] = False  # tokenizer_config.json decides, not the post-processor
    assert ours.encode("x") == ref.encode("x", add_special_tokens=False)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Try again."}]
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's own imports
def test_compiled_decoding_matches_eager(tiny_checkpoints):
    """generate(compile=True) runs decoding steps through torch.compile: the same tokens as eager on
    ragged rows, a cache that grows and a conversation that continues, without a compilation per step."""
    from torch._dynamo.utils import counters

    model = M.load(tiny_checkpoints["llama3_gqa"], device="cpu")
    V = model.args.vocab_size
    prompts = [random_tokens(n, V, n) for n in (5, 12, 8)]
    feedback = [random_tokens(n, V, 50 + n) for n in (2, 7, 4)]
    graphs = counters["stats"]["unique_graphs"]
    outputs = []
    for compile in (False, True):
        cache = M.KVCache.for_model(model, 3, 16)  # small on purpose: it must grow
        first = M.generate(model, prompts, max_new_tokens=12, eos_ids=[7], cache=cache, compile=compile)
        second = M.generate(model, feedback, max_new_tokens=30, eos_ids=[], cache=cache, compile=compile)
        outputs.append((first, second))
    assert outputs[0] == outputs[1]
    assert 1 <= counters["stats"]["unique_graphs"] - graphs <= 2  # compiled, but not per step, length or capacity


@pytest.mark.parametrize("temperature, top_p", [(1e-40, 1.0), (1e-5, 1.0), (1.0, 1e-46), (1.0, 1e-30)])
def test_a_vanishing_temperature_or_nucleus_samples_the_likeliest_token(temperature, top_p):
    """Not the last vocabulary id (what NaN probabilities or an all-dropped nucleus give): the argmax."""
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0], [9.0, 1.0, 8.5, 0.0]])
    for seed in range(5):
        assert M.sample(logits, temperature, top_p, torch.Generator().manual_seed(seed)).tolist() == [1, 0]


def test_bf16_inference_products_equal_f_linear_and_follow_weight_changes(tiny_checkpoints):
    """model.linear multiplies bf16 inference on a CPU by oneDNN's laid-out copy of the weight: the same
    numbers as F.linear at any number of rows, a copy remade when the weight changes in place (as training
    changes it), and plain F.linear, with no copy, where gradients are wanted."""
    model = M.load(tiny_checkpoints["llama3_gqa"], dtype=torch.bfloat16, device="cpu")
    weight = model.model.layers[0].mlp.up_proj.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in (1, 7, 100):
            x = torch.randn(rows, weight.shape[1], generator=g).to(torch.bfloat16)
            assert torch.equal(M.linear(x, weight), F.linear(x, weight))
        assert hasattr(weight, "packed") == torch.backends.mkldnn.is_available()  # load's probe made the copies
        weight.mul_(-2.0)  # in place: the copy made before is stale now
        assert torch.equal(M.linear(x, weight), F.linear(x, weight))
        tokens = torch.tensor([random_tokens(9, model.args.vocab_size, 3)])
        packed_logits = model(tokens)
    trained = M.Transformer(model.args).to(torch.bfloat16)  # fresh weights, no copies, and gradients on
    trained.load_state_dict(model.state_dict())
    assert torch.equal(trained(tokens).detach(), packed_logits)
    assert not any(hasattr(p, "packed") for p in trained.parameters())
