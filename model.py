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
  ModelArgs          one dataclass of hyper-parameters, read from (and written to) a config.json
  Transformer        the network; submodules are named exactly like the Hugging Face keys
                     (model.layers.0.self_attn.q_proj ...), so loading needs no name mapping
  KVCache            preallocated keys/values of a batch of ragged rows, reorderable (best-of-N)
  generate           batched greedy / temperature / top-p sampling with per-row stopping, which
                     continues a conversation when given the cache of the previous call
  load / save        safetensors in (one file or shards, strict key and shape check) and out
  LoRA               add_lora / merge_lora / lora_state_dict: low-rank adapters in plain PyTorch
The tokenizer and the chat template are data.py's (data.Tokenizer): this file deals in token ids.

Public API (other files rely on these names):
  model = load(path, dtype=None, device=None)            # eval mode; CheckpointError names what is wrong
  args = check_checkpoint(path)                          # the same checks, without reading any weight
  logits = model(tokens)                                 # (B, T) -> (B, T, vocab), no cache: training
  new_tokens = generate(model, prompts, ...)             # prompts: list of token-id lists
  save(model, path, tokenizer_dir=None, state_dict=None, dtype=None)

References: nanoGPT and gpt-fast (structure), Hugging Face transformers' modeling_llama /
modeling_mistral (the numbers we must match; tests/test_model.py checks logits to 1e-4).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
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
        # configs without `architectures` name the family in `model_type`
        by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(config.get("model_type"))
        arch = archs[0] if archs else by_type
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"config.json: architectures={archs or config.get('model_type')!r} is not "
                                  f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,))):
            if key in config and config[key] not in allowed:
                raise CheckpointError(f"config.json: {key}={config[key]!r} is not supported; supported: {allowed}")
        # transformers 5 writes `rope_parameters`; older configs say `rope_scaling` (None = plain RoPE)
        ropes = [config[name] for name in ("rope_parameters", "rope_scaling") if config.get(name)]
        kinds = [rope.get("rope_type", rope.get("type", "default")) for rope in ropes]
        if len(set(kinds)) > 1:
            raise CheckpointError(f"config.json: rope_parameters (rope_type={kinds[0]!r}) and rope_scaling "
                                  f"(rope_type={kinds[1]!r}) disagree")
        rope, kind = (ropes[0], kinds[0]) if ropes else ({}, "default")
        partial = rope.get("partial_rotary_factor", 1.0)
        if kind not in ("default", "llama3") or partial != 1.0:
            raise CheckpointError(f"config.json: rope_type={kind!r} with partial_rotary_factor={partial} is "
                                  "not supported; supported: default or llama3 on whole heads")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if kind == "llama3" and not all(k in rope for k in keys):
            raise CheckpointError(f"config.json: llama3 rope scaling lacks {[k for k in keys if k not in rope]}")
        n_heads = config["num_attention_heads"]
        eos = config.get("eos_token_id")
        return cls(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6), max_seq_len=config.get("max_position_embeddings", 4096),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            rope_scaling={k: rope[k] for k in keys} if kind == "llama3" else None,
            tie_word_embeddings=config.get("tie_word_embeddings", False), bos_id=config.get("bos_token_id"),
            # HF's Mistral config defaults the window to 4096 when the key is absent; null means none
            sliding_window=config.get("sliding_window", 4096) if arch == "MistralForCausalLM" else None,
            eos_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)),
            architecture=arch,
        )

    def to_config(self) -> dict:
        """The config.json that from_config and transformers read back into this model (a Llama's
        sliding_window is null: neither reads it)."""
        return {
            "architectures": [self.architecture], "model_type": self.architecture.removesuffix("ForCausalLM").lower(),
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": dict(rope_type="llama3", **self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_id,
            "eos_token_id": list(self.eos_ids) if len(self.eos_ids) != 1 else self.eos_ids[0],
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "sliding_window": self.sliding_window,
        }


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
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old_context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_medium = (wavelen >= old_context / s["high_freq_factor"]) & (wavelen <= old_context / s["low_freq_factor"])
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
        if x.dtype != torch.float32:
            # bf16 squares lose too much: normalise in float32 and cast back before scaling, as HF does
            return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), the products of every layer and of the output matrix. Without gradients, in bf16 on a
    CPU, oneDNN lays out a copy of the weight for its kernels once (remade when the weight changes in place),
    where F.linear lays the weight out again at every call: the same numbers, 1.2-1.8x faster at 100 to 1
    rows (docs/performance.md)."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available()):
        return F.linear(x, weight)
    if getattr(weight, "packed_version", None) != weight._version:  # new, or changed in place since
        weight.packed, weight.packed_version = torch.ops.mkldnn._reorder_linear_weight(weight.detach()), weight._version
    return torch.ops.mkldnn._linear_pointwise(x, weight.packed, None, "none", [None], "")


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        # rotate queries and keys together: one set of rotary kernels instead of two
        qk = apply_rope(torch.cat((q, k), dim=2), cos, sin)  # (B, T, H + Hkv, D)
        q, k = qk[:, :, :H], qk[:, :, H:]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, kv_len, D): this row's whole history
        if cache is not None and T == 1:
            # Decoding: the H / Hkv query heads that share a kv head become that many queries of one head,
            # so each cached key is read once.
            y = decode_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, mask)  # (B, Hkv, H / Hkv, D)
            return self.o_proj(y.reshape(B, T, H * D))
        # no mask means plain causal attention (training without a sliding window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=Hkv != H)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = Linear(args.hidden_dim, args.dim, bias=False)

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


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict({  # everything under the `model.` prefix of a Hugging Face checkpoint
            "embed_tokens": nn.Embedding(args.vocab_size, args.dim),
            "layers": nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers)),
            "norm": RMSNorm(args.dim, args.norm_eps),
        })
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute layer activations in backward (saves memory)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, T, 1, head_dim) of each position (see apply_rope): computed in float32
        (frequencies on the CPU, as HF does), then cast to the dtype HF rotates in, the model's."""
        freqs = positions[..., None].float() * rope_frequencies(self.args).to(positions.device)  # (B, T, D / 2)
        cos, sin = freqs.cos()[:, :, None], freqs.sin()[:, :, None]
        # both halves of a head share frequencies; the first half's sine is negated
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)

    def forward(self, tokens: torch.Tensor, cache: "KVCache | None" = None, valid: torch.Tensor | None = None,
                outputs: torch.Tensor | None = None, *, packed: tuple | None = None, compiled: bool = False
                ) -> torch.Tensor:
        """Logits of a (B, T) batch of token ids.

        Without `cache` (training): a plain causal pass over positions 0..T-1, returns (B, T, vocab).
        With `cache`: row b's tokens are appended at positions cache.lengths[b]..; `valid` (B, T) bool
        marks real tokens -- they must come first in each row (right padding) -- and the cache advances
        by that many per row (None: all are real). Give `valid` on the CPU: the cache's bookkeeping is
        done there, so nothing is read back from the device. `outputs` (B, T) bool: the output matrix
        runs only at these positions, returning (N, vocab) logits row by row: sampling needs each row's
        last token, training only its trained tokens, and the 49k-wide matrix is a fifth of a small
        model. `packed` (positions, segments), each (B, T), for training rows that hold a state once and
        then several attempts at it (rise.pack): a token sees segment 0 (the state) and its own segment,
        at its given position. `compiled` runs the layers through torch.compile (see compiled_body):
        generate asks for it for its decoding steps only.
        """
        B, T = tokens.shape
        device, dtype = tokens.device, self.model.embed_tokens.weight.dtype
        window = self.args.sliding_window
        mask = None  # plain causal: a pass from position 0 that no sliding window cuts
        if packed is not None:
            positions, segments = (p.to(device) for p in packed)
            mask = attention_mask(positions, positions, window, dtype, segments)
        elif cache is None:
            positions = torch.arange(T, device=device).expand(B, T)
            if window is not None and T > window:
                mask = attention_mask(positions, positions, window, dtype)
        else:
            positions = cache.advance(T, valid).to(device)  # (B, T), worked out on the CPU
            mask = attention_mask(positions, torch.arange(cache.kv_len, device=device)[None], window, dtype)
        cos, sin = self.rope(positions, dtype)
        body = compiled_body() if compiled else Transformer.body
        x = body(self, tokens, cos, sin, mask, cache)  # (B, T, dim)
        if outputs is not None:
            x = x[outputs.to(device)]  # (N, dim)
        return linear(x, self.output_weight())  # (B, T, vocab), or (N, vocab) with outputs

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


@functools.cache
def compiled_body():
    """Transformer.body through torch.compile, made on first use; opt-in with generate(compile=True).

    A decoding step on a CPU is ~20 small kernels per layer around 7 matrix-vector products, and
    launching those one by one from Python costs a large fraction of the time the products take;
    compiled, the small kernels fuse into a few C++ loops per layer. Shapes are dynamic, so it
    compiles once per shape family, not every step. Weights are read, not copied, so training
    updates show up in the next compiled step.
    """
    return torch.compile(Transformer.body, dynamic=True)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decoding step's attention: queries (B, Hkv, G, D) over the KV cache's whole buffer (B, Hkv, K, D),
    its unwritten slots hidden by the additive mask. The buffer is contiguous, so plain products read it
    about 1.9x faster than SDPA reads a slice of it on a CPU (docs/performance.md); softmax in float32."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5 + mask
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention_mask(queries: torch.Tensor, keys: torch.Tensor, window: int | None, dtype,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, K) additive mask from the positions of queries (B, T) and keys (B or 1, K): a query at
    position p sees keys at positions <= p (and > p - window) and, in packed rows, only in segment 0 or
    its own. Built once per forward, since SDPA would convert a bool mask in every layer."""
    hidden = keys[:, None, :] > queries[:, :, None]  # (B, T, K)
    if window is not None:
        hidden |= keys[:, None, :] <= queries[:, :, None] - window
    if segments is not None:
        hidden |= (segments[:, None, :] != 0) & (segments[:, None, :] != segments[:, :, None])
    return torch.zeros(hidden.shape, dtype=dtype, device=queries.device).masked_fill_(hidden, -math.inf)[:, None]


# --------------------------------------------------------------------------------------------
# KV cache of a batch of ragged conversations
# --------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of B conversations, each with its own length.

    k[layer] is (B, n_kv_heads, capacity + 1, head_dim): head-major, so that decoding attention reads each
    head's keys as one contiguous run (1.4x faster than the projections' token-major layout on an AMD
    EPYC, docs/performance.md). A forward pass writes each valid token at its row's next position with
    one index_copy_; padding tokens all go to the spare last position, which no query ever reads.
    Bookkeeping (`lengths`, where to write) lives on the CPU, so it never reads from the device.
    `pending[b]` holds tokens that belong to row b's conversation but have not been run through the
    model yet (the last sampled token of each turn): the next call of `generate` feeds them first.
    """

    def __init__(self, args: ModelArgs, batch_size: int, capacity: int, dtype, device):
        self.args, self.device = args, torch.device(device)
        self.capacity = 0
        shape = (batch_size, args.n_kv_heads, 1, args.head_dim)  # just the spare slot: grow() makes room
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on CPU: cheap to read for bookkeeping
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]
        self.grow(capacity)

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, capacity: int) -> "KVCache":
        weight = model.model.embed_tokens.weight
        return cls(model.args, batch_size, capacity, weight.dtype, weight.device)

    def grow(self, capacity: int):
        """Make room for `capacity` tokens per row, keeping what is cached. Exactly that much, one layer
        at a time: generate grows once per call (a RISE turn), and the cache is most of a rollout's memory."""
        capacity = min(capacity, self.args.max_seq_len)
        if capacity <= self.capacity:
            return
        for cached in (self.k, self.v):
            for i, t in enumerate(cached):  # the cached tokens, then zeros up to the new spare slot
                zeros = t.new_zeros(*t.shape[:2], capacity + 1 - self.capacity, t.shape[3])
                cached[i] = torch.cat((t[:, :, :self.capacity], zeros), 2)
        self.capacity = capacity

    def advance(self, T: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Take in a chunk of T tokens per row, of which valid (B, T) (CPU; None: all) are real and come
        first: sets where update() writes them and kv_len, advances `lengths`, and returns each
        token's position (B, T) (CPU). Padding gets position 0: it sees one key and is thrown away."""
        valid = torch.ones(len(self.lengths), T, dtype=torch.bool) if valid is None else valid.cpu()
        end = self.lengths + valid.sum(1)
        if int(end.max()) > self.capacity:
            raise ValueError(f"KV cache overflow: {int(end.max())} tokens > capacity {self.capacity}; "
                             "call grow() first")
        positions = (self.lengths[:, None] + torch.arange(T)).masked_fill(~valid, 0)  # (B, T)
        # padding is written to the spare slot `capacity`, which every query's mask hides
        heads = torch.arange(len(valid) * self.args.n_kv_heads).view(-1, self.args.n_kv_heads, 1)  # (B, Hkv, 1)
        slots = positions.masked_fill(~valid, self.capacity)[:, None] + heads * (self.capacity + 1)
        self._write_at = slots.flatten().to(self.device)  # (B * Hkv * T,) into the (B * Hkv * (capacity + 1)) rows
        # a decoding step attends over the whole buffer (see Attention): the mask hides what is not yet written
        self.kv_len = self.capacity + 1 if T == 1 else max(1, int(end.max()))
        self.lengths = end
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this chunk's keys/values (B, Hkv, T, D) and return the cached (B, Hkv, kv_len, D)."""
        D = self.args.head_dim
        self.k[layer].view(-1, D).index_copy_(0, self._write_at, k.reshape(-1, D))
        self.v[layer].view(-1, D).index_copy_(0, self._write_at, v.reshape(-1, D))
        return self.k[layer][:, :, :self.kv_len], self.v[layer][:, :, :self.kv_len]

    def reorder(self, index) -> None:
        """Row i becomes a copy of old row index[i]: best-of-N continues every sample from the best one."""
        index = torch.as_tensor(index, dtype=torch.long)
        for cached in (self.k, self.v):
            for i, t in enumerate(cached):  # one layer at a time: never two copies of the whole cache
                cached[i] = t.index_select(0, index.to(self.device))
        self.lengths = self.lengths[index]
        self.pending = [list(self.pending[i]) for i in index.tolist()]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: greedy at temperature 0 (or below 1e-4), else nucleus
    sampling."""
    if temperature < 1e-4:  # greedy, save for exact ties, and logits / temperature could overflow to NaN
        return logits.argmax(-1)
    # one float32 copy, then in place: each new (B, vocab) buffer is fresh pages to fault in (20 MB at 100 rows)
    probs = torch.softmax(logits.to(torch.float32, copy=True).div_(temperature), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens strictly more likely than it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[:, 0] = False  # the likeliest token always stays, however small top_p (1e-46 rounds to 0 in float32)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # inverse CDF: one uniform number per row (torch.multinomial draws one per vocabulary entry, the most
    # expensive step of CPU decoding with a 49k vocabulary); right=True never lands on a zero-probability token
    cdf = probs.cumsum_(-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int] | None], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, eos_ids=None, stop_strings=(), tokenizer=None,
             seed: int | None = None, generator=None, cache: KVCache | None = None, progress=None,
             compile: bool = False) -> list[list[int]]:
    """Sample a continuation for each prompt in one batch; returns the new token ids of each row.

    prompts: token ids per row, of any lengths. With `cache` (from an earlier call, or
        KVCache.for_model), each row's prompt is *appended* to that row's conversation: this is
        how a RISE turn continues an episode without re-encoding it. A row given None is left
        alone (its episode is over) and gets []. max_new_tokens=0 only encodes the prompts.
    Each row stops at its first token in eos_ids (default: the checkpoint's), when its decoded
        continuation contains one of stop_strings (needs a tokenizer: anything with
        decode(ids, skip_special_tokens=...), such as data.Tokenizer), or after max_new_tokens.
        The stopping token is included in the returned ids.
    temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top_p
        nucleus. `seed` (or a torch.Generator) makes sampling reproducible.
    progress: an optional tqdm bar, advanced by one per decoding step.
    compile: run the decoding steps through torch.compile (see compiled_body); the first call
        compiles (about a minute per shape family on 2 CPU cores), later ones reuse it.
    """
    B, limit = len(prompts), model.args.max_seq_len
    eos_ids = set(model.args.eos_ids if eos_ids is None else eos_ids)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    device = model.model.embed_tokens.weight.device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if cache is None:
        cache = KVCache.for_model(model, B, 0)  # grown to what this call needs below
    if len(cache.lengths) != B:
        raise ValueError(f"{B} prompts for a cache of {len(cache.lengths)} rows")

    active = [p is not None for p in prompts]
    feed = [cache.pending[b] + list(prompts[b]) if active[b] else [] for b in range(B)]
    n_new = torch.tensor([len(f) for f in feed])
    ends = (cache.lengths + n_new).tolist()  # each row's length once its new tokens are in
    for b in (b for b in range(B) if active[b]):
        if not feed[b]:
            raise ValueError(f"row {b}: empty prompt and nothing pending: nothing to condition on")
        if ends[b] > limit:
            raise ValueError(f"row {b}: the conversation is {ends[b]} tokens ({int(cache.lengths[b])} cached + "
                             f"{len(feed[b])} new), longer than the model's context of {limit} "
                             f"tokens (max_position_embeddings); shorten the prompt or the earlier turns")
    cache.pending = [[] if active[b] else cache.pending[b] for b in range(B)]  # fed below
    cache.grow(min(max(ends) + max_new_tokens, limit))

    # Prefill: every row's new tokens in one right-padded chunk (valid stays on the CPU).
    T = max(1, int(n_new.max()))
    valid = torch.arange(T) < n_new[:, None]  # (B, T)
    flat = torch.tensor([t for f in feed for t in f], dtype=torch.long)
    tokens = torch.zeros(B, T, dtype=torch.long).masked_scatter_(valid, flat)  # fills row by row, in order
    last = torch.arange(T) == (n_new[:, None] - 1).clamp(min=0)  # each row's last new token (padding is on the right)
    logits = model(tokens.to(device), cache=cache, valid=valid, outputs=last)  # (B, vocab)

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
        logits = model(next_ids[:, None], cache=cache, valid=step_valid, compiled=compile)[:, 0]
    # each row's last sampled token is not yet run through the model: the next call feeds it first
    cache.pending = [[o[-1]] if active[b] and o else cache.pending[b] for b, o in enumerate(out)]
    return out


# --------------------------------------------------------------------------------------------
# Loading and saving checkpoints
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or one CheckpointError that names it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The .safetensors files of a checkpoint directory: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / name for name in dict.fromkeys(read_json(index)["weight_map"].values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported; convert .bin with transformers)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard(s) listed in the index are missing: {missing}")
    return files


def open_weights(file: Path):
    """safe_open, reading with plain file reads into fresh memory (backend="pread"): mapped pages of a
    whole file would count against us while we also hold the converted copies. Opening checks the
    header against the file's size, so a truncated or corrupt file fails here, before any weight is read."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, "pt", backend="pread")
    except SafetensorError as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def default_placement(device=None, dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision a model runs unless told: a GPU in bfloat16 if there is one, else
    the CPU in float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def check_checkpoint(path: str | os.PathLike) -> ModelArgs:
    """The ModelArgs of a Hugging Face Llama/Mistral checkpoint directory, once all but the weights' values
    is checked: config.json, and every weight file's header (names, shapes, the file's size) against it.
    eos_ids are config.json's and generation_config.json's, where transformers' generate finds them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    args = ModelArgs.from_config(read_json(path / "config.json"))
    gen_config = path / "generation_config.json"
    if gen_config.is_file():  # instruct models often list their end-of-turn tokens only here
        eos = read_json(gen_config).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        args.eos_ids = tuple(dict.fromkeys([*args.eos_ids, *extra]))
    with torch.device("meta"):
        expected = {name: list(p.shape) for name, p in Transformer(args).state_dict().items()}
    found = {}
    for file in weight_files(path):
        with open_weights(file) as f:
            found.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    if found != expected:  # name the first ten of each kind of mismatch
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        bad = [f"{n}: {found[n]} != {expected[n]}" for n in expected.keys() & found.keys() if found[n] != expected[n]]
        raise CheckpointError(f"{path}: weights do not match config.json: missing {missing[:10]}, unexpected "
                              f"{unexpected[:10]}, shapes {bad[:10]}")
    return args


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """Load a Hugging Face Llama/Mistral checkpoint directory as a model in eval mode.

    device defaults to CUDA when available, else CPU; dtype to bfloat16 on GPU and float32 on CPU.
    The model is built on the meta device (no memory) and each tensor is read straight into its
    final dtype and device, so peak memory is the weights plus one tensor in flight.
    """
    device, dtype = default_placement(device, dtype)
    with torch.device("meta"):
        model = Transformer(check_checkpoint(path))  # every header is checked before any weight is read
    state = {}
    for file in weight_files(Path(path)):
        with open_weights(file) as f:
            state.update({name: f.get_tensor(name).to(device, dtype) for name in f.keys()})
    broken = [name for name, tensor in state.items() if not tensor.isfinite().all()]
    if broken:
        raise CheckpointError(f"{path}: weights {broken[:5]} hold NaN or infinite values in {dtype}; the checkpoint "
                              "is damaged (or too large for this dtype)")
    model.load_state_dict(state, assign=True, strict=True)
    with torch.no_grad():  # finite weights can still overflow (float16, huge norms): probe a short sequence
        if not model(torch.zeros(1, 8, dtype=torch.long, device=device)).isfinite().all():
            raise CheckpointError(f"{path}: its logits on a short probe are not finite in {dtype}; the weights are "
                                  "damaged, or overflow in this dtype (try --dtype float32)")
    return model.eval()


def save(model: Transformer, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
         state_dict: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face-format checkpoint (config.json, model.safetensors, tokenizer files) that
    both `load` and transformers read. Atomic: written beside `path`, then renamed into place.
    state_dict: the weights to write if not the model's own (a gathered FSDP state); dtype: the
    dtype to store them in (default: as they are)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*"):  # of a save that was killed halfway
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a folder like any other, not mkdtemp's private 700
    try:
        state = state_dict if state_dict is not None else model.state_dict()
        dtype = dtype or next(iter(state.values())).dtype
        config = {**model.args.to_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        # clone: safetensors refuses tensors that share memory (views of one buffer)
        save_file({k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja"):
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, tmp / name)
        for file in tmp.iterdir():  # safetensors writes 600: make them ordinary files too
            file.chmod(0o666 & ~umask)
        old = path.with_name(path.name + ".old")  # the previous checkpoint, until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
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
        self.weight = base.weight.requires_grad_(False)  # the same Parameter, now frozen
        self.register_parameter("bias", None)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + (update * self.scale).to(x.dtype)


def add_lora(model: Transformer, rank: int, alpha: float, targets=LORA_TARGETS) -> int:
    """Freeze every weight and put rank-`rank` adapters on the attention and MLP projections; returns
    the number of trainable parameters."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: Transformer) -> None:
    """Fold every adapter into its weight and put plain Linear modules back: the model is then an
    ordinary checkpoint (same keys as Hugging Face's), and computes what it did with the adapters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = Linear(child.in_features, child.out_features, bias=False, device="meta")
                merged = child.weight.float() + (child.lora_B @ child.lora_A) * child.scale  # in float32
                plain.weight = nn.Parameter(merged.detach().to(child.weight.dtype))
                setattr(module, name, plain)
    model.requires_grad_(True)


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters alone (what a LoRA run trains), by their full module names."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}
