"""Shared fixtures: tiny random Llama/Mistral checkpoints written by transformers' save_pretrained,
a tiny byte-level BPE tokenizer for them, and the real SmolLM2-135M-Instruct checkpoint (built once
from its GGUF and cached; see smollm2.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ChatML, with the BOS token up front as Llama-style templates have it.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_tiny_tokenizer(path: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE trained on a few sentences: real merges, real special tokens, BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["The answer is 42. Janet sells 16 - 3 - 4 = 9 duck eggs a day, 9 * 2 = 18 dollars.",
            "Please try again. Review your previous answer and find the mistake."] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(text, trainer)
    # as in Llama's tokenizer.json, the post-processor adds BOS (agreeing with add_bos_token below)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": TINY_CHAT_TEMPLATE, "model_max_length": 256}))


TINY_CONFIGS = {
    # Llama-2-like: multi-head attention, untied output matrix
    "llama2_mha": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4),
    # Llama-3.2-like: GQA, llama3 rope scaling (short original context so it matters), head_dim != hidden/heads
    "llama3_gqa": dict(arch="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # SmolLM-like: tied embeddings, one kv head
    "tied": dict(arch="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True),
    # Mistral v0.1-like: a sliding window far shorter than the test sequences
    "mistral_window": dict(arch="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    # a checkpoint saved as several shards with model.safetensors.index.json
    "sharded": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, shard="40KB"),
}


def make_tiny_checkpoint(path: Path, spec: dict, seed: int = 0) -> Path:
    import transformers

    spec = dict(spec)
    arch, shard = spec.pop("arch"), spec.pop("shard", None)
    write_tiny_tokenizer(path)
    vocab = json.loads((path / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"]) + len([t for t in vocab["added_tokens"]
                                                     if t["content"] not in vocab["model"]["vocab"]])
    common = dict(vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=4, pad_token_id=2)
    Config = transformers.MistralConfig if arch == "mistral" else transformers.LlamaConfig
    Model = transformers.MistralForCausalLM if arch == "mistral" else transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = Model(Config(**common, **spec))
    with torch.no_grad():  # HF initialises norms to 1; random norms make the parity test meaningful
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(root / name, spec) for name, spec in TINY_CONFIGS.items()}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from smollm2 import build_smollm2

    return build_smollm2()
