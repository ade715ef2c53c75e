"""One decoder-only transformer for GPT-2, GPT-NeoX/Pythia and LLaMA/Mistral/Qwen2/Qwen3, chosen by ModelConfig.

Math only: no I/O, no optimizer, no sampling, no distributed code. Parameter names follow Hugging Face
LLaMA (`q_proj`, `gate_proj`, ...); fused GPT-2/NeoX weights are split in `nomoat/convert/`, not here.
Legend: B batch, T time, C d_model, H query heads, K key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.config import ModelConfig


class KVCache:
    """Preallocated keys and values, written in place at positions held as a tensor.

    Attention reads a layer's whole buffer under a mask rather than a slice up to the current position, so a
    one-token step has the same shapes at every position and `torch.compile` traces it once. Each layer has its
    own buffers because a compiled in-place write through a view of one stacked tensor copies all of it.
    `pos` is 0-d when all rows move together, or (B,) when each row is its own sequence at its own position
    (continuous batching in `serve/`, where rows join and leave between steps).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None) -> None:
        shape = (batch_size, cfg.kv_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens already cached
        self.max_len = max_len

    def layer(self, i: int) -> LayerKV:
        """Layer i's buffers, which its block writes to (a block never needs its index, so that one compiled
        block step serves every layer)."""
        return LayerKV(self.k[i], self.v[i])

    def update(
        self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer(layer).update(pos, k, v)

    def narrow(self, rows: int, length: int) -> KVCache:
        """The first rows and first length positions, sharing this cache's memory: a step over a few live rows
        of a large cache then reads only those."""
        view = KVCache.__new__(KVCache)
        view.k = [k[:rows, :, :length] for k in self.k]
        view.v = [v[:rows, :, :length] for v in self.v]
        view.pos = self.pos if self.pos.dim() == 0 else self.pos[:rows]
        view.max_len = length
        return view


class LayerKV:
    """One layer's key and value buffers (B, K, max_len, D) in a KVCache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at positions pos, (T,) or per row (B, T); return the whole buffers."""
        if pos.dim() == 1:
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
        else:
            index = pos[:, None, :, None].expand_as(k)  # (B, K, T, D)
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        return self.k, self.v


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotary embeddings (arXiv:2104.09864), (length, rotary_dim), in fp32."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling == "llama3":  # slow down low frequencies, keep high ones, blend between (Llama 3.1)
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = cfg.rope_original_max_seq_len / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_seq_len / cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_seq_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen < high_wavelen, inv_freq, torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, blended)
        )
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout, as Hugging Face LLaMA and NeoX use
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x (B, H, T, D); NeoX leaves the rest untouched."""
    r = cos.size(-1)
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.numel() else out


class Norm(nn.Module):
    """cfg.norm over the model width; with `dim`, an RMSNorm over that many features whatever cfg.norm is (QK-norm
    over one head's, which Qwen3 defines as RMSNorm only)."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None) -> None:
        super().__init__()
        self.kind, self.eps = (cfg.norm if dim is None else "rmsnorm"), cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim or cfg.d_model))
        use_bias = cfg.bias and self.kind == "layernorm"
        self.bias = nn.Parameter(torch.zeros(dim or cfg.d_model)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":  # arXiv:1910.07467; computed in fp32 as LLaMA does
            return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)
        return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.h, self.k, self.d = layer, cfg.n_head, cfg.kv_heads, cfg.dim_head
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, self.h * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.k * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.k * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.d_model, bias=cfg.bias)
        self.q_norm = Norm(cfg, self.d) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, self.d) if cfg.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one, after fuse()

    def fuse(self) -> None:
        """Replace q_proj, k_proj and v_proj by one qkv_proj holding their rows, so that a decode step reads
        them in one matrix product (for inference: the parameter names change)."""
        if self.qkv_proj is not None or not all(type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj)):
            return
        self.qkv_proj = _joined(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerKV | None,
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.h * self.d, self.k * self.d, self.k * self.d], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.h, self.d).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.k, self.d).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.k, self.d).transpose(1, 2)  # (B, K, T, D)
        if self.q_norm is not None and self.k_norm is not None:  # QK-norm: each head's q and k, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, K, S, D), S = cache.max_len
            # Unwritten slots hold zeros and later tokens' slots are in the future: a query at position p sees
            # only the keys at positions <= p. With per-row positions each row has its own mask.
            mask = pos[..., None] >= torch.arange(k.size(2), device=x.device)  # (T, S) or (B, T, S)
            mask = mask.unsqueeze(-3)  # (1, T, S) or (B, 1, T, S): the same for every head
        if self.k != self.h:  # grouped-query attention: each key/value head serves H / K query heads
            k = k.repeat_interleave(self.h // self.k, dim=1)
            v = v.repeat_interleave(self.h // self.k, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.h * self.d)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":  # arXiv:2002.05202
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one, after fuse()

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one gate_up_proj (SwiGLU only), as Attention.fuse does q, k, v."""
        if self.kind != "swiglu" or self.gate_up_proj is not None:
            return
        if type(self.gate_proj) is nn.Linear and type(self.up_proj) is nn.Linear:
            self.gate_up_proj = _joined(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        approximate = "tanh" if self.kind == "gelu_tanh" else "none"
        return self.down_proj(F.gelu(self.up_proj(x), approximate=approximate))


@torch.no_grad()
def _joined(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output rows are the parts' rows in turn (the parts' memory is let go)."""
    out = sum(p.out_features for p in parts)
    bias = parts[0].bias is not None
    joined = nn.Linear(parts[0].in_features, out, bias=bias, device="meta")
    joined.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if bias:
        joined.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return joined


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.parallel, self.p = cfg.parallel_residual, cfg.dropout
        self.input_layernorm = Norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = Norm(cfg)
        self.mlp = MLP(cfg)

    # The same arguments as Attention.forward, which a block hands them to unchanged: a deliberate parallel.
    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerKV | None,
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        drop = (lambda y: F.dropout(y, self.p, training=True)) if self.p and self.training else (lambda y: y)
        if self.parallel:  # GPT-J/NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            attn = self.self_attn(self.input_layernorm(x), rope, cache, pos, mask)
            return x + drop(attn) + drop(self.mlp(self.post_attention_layernorm(x)))
        x = x + drop(self.self_attn(self.input_layernorm(x), rope, cache, pos, mask))
        return x + drop(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_emb == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            cos, sin = rope_tables(cfg, cfg.max_seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as each original does: GPT-2 scales residual outputs by 1/sqrt(2L) (GPT-2 paper, 2.3);
        NeoX uses small_init sqrt(2/5C) (arXiv:1910.05895) and wang_init 2/(L sqrt C) for outputs;
        LLaMA draws everything from N(0, init_std)."""
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std
        if cfg.init == "gpt2":
            out_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        elif cfg.init == "neox":
            std = math.sqrt(2 / (5 * cfg.d_model))
            out_std = 2 / (cfg.n_layer * math.sqrt(cfg.d_model))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, Norm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if cfg.pos_emb == "rope":  # buffers are not saved, so rebuild them after a move to the meta device
            device = self.embed_tokens.weight.device
            self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(cfg, cfg.max_seq_len))

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        hidden: bool = False,
        blocks: Sequence[Callable[..., torch.Tensor]] | None = None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V). With a cache, idx continues the cached sequence; the caller keeps
        it within cache.max_len (reading cache.pos back to check would stall every step on a device sync).
        logits_at (B,) picks one position per row, giving (B, 1, V): a prefill that needs only each prompt's next
        token then skips the vocabulary projection of every other position. segments (B, T) label the samples
        packed into each row (runs of equal ids): a token attends only within its own sample, whose positions
        start again at 0, so a packed row computes exactly what its samples would alone. hidden returns the final
        normed states (B, T, C) instead of logits, for callers that apply lm_head only where they score. blocks
        run in place of self.layers, each called as a block is, and head in place of the final norm and lm_head:
        generate.py's compiled decode step."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        mask = None
        if cache is not None:
            pos = pos + cache.pos[..., None]  # (T,), or (B, T) with per-row positions
        elif segments is not None:
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            pos = pos - torch.where(starts, pos, 0).cummax(dim=1).values  # (B, T): offset within the sample
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()).unsqueeze(1)  # (B, 1, T, T)
        x = self.embed_tokens(idx)  # (B, T, C)
        rope = None
        if self.cfg.pos_emb == "learned":
            x = x + self.embed_positions(pos)
        else:
            rope = (self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3))  # (1, T, R) or (B, 1, T, R)
        for i, layer in enumerate(blocks or self.layers):
            x = layer(x, rope, cache.layer(i) if cache is not None else None, pos, mask)
        if cache is not None:
            cache.pos += T
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)  # (B, 1, C)
        if head is not None:
            return head(x)
        x = self.norm(x)
        return x if hidden else self.lm_head(x)  # (B, T, C) or (B, T, V)

    @property
    def device(self) -> torch.device:
        """Where the model computes (read from the final norm, which is never quantized)."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its activations and KV cache."""
        return self.norm.weight.dtype

    def fuse(self) -> Transformer:
        """Join each block's q/k/v and gate/up projections into one matrix each, for inference: a decode step
        then makes 4 matrix-vector products per block instead of 7. Projections wrapped by LoRA or stored in
        NF4 stay as they are."""
        for block in self.layers:
            block.self_attn.fuse()
            block.mlp.fuse()
        return self

    @torch.no_grad()
    def transpose_weights(self) -> Transformer:
        """Keep each full-precision projection with at least as many outputs as inputs (q/k/v, gate/up, the
        output head) in column-major memory (stored (in, out), seen as the usual (out, in)): MKL then runs a
        one-row product as x @ W, streaming such weights up to 2x faster than as one dot product per output
        row; narrower ones (down_proj) measured slower that way and stay. Values, names and shapes stay; only
        the strides change, so it is for inference (safetensors saves contiguous tensors)."""
        wide = [m for m in self.modules() if type(m) is nn.Linear and m.out_features >= m.in_features]
        linears = [m for m in wide if m.weight.is_contiguous()]
        for m in linears:
            m.weight = nn.Parameter(m.weight.t().contiguous().t(), requires_grad=False)
        if self.cfg.tie_embeddings and type(self.lm_head) is nn.Linear:  # the table is the head's rows, shared
            self.embed_tokens.weight = self.lm_head.weight
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting tied weights once; non_embedding drops the input and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel() if not self.cfg.tie_embeddings else 0
            if self.cfg.pos_emb == "learned":
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores
        (PaLM, arXiv:2204.02311, appendix B)."""
        n = self.num_params(non_embedding=True)
        attn = 12 * self.cfg.n_layer * self.cfg.n_head * self.cfg.dim_head * seq_len
        return 6 * n + attn
