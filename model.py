"""
model.py -- a Llama / Mistral decoder-only transformer that loads Hugging Face checkpoints,
and KV-cached batched sampling over many turns.

RISE (Qu et al. 2024) treats one question as a multi-turn episode (paper §2): at turn t the model
reads the question and its earlier attempts and writes a new one. Sampling such episodes is most
of the compute of the method, so this file is built around one idea: a batch of conversations keeps
its KV cache across turns, and each turn only *appends* tokens (the feedback message) to each row's
cache. Rows are ragged (every attempt ends at a different length), so every row has its own length
and its own positions; nothing is ever re-encoded.

What is here, top to bottom:
  ModelArgs          one dataclass of hyper-parameters, read from a checkpoint's config.json
  Transformer        the network; submodules are named exactly like the Hugging Face keys
                     (model.layers.0.self_attn.q_proj ...), so loading needs no name mapping
  KVCache            preallocated keys/values of a batch of ragged rows, reorderable (best-of-N)
  Tokenizer          tokenizer.json through the `tokenizers` library, plus the checkpoint's own
                     Jinja chat template rendered the way transformers renders it
  load / save        safetensors in (one file or shards, strict key check, no second copy) and out
  generate           batched greedy / temperature / top-p sampling with per-row stopping, which
                     continues a conversation when given the cache of the previous call

Public API (other files rely on these names):
  model, tokenizer = load(path, dtype=None, device=None)
  logits = model(tokens)                                 # (B, T) -> (B, T, vocab), no cache: training
  ids = tokenizer.encode(text); text = tokenizer.decode(ids)
  new_tokens = generate(model, prompts, ...)             # prompts: list of token-id lists

References: nanoGPT and gpt-fast (structure), Hugging Face transformers' modeling_llama /
modeling_mistral (the numbers we must match; tests/test_model.py checks logits to 1e-4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class CheckpointError(ValueError):
    """A checkpoint directory, config or weight file that we cannot use, with the reason."""


# --------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads (query heads)
    n_kv_heads: int  # num_key_value_heads: fewer than n_heads is grouped-query attention (GQA)
    head_dim: int  # per-head width; Llama 3.2 style configs may set it != dim / n_heads
    hidden_dim: int  # intermediate_size of the SwiGLU MLP
    vocab_size: int
    norm_eps: float = 1e-5  # rms_norm_eps; the checkpoints use 1e-5, HF's class default is 1e-6
    rope_theta: float = 10000.0
    # Llama 3.x frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None is plain RoPE.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' matrix (no lm_head.weight)
    sliding_window: int | None = None  # Mistral v0.1: each query sees the last 4096 keys only
    max_seq_len: int = 4096  # max_position_embeddings
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()  # any of these ends a turn (Llama 3 instruct lists several)
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Read a Hugging Face config.json dict; refuse anything this file does not implement."""
        archs = config.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(
            config.get("model_type"), None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"config.json: architectures={archs or config.get('model_type')!r} is not "
                                  f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,))):
            if key in config and config[key] not in allowed:
                raise CheckpointError(f"config.json: {key}={config[key]!r} is not supported; supported: {allowed}")
        # transformers 5 writes `rope_parameters`; older configs say `rope_scaling` (None = plain RoPE)
        new, old = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
        kind = lambda rope: rope.get("rope_type", rope.get("type", "default"))  # noqa: E731
        if new and old and kind(new) != kind(old):
            raise CheckpointError(f"config.json: rope_parameters (rope_type={kind(new)!r}) and rope_scaling "
                                  f"(rope_type={kind(old)!r}) disagree")
        rope = new or old
        rope_type = kind(rope)
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"config.json: rope_type={rope_type!r} is not supported; supported: default, llama3")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
        rope_scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise CheckpointError(f"config.json: llama3 rope scaling lacks {missing}")
            rope_scaling = {k: rope[k] for k in keys}
        n_heads = config["num_attention_heads"]
        # HF's Mistral config defaults the window to 4096 when the key is absent; null means none.
        window = config.get("sliding_window", 4096) if arch == "MistralForCausalLM" else None
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            sliding_window=window,
            max_seq_len=config.get("max_position_embeddings", 4096),
            bos_id=config.get("bos_token_id"),
            eos_ids=eos_ids,
            architecture=arch,
        )

    def to_config(self) -> dict:
        """The config.json transformers needs to load these weights (used for models we create)."""
        config = {
            "architectures": [self.architecture],
            "model_type": "mistral" if self.architecture == "MistralForCausalLM" else "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": dict(rope_type="llama3", **self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_id,
            "eos_token_id": list(self.eos_ids) if len(self.eos_ids) != 1 else self.eos_ids[0],
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }
        if self.architecture == "MistralForCausalLM":
            config["sliding_window"] = self.sliding_window
        return config


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) of rotary embeddings, with Llama 3.x scaling if configured."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
    if args.rope_scaling is None:
        return inv_freq
    # Llama 3.1: stretch long wavelengths by `factor`, keep short ones, blend in between.
    s = args.rope_scaling
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context / s["low_freq_factor"]
    high_freq_wavelen = old_context / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old_context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face layout, where a head's first half pairs with its second
    half (not interleaved pairs as in Meta's code): x * cos + rotate_half(x) * sin, with
    rotate_half(x) = cat(-x2, x1). roll(x) = cat(x2, x1), so the minus sign lives in the table
    (signed_sin = cat(-sin, sin)) and the rotation is three kernels instead of six; on a CPU, decoding
    one token is dominated by the number of small kernels, not by their arithmetic."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, bit for bit on a CPU, where F.rms_norm runs those same
        # kernels (no faster, but one readable call)
        if x.dtype != torch.float32:
            # bf16 squares lose too much: normalise in float32 and cast back before scaling, as HF does
            return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        # rotate queries and keys together: one set of rotary kernels instead of two
        qk = apply_rope(torch.cat((q, k), dim=2), cos, sin)  # (B, T, H + Hkv, D)
        q, k = qk[:, :, :H], qk[:, :, H:]
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, kv_len, Hkv, D): this row's whole history
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, kv_len, D)
        if T == 1 and cache is not None:
            # Decoding: the H / Hkv query heads that share a kv head become that many queries of one
            # head, so each cached key and value is read once rather than once per query head.
            # No mask means every row sees all kv_len keys (see Transformer.forward).
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask)
        else:
            # no mask means plain causal attention within this chunk (training, or a cache's first chunk)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=Hkv != H).transpose(1, 2)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Everything under the `model.` prefix of a Hugging Face Llama checkpoint."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute layer activations in backward (saves memory)
        self._rope = None  # (cos, sin) tables, built lazily on the device the weights live on

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def rope_tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (n, head_dim) in float32 for positions 0..n-1 (see apply_rope);
        recomputed only when n grows."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != torch.device(device):
            n = max(n, min(self.args.max_seq_len, 4096))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), rope_frequencies(self.args)).to(device)
            # (n, head_dim): both halves of a head share frequencies; the first half's sine is negated
            self._rope = (torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1))
        return self._rope

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, valid: torch.Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False, *, compiled: bool = False) -> torch.Tensor:
        """Logits of a (B, T) batch of token ids.

        Without `cache` (training): a plain causal pass over positions 0..T-1, returns (B, T, vocab).
        With `cache`: row b's tokens are appended at positions cache.lengths[b]..; `valid` (B, T) bool
        marks real tokens -- they must come first in each row (right padding) -- and the cache advances
        by that many per row (None: all are real). Give `valid` on the CPU: the cache's bookkeeping is
        done there, so nothing is read back from the device. `last_only` returns (B, vocab) logits at
        each row's last valid token only, all that sampling needs. `return_hidden` returns the final
        normed hidden states instead of logits (rise.py computes the loss from them in chunks).
        `compiled` runs decoding steps (a cache, T == 1, no autograd) through torch.compile (see
        compiled_body); any other call ignores it.
        """
        B, T = tokens.shape
        device = tokens.device
        window = self.args.sliding_window
        compiled = compiled and cache is not None and T == 1 and not torch.is_grad_enabled()  # decoding only
        if cache is None:
            cos, sin = self.rope_tables(T, device)
            cos, sin = cos[:T][None, :, None], sin[:T][None, :, None]  # (1, T, 1, D)
            mask = None  # plain causal
            if window is not None and T > window:
                positions = torch.arange(T, device=device).expand(B, T)
                mask = attention_mask(positions, None if valid is None else valid.to(device), T, window)
        else:
            valid = None if valid is None else valid.cpu()
            if valid is not None and bool(valid.all()):
                valid = None  # no padding: the cheaper paths below may apply
            positions = cache.begin(T, valid)  # (B, T) absolute position of each token in its row (CPU)
            start = int(cache.lengths[0])
            cos, sin = self.rope_tables(cache.capacity, device)
            if cache.aligned:  # every row at the same positions: one set of rotary rows serves all
                cos, sin = cos[start:start + T][None, :, None], sin[start:start + T][None, :, None]  # (1, T, 1, D)
            else:
                pos = positions.clamp(max=cos.shape[0] - 1).to(device)  # (padding may run past the end)
                cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]  # (B, T, 1, D)
            # No mask is needed where plain attention already shows each query the right keys: all of
            # them (one new token per row) or a causal triangle (the first chunk of every row). The
            # compiled step always takes one, so that it is one graph rather than two.
            plain = cache.aligned and (T == 1 or start == 0) and (window is None or cache.kv_len <= window)
            mask = None
            if not plain or compiled:
                mask = attention_mask(positions.to(device), None if valid is None else valid.to(device),
                                      cache.kv_len, window)
        dtype = self.model.embed_tokens.weight.dtype
        if dtype != cos.dtype:  # tables are float32; rotate in the model's dtype as HF does
            cos, sin = cos.to(dtype), sin.to(dtype)
        if mask is not None:  # additive, built once: SDPA would convert a bool mask in every layer
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))

        body = compiled_body() if compiled else Transformer.body
        x = body(self, tokens, cos, sin, mask, cache)  # (B, T, dim)
        if cache is not None:
            cache.commit()
        if last_only and T > 1:
            if valid is None:
                x = x[:, -1:]
            else:  # each row's last valid token
                last = (valid.sum(1) - 1).clamp(min=0).to(device)
                x = x[torch.arange(B, device=device), last][:, None]  # (B, 1, dim)
        if return_hidden:
            return x[:, 0] if last_only else x
        logits = F.linear(x, self.output_weight())  # (B, T or 1, vocab)
        return logits[:, 0] if last_only else logits

    def body(self, tokens, cos, sin, mask, cache=None) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, dim): all the arithmetic of forward()
        but the output matrix, and none of its bookkeeping, so that torch.compile can take it whole."""
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        return self.model.norm(x)


_compiled_body = None


def compiled_body():
    """Transformer.body through torch.compile, made on first use; opt-in with generate(compile=True).

    A decoding step on a CPU is ~20 small kernels per layer around 7 matrix-vector products, and
    launching those one by one from Python costs a large fraction of the time the products take.
    Compiled, the small kernels fuse into a few C++ loops per layer. Shapes are dynamic (batch
    size, capacity and kv length vary), so it compiles twice (batch 1, and any larger batch), not
    every step: about a minute each for a 30-layer model on 2 CPU cores. Weights are read, not
    copied, so training updates show up in the next compiled step; eager stays the default.
    """
    global _compiled_body
    if _compiled_body is None:
        _compiled_body = torch.compile(Transformer.body, dynamic=True)
    return _compiled_body


def attention_mask(positions: torch.Tensor, valid: torch.Tensor | None, kv_len: int,
                   window: int | None) -> torch.Tensor:
    """(B, 1, T, kv_len) bool: query at absolute position p sees keys j <= p (and j > p - window).

    Padding queries see everything: their outputs are thrown away, and a fully masked row would
    turn softmax into NaN.
    """
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]  # (B, T, kv_len)
    if window is not None:
        allowed &= keys[None, None, :] > positions[:, :, None] - window
    if valid is not None:
        allowed |= ~valid[:, :, None]
    return allowed[:, None]


# --------------------------------------------------------------------------------------------
# KV cache of a batch of ragged conversations
# --------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of B conversations, each with its own length.

    k[layer] is (B, capacity + 1, n_kv_heads, head_dim), the layout the projections produce, so a
    forward pass writes each valid token at its row's next position with one index_copy_; padding
    tokens all go to the spare last position, which no query ever reads. Bookkeeping (`lengths`,
    where to write) lives on the CPU, so it never reads from the device. `pending[b]` holds tokens that
    belong to row b's conversation but have not been run through the model yet (the last sampled
    token of each turn): the next call of `generate` feeds them first.
    """

    def __init__(self, args: ModelArgs, batch_size: int, capacity: int, dtype, device):
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.capacity = 0
        self.k, self.v = [], []
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on CPU: cheap to read for bookkeeping
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]
        self.grow(capacity)

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, capacity: int) -> "KVCache":
        weight = model.model.embed_tokens.weight
        return cls(model.args, batch_size, capacity, weight.dtype, weight.device)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def grow(self, capacity: int):
        """Make room for `capacity` tokens per row, keeping what is cached (amortised doubling)."""
        if capacity <= self.capacity:
            return
        capacity = min(max(capacity, 2 * self.capacity), self.args.max_seq_len)
        shape = (self.batch_size, capacity + 1, self.args.n_kv_heads, self.args.head_dim)
        for store in (self.k, self.v):
            for i in range(self.args.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store[i:i + 1]:
                    new[:, :self.capacity] = store[i][:, :self.capacity]
                    store[i] = new
                else:
                    store.append(new)
        self.capacity = capacity

    def begin(self, T: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Positions (B, T) (CPU) of a chunk of T tokens per row, of which valid (B, T) (CPU; None:
        all) are real; sets where update() writes them, kv_len, and `aligned`: all rows have the
        same length and no padding, so they share positions."""
        B = self.batch_size
        n_new = torch.full((B,), T) if valid is None else valid.sum(1)
        end = self.lengths + n_new
        if int(end.max()) > self.capacity:
            raise ValueError(f"KV cache overflow: {int(end.max())} tokens > capacity {self.capacity}; "
                             "call grow() first")
        positions = self.lengths[:, None] + torch.arange(T)  # (B, T)
        # padding goes to the spare position `capacity`, which every kv slice below leaves out
        slots = positions if valid is None else positions.masked_fill(~valid, self.capacity)
        rows = torch.arange(B)[:, None] * (self.capacity + 1)
        self._write_at = (rows + slots).flatten().to(self.device)  # (B * T,) into the (B * (capacity + 1)) rows
        self._n_new = n_new
        self.kv_len = max(1, int(end.max()))
        self.aligned = valid is None and bool((self.lengths == self.lengths[0]).all())
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this chunk's keys/values (B, T, Hkv, D) and return the cached (B, kv_len, Hkv, D)."""
        width = self.args.n_kv_heads * self.args.head_dim
        self.k[layer].view(-1, width).index_copy_(0, self._write_at, k.reshape(-1, width))
        self.v[layer].view(-1, width).index_copy_(0, self._write_at, v.reshape(-1, width))
        return self.k[layer][:, :self.kv_len], self.v[layer][:, :self.kv_len]

    def commit(self):
        self.lengths += self._n_new

    def reorder(self, index) -> None:
        """Row i becomes a copy of old row index[i]: best-of-N continues every sample from the best one."""
        index = torch.as_tensor(index, dtype=torch.long)
        for store in (self.k, self.v):
            for i in range(len(store)):
                store[i] = store[i].index_select(0, index.to(self.device))
        self.lengths = self.lengths[index]
        self.pending = [list(self.pending[i]) for i in index.tolist()]

    def sequence_length(self, row: int) -> int:
        """Tokens of row `row`'s conversation so far, cached or pending."""
        return int(self.lengths[row]) + len(self.pending[row])


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int] | None], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, eos_ids=None, stop_strings=(),
             tokenizer: "Tokenizer | None" = None, seed: int | None = None, generator=None,
             cache: KVCache | None = None, progress=None, compile: bool = False) -> list[list[int]]:
    """Sample a continuation for each prompt in one batch; returns the new token ids of each row.

    prompts: token ids per row, of any lengths. With `cache` (from an earlier call, or
        KVCache.for_model), each row's prompt is *appended* to that row's conversation: this is
        how a RISE turn continues an episode without re-encoding it. A row given None is left
        alone (its episode is over) and gets [].
    Each row stops at its first token in eos_ids (default: the checkpoint's), when its decoded
        continuation contains one of stop_strings (needs tokenizer), or after max_new_tokens.
        The stopping token is included in the returned ids.
    temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top_p
        nucleus. `seed` (or a torch.Generator) makes sampling reproducible.
    progress: an optional tqdm bar, advanced by one per decoding step.
    compile: run the decoding steps through torch.compile (see compiled_body); the first call
        compiles (about a minute per shape family on 2 CPU cores), later ones reuse it.
    """
    B = len(prompts)
    eos_ids = set(model.args.eos_ids if eos_ids is None else eos_ids)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    device = model.model.embed_tokens.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if cache is None:
        need = max((len(p) for p in prompts if p is not None), default=0) + max_new_tokens
        cache = KVCache.for_model(model, B, min(need, model.args.max_seq_len))
    if cache.batch_size != B:
        raise ValueError(f"{B} prompts for a cache of {cache.batch_size} rows")

    active = [p is not None for p in prompts]
    feed = [cache.pending[b] + list(prompts[b]) if active[b] else [] for b in range(B)]
    for b in range(B):
        if active[b] and not feed[b]:
            raise ValueError(f"row {b}: empty prompt and nothing pending: nothing to condition on")
        n = int(cache.lengths[b]) + len(feed[b])
        if active[b] and n > model.args.max_seq_len:
            raise ValueError(f"row {b}: the conversation is {n} tokens ({int(cache.lengths[b])} cached + "
                             f"{len(feed[b])} new), longer than the model's context of {model.args.max_seq_len} "
                             f"tokens (max_position_embeddings); shorten the prompt or the earlier turns")
    longest = max(int(cache.lengths[b]) + len(feed[b]) for b in range(B))
    cache.grow(min(longest + max_new_tokens, model.args.max_seq_len))
    for b in range(B):
        if active[b]:
            cache.pending[b] = []

    # Prefill: every row's new tokens in one right-padded chunk.
    T = max(1, max(len(f) for f in feed))
    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, f in enumerate(feed):
        tokens[b, :len(f)] = torch.tensor(f, dtype=torch.long)
        valid[b, :len(f)] = True
    logits = model(tokens.to(device), cache=cache, valid=valid, last_only=True)  # valid stays on the CPU

    out: list[list[int]] = [[] for _ in range(B)]
    done = [not a for a in active]
    longest_stop = max((len(s) for s in stop_strings), default=0)
    for step in range(max_new_tokens):
        next_ids = sample(logits, temperature, top_p, generator)  # (B,) on the device
        next_tokens = next_ids.tolist()  # the one device -> host copy per step: stopping is decided here
        full = (cache.lengths >= cache.capacity).tolist()  # a full cache means the context is used up
        for b in range(B):
            if done[b]:
                continue
            out[b].append(next_tokens[b])
            if next_tokens[b] in eos_ids or full[b]:
                done[b] = True
            elif stop_strings:
                # a stop string spans at most len(s) tokens, each of which decodes to >= 1 character
                tail = tokenizer.decode(out[b][-(longest_stop + 1):], skip_special_tokens=False)
                done[b] = any(s in tail for s in stop_strings)
        if progress is not None:
            progress.update(1)
        if all(done) or step == max_new_tokens - 1:
            break
        # finished rows still ride along (as padding, written nowhere that is read) to keep the batch whole
        step_valid = torch.tensor([not d for d in done])[:, None] if any(done) else None
        logits = model(next_ids[:, None], cache=cache, valid=step_valid, last_only=True, compiled=compile)
    for b in range(B):
        if active[b] and out[b]:
            cache.pending[b] = [out[b][-1]]  # sampled, not yet run through the model
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------

# Used when a checkpoint has no chat template (base models): plain "User:/Assistant:" turns, each
# assistant turn closed by the EOS token so a fine-tuned model learns where an attempt ends.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _token_content(token) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """tokenizer.json (via `tokenizers`) + tokenizer_config.json: BOS rule, special tokens, chat template."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (a fast-tokenizer file is required)")
        self.tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_path = path / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {name: _token_content(self.config.get(name))
                        for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id = self.tk.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None
        self.eos_id = self.tk.token_to_id(self.special["eos_token"]) if self.special["eos_token"] else None
        self.pad_id = self.tk.token_to_id(self.special["pad_token"]) if self.special["pad_token"] else self.eos_id
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        if self.chat_template is None and (path / "chat_template.jinja").is_file():
            self.chat_template = (path / "chat_template.jinja").read_text()
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. BOS is added only where tokenizer_config.json says so (add_bos_token);
        without that key, tokenizer.json's own post-processor decides, as in transformers.
        Rendered chats carry their own BOS: encode them with add_special_tokens=False."""
        if not add_special_tokens or ("add_bos_token" not in self.config and "add_eos_token" not in self.config):
            return self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if self.config.get("add_bos_token") and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.config.get("add_eos_token") and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages [{"role", "content"}, ...] with the checkpoint's Jinja chat template, in the
        same sandboxed environment transformers uses, so the text is identical to its
        apply_chat_template(tokenize=False). Base models without a template get PLAIN_CHAT_TEMPLATE."""
        if self._template is None:
            self._template = compile_chat_template(self.chat_template or PLAIN_CHAT_TEMPLATE)
        specials = {k: v for k, v in self.special.items() if v is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **specials)


def compile_chat_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


# --------------------------------------------------------------------------------------------
# Loading and saving checkpoints
# --------------------------------------------------------------------------------------------

# safetensors dtype names -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a .safetensors file and the byte offset where tensor data starts.

    Checked against the file's size, so a truncated or corrupt file fails here, by name, before
    any weight is read.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, file is {size})")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    table.pop("__metadata__", None)
    start = 8 + n
    for name, info in table.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        expected = math.prod(info["shape"]) * torch.empty(0, dtype=_DTYPES[info["dtype"]]).element_size()
        if end - begin != expected or start + end > size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file or has the wrong size "
                                  f"(file truncated or corrupt: {size} bytes)")
    return table, start


def read_tensor(f, start: int, info: dict) -> torch.Tensor:
    """Read one tensor with plain file reads into fresh memory (no mmap: mapped pages of a whole
    file would count against us while we also hold the converted copies)."""
    begin, end = info["data_offsets"]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(memoryview(buffer.numpy())) != end - begin:
        raise CheckpointError(f"{f.name}: short read (file truncated?)")
    return buffer.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported; convert .bin with transformers)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {missing}")
    return files


def default_placement(device=None, dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a model runs unless told: a GPU in bfloat16 if there is one, else
    the CPU in float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face Llama/Mistral checkpoint directory: returns (model in eval mode, tokenizer).

    device defaults to CUDA when available, else CPU; dtype to bfloat16 on GPU and float32 on CPU.
    The model is built on the meta device (no memory) and each tensor is read straight into its
    final dtype and device, so peak memory is the weights plus one tensor in flight.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads((path / "config.json").read_text())
    args = ModelArgs.from_config(config)
    gen_config = path / "generation_config.json"
    if gen_config.is_file():  # instruct models often list their end-of-turn tokens only here
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        args.eos_ids = tuple(dict.fromkeys([*args.eos_ids, *extra]))
    tokenizer = Tokenizer(path)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in args.eos_ids:
        args.eos_ids = (*args.eos_ids, tokenizer.eos_id)

    device, dtype = default_placement(device, dtype)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}

    files = weight_files(path)
    headers = [read_safetensors_header(f) for f in files]
    found = {name: tuple(info["shape"]) for table, _ in headers for name, info in table.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                              f"{' ...' if len(unexpected) > 10 else ''}")
    bad = [f"{n}: {found[n]} != {expected[n]}" for n in expected if found[n] != expected[n]]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match config.json: {bad[:10]}")

    state = {}
    for file, (table, start) in zip(files, headers):
        with open(file, "rb") as f:
            for name, info in table.items():
                state[name] = read_tensor(f, start, info).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval(), tokenizer


def save(model: Transformer, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
         config: dict | None = None, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face-format checkpoint (config.json, model.safetensors, tokenizer files) that
    both `load` and transformers read. Atomic: written beside `path`, then renamed into place.
    state_dict: the weights to write if not the model's own (a gathered FSDP state); dtype: the
    dtype to store them in (default: as they are)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = state_dict if state_dict is not None else model.state_dict()
        dtype = dtype or next(iter(state.values())).dtype
        config = dict(config or model.args.to_config())
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # clone: safetensors refuses tensors that share memory (views of one buffer)
        state = {k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "chat_template.jinja"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy(Path(tokenizer_dir) / name, tmp / name)
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# LoRA: low-rank adapters in plain PyTorch (Hu et al. 2021)
# --------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """A frozen projection plus a trainable low-rank update: y = x W^T + (x A^T) B^T * alpha / rank.

    B starts at zero, so the model is unchanged until training moves it. The adapters are float32
    whatever the base dtype (they are few, and bf16 would round away small updates). `weight` keeps
    its name, so the Hugging Face key of the base matrix is unchanged; the adapters add
    `.lora_A` / `.lora_B` beside it.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + (update * self.scale).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + B A * scale, computed in float32, in W's dtype."""
        return (self.weight.float() + (self.lora_B @ self.lora_A) * self.scale).to(self.weight.dtype)


def add_lora(model: Transformer, rank: int, alpha: float, targets=LORA_TARGETS) -> int:
    """Freeze every weight and put rank-`rank` adapters on the attention and MLP projections; returns
    the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: Transformer) -> None:
    """Fold every adapter into its weight and put plain nn.Linear modules back: the model is then an
    ordinary checkpoint (same keys as Hugging Face's), and computes what it did with the adapters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight = nn.Parameter(child.merged_weight().detach(), requires_grad=True)
                setattr(module, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters alone (what a LoRA run trains), by their full module names."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}
