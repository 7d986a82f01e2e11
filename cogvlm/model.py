"""CogVLM in plain PyTorch: EVA2-CLIP encoder, GLU adapter, and the visual-expert LLaMA decoder.

Module and parameter names equal the Hugging Face checkpoint names (docs/spec/cogvlm.md
section 7), so a published state dict loads with no renaming.

Expert routing (docs/spec/cogvlm.md section 3): a token uses the visual expert iff it and the next
token are image tokens, i.e. `boi` and the patches. Our input layout (`prompt.layout_batch`) puts
that run at the same columns in every row of a batch, so routing is one `(start, end)` column
range: the visual expert runs on `x[:, start:end]` and the language expert on the rest: two dense
matmuls, no boolean-mask scatter. CogVLM2-Video has no visual expert (`visual_expert` off):
every token takes the language weights, and its frames' embeddings are scattered into the
slots a mask marks, wherever each row's clip sits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CogVLMConfig, CrossVisionConfig, VisionConfig

# ---------------------------------------------------------------------------------------------
# Vision encoder (EVA2-CLIP-E) and adapter
# ---------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # full attention, scale head_dim**-0.5
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """EVA2 layers normalise the *branch output* (post-norm on the branch), not the input."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = _run(layer, self.gradient_checkpointing and self.training, x)
        return x


def _run(layer: nn.Module, recompute: bool, *args: object) -> torch.Tensor:
    """Call `layer`, recomputing its activations in the backward pass when `recompute` (saves memory)."""
    if recompute:
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def on_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a row-wise layer, run on `x` flattened to one (tokens, features) matrix.

    A column slice of a batch-1 activation, `x[:, a:b]`, keeps the full row's batch stride, and
    torch counts it as contiguous (size-1 dimensions are skipped), so `.contiguous()` leaves it
    as is; a linear layer whose weight takes no gradient then runs it on CPU as `bmm` plus a
    copy instead of one matmul (bf16, 268 x 1024 by 1024 x 2816: 5.6 ms against 1.7 ms). The
    flattened view costs nothing at batch 1 (one copy for larger batches) and gives the same
    numbers.
    """
    return layer(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


class GLUAdapter(nn.Module):
    """Maps ViT features into the language model's embedding space."""

    def __init__(self, in_features: int, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, cfg.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Image → `boi, P adapted patch vectors, eoi`: the P+2 image embeddings (CogVLM2: P/4, after
    a 2x2 stride-2 conv over the grid of ViT features)."""

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = VisionTransformer(v)
        if v.downsample > 1:
            self.conv = nn.Conv2d(v.hidden_size, v.hidden_size, v.downsample, v.downsample)
        self.linear_proj = GLUAdapter(v.hidden_size, cfg)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        if cfg.cross_vision is not None:  # CogAgent adds a learned table to the patches before the adapter
            self.pos_embed = nn.Parameter(torch.zeros(cfg.vision.num_patches, cfg.vision.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # drop CLS
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed
        if hasattr(self, "conv"):  # the row-major patch sequence is a (grid x grid) image of features
            b, p, d = x.shape
            grid = int(p ** 0.5)
            x = self.conv(x.transpose(1, 2).reshape(b, d, grid, grid)).flatten(2).transpose(1, 2)
        x = on_rows(self.linear_proj, x)  # dropping CLS left a strided view: see `on_rows`
        n = x.shape[0]
        return torch.cat([self.boi.expand(n, -1, -1), x, self.eoi.expand(n, -1, -1)], dim=1)


# ---------------------------------------------------------------------------------------------
# CogAgent's high-resolution tower (EVA2-CLIP-L, docs/spec/cogagent.md section 7)
# ---------------------------------------------------------------------------------------------


def rope_2d(cfg: CrossVisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) of the tower's 2-D RoPE: the first half of each head turns with the
    patch's row, the second with its column, each frequency driving one adjacent pair of dims;
    grid coordinates are rescaled to the pretraining grid. Computed for real, also on meta."""
    half = cfg.hidden_size // cfg.num_heads // 2
    freqs = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float32, device="cpu") / half)
    t = torch.arange(cfg.grid, dtype=torch.float32, device="cpu") * cfg.rope_grid / cfg.grid
    angle = (t[:, None] * freqs).repeat_interleave(2, dim=-1)  # (G, half): pairs share an angle
    rows = angle[:, None, :].expand(-1, cfg.grid, -1)
    cols = angle[None, :, :].expand(cfg.grid, -1, -1)
    angles = torch.cat([rows, cols], dim=-1).reshape(cfg.num_patches, 2 * half)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) → (-b, a) for every adjacent pair of the last dim (interleaved RoPE)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], dim=-1).flatten(-2)


def _rotate_2d(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The rotation in float32 against the float32 tables, cast back (as the authors' EVA code)."""
    cos, sin = rope
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).to(x.dtype)


class CrossVisionAttention(nn.Module):
    """Separate q/k/v projections, biases on q and v only, and a LayerNorm on the merged heads."""

    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.inner_attn_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x) + self.q_bias
        k = self.k_proj(x)
        v = self.v_proj(x) + self.v_bias
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = (torch.cat([t[:, :, :1], _rotate_2d(t[:, :, 1:], rope)], dim=2) for t in (q, k))  # CLS: no RoPE
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = nn.LayerNorm(cfg.intermediate_size, eps=cfg.layer_norm_eps)
        self.w3 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class CrossVisionBlock(nn.Module):
    """Pre-norm, unlike the low-resolution tower's layers."""

    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = CrossVisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)


class EVA2CLIPL(nn.Module):
    """Image → (B, N, width) patch features. The last built block, the final norm and the head are
    in the checkpoint but never run (docs/spec/cogagent.md section 13, item 1)."""

    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(CrossVisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # unused
        self.head = nn.Linear(cfg.hidden_size, cfg.head_size)  # unused
        cos, sin = rope_2d(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks[:-1]:
            x = _run(block, self.gradient_checkpointing and self.training, x, rope)
        return x[:, 1:]


class CrossVisionVit(nn.Module):
    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.model = EVA2CLIPL(cfg)


class CrossVisionModel(nn.Module):
    """The high-resolution branch: tower output plus CogAgent's own position table."""

    def __init__(self, cfg: CrossVisionConfig) -> None:
        super().__init__()
        self.vit = CrossVisionVit(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, cfg.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.model(images) + self.pos_embed


# ---------------------------------------------------------------------------------------------
# Language decoder with the visual expert
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever the model's dtype; torch's fused kernel: one op per call
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def routed(x: torch.Tensor, language: nn.Module, vision: nn.Module | None,
           span: tuple[int, int] | None) -> torch.Tensor:
    """Apply `vision` to columns `span` of every row and `language` to all other columns (a
    model without the visual expert always passes span None)."""
    if span is None:
        return on_rows(language, x)
    start, end = span
    vis = on_rows(vision, x[:, start:end])
    lang = on_rows(language, torch.cat([x[:, :start], x[:, end:]], dim=1))
    return torch.cat([lang[:, :start], vis, lang[:, start:]], dim=1)


class VisionExpertMLP(nn.Module):
    """Both experts' MLPs; without the visual expert (CogVLM2-Video) only `language_mlp`."""

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.language_mlp = GatedMLP(cfg)
        self.vision_mlp = GatedMLP(cfg) if cfg.visual_expert else None

    def forward(self, x: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
        return routed(x, self.language_mlp, self.vision_mlp, span)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, rope: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, [q: heads | k: kv_heads | v: kv_heads] x hd) → rotated q (B, H, N, hd), rotated k and
    v (B, H_kv, N, hd). With H_kv = H (v1) the three blocks are the QKV output's thirds."""
    b, n, _ = qkv.shape
    qkv = qkv.view(b, n, heads + 2 * kv_heads, -1).transpose(1, 2)  # (B, heads, N, hd)
    cos, sin = rope
    qk = qkv[:, :heads + kv_heads]
    qk = qk * cos + rotate_half(qk) * sin  # rotate q and k in one go
    return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Prefill attention. No mask means no padding and no cached prefix (see `_mask`), so several
    queries take `is_causal`, which lets SDPA pick FlashAttention on CUDA instead of reading a
    materialized bias; one query attends to every slot before it. Grouped-query attention
    (CogVLM2) goes to SDPA's own `enable_gqa`: no copy of K, V or the mask per group."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[-2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


DECODE_WINDOW = 64  # the smallest cache window a decode step attends over, in slots


def decode_window(slots: int, capacity: int, doubling: bool = True) -> int:
    """The cache slots a decode step attends over when `slots` are in use (its own included), at
    least DECODE_WINDOW and at most `capacity`: with `doubling` (a compiled step) the smallest
    power of two >= `slots`, which keeps the compiled graphs per cache few (one per doubling)
    while reading at most twice the used slots; eagerly, `slots` rounded up to DECODE_WINDOW,
    since an eager step has no graph to keep and attention reads every slot of the window
    (with 8 rows of 600-800 slots, most of a CPU decode step). Slots past the last used one are
    never valid, so the window changes no result."""
    window = DECODE_WINDOW
    if not doubling:
        return min(max(window, -(-slots // window) * window), capacity)
    while window < slots:
        window *= 2
    return min(window, capacity)


def row_bucket(rows: int) -> int:
    """The batch size a bucketed decode step runs `rows` rows at: 1, 2, 4, 8, then multiples of 8
    (vLLM's CUDA-graph batch sizes): few graphs, and at most 7 idle rows past 8."""
    return 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8


def _move_slots(t: torch.Tensor, dim: int, src: int, dst: int, n: int) -> None:
    """`t`'s slots [src, src+n) along `dim` (dim 0 holds rows) to [dst, dst+n), in place; the
    ranges may overlap. `copy_` refuses overlapping memory, so an overlapping move goes in pieces
    of |src-dst| slots (never more than 4), or else row by row through a copy of the row's n
    slots: the transient is one row of one tensor, not a second cache."""
    gap = abs(src - dst)
    if gap == 0 or n == 0:
        return
    if gap >= n:
        t.narrow(dim, dst, n).copy_(t.narrow(dim, src, n))
    elif n > 4 * gap:
        for row in t:
            row.narrow(dim - 1, dst, n).copy_(row.narrow(dim - 1, src, n).clone())
    else:  # leftwards from the front, rightwards from the back: no piece reads what one wrote
        offsets = range(0, n, gap) if dst < src else reversed(range(0, n, gap))
        for o in offsets:
            c = min(gap, n - o)
            t.narrow(dim, dst + o, c).copy_(t.narrow(dim, src + o, c))


class KVCache:
    """Keys and values for `max_len` slots per row, allocated once and written in place.

    `valid` marks slots that hold real tokens (False for padding), so attention never needs
    the caller's mask again after the token was written.

    The buffers may hold more rows than the batch: `k`, `v` and `valid` are views of the first
    `batch_size` rows. Rows that leave are compacted down inside the buffers (`keep_rows`) and
    rows that join fill free rows (`concat`), so a batch whose rows change keeps its buffers and
    their addresses (what CUDA graphs captured on them read) and never holds a second copy.
    `bucketed` (a model compiled for CUDA graphs, see `compile_decode`): `row_bucket(batch)` rows
    and a power-of-two `max_len`, the static shapes the decode step's graphs are captured at.
    `slot` is the device tensor that tells the step which slot to write, set without a
    host-to-device copy; `starts` (host side) is each row's first used slot, so dropping rows
    finds the slots nobody uses without reading `valid` back.
    """

    def __init__(self, batch: int, max_len: int, cfg: CogVLMConfig, dtype: torch.dtype,
                 device: torch.device | str, bucketed: bool = False) -> None:
        rows = row_bucket(batch) if bucketed else batch
        if bucketed:
            max_len = max(DECODE_WINDOW, 1 << (max_len - 1).bit_length())
        shape = (rows, cfg.num_key_value_heads, max_len, cfg.head_dim)  # GQA: only the KV heads
        self.bucketed = bucketed
        self._k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self._valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self._static([self.slot])
        self.length = 0  # slots filled so far (same for every row)
        self.padded = False  # True once any invalid slot lies before `length`
        self.starts = [0] * batch
        # CogAgent: per layer the cross-attention k, v of each row's image, set at the prefill
        # that brings the image; they never grow with the text
        self.cross: list[CrossKV] | None = None
        self._use_rows(batch)

    def _use_rows(self, rows: int) -> None:
        self.k = [t[:rows] for t in self._k]
        self.v = [t[:rows] for t in self._v]
        self.valid = self._valid[:rows]
        self._step_views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def row_capacity(self) -> int:
        return self._valid.shape[0]

    def step_views(self, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """k, v and valid of the first `rows` buffer rows (a bucket: the live rows and idle ones
        after them), made once per batch composition, not per step."""
        if rows not in self._step_views:
            k, v, valid = [t[:rows] for t in self._k], [t[:rows] for t in self._v], self._valid[:rows]
            self._static([*k, *v, valid])
            self._step_views[rows] = k, v, valid
        return self._step_views[rows]

    def _static(self, tensors: list[torch.Tensor]) -> None:
        """Bucketed on CUDA: the graphs read and write these tensors (the very objects the step is
        given) in place, with no copy into graph-owned inputs per step; a new cache re-records
        the graphs rather than recompiling them (no guard on the address)."""
        if self.bucketed and tensors[0].device.type == "cuda":
            for t in tensors:
                torch._dynamo.mark_static_address(t, guard=False)

    def rewind(self, length: int) -> None:
        """Keep only the first `length` slots: later ones become free (and invalid) again, so
        attention over the cache never needs to know where its end was before."""
        self.valid[:, length:] = False
        self.length = length

    def keep_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only `rows` (indices, in this order) so finished rows stop costing work, in place:
        kept rows move down into the freed ones, inside the same buffers (no second cache, no
        host sync: the host knows the rows). The leading slots no kept row uses (rows that
        joined later sit right-aligned behind the ones that left) are dropped too: a batch that
        keeps admitting rows, as a busy server's does, would otherwise grow by a slot every
        step. A short shift moves each row through a copy of that row alone (`_move_slots`)."""
        keep = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        start = min((self.starts[r] for r in keep), default=self.length)
        n = self.length - start
        if keep != sorted(set(keep)):  # a reordering (the decoder never asks for one): gathered
            self._gather_rows(keep, start)
        else:
            still = next((j for j, r in enumerate(keep) if r != j), len(keep))  # rows that stay put
            for buf in (*self._k, *self._v, self._valid):
                dim = 2 if buf.ndim == 4 else 1  # the slot axis
                _move_slots(buf[:still], dim, start, 0, n)
                for j in range(still, len(keep)):  # j < keep[j]: row j's old data is gone or moved
                    buf[j].narrow(dim - 1, 0, n).copy_(buf[keep[j]].narrow(dim - 1, start, n))
            for t in [t for kv in self.cross or () for t in kv]:
                for j in range(still, len(keep)):
                    t[j].copy_(t[keep[j]])
            if self.cross is not None:
                self.cross = [(k[:len(keep)], v[:len(keep)]) for k, v in self.cross]
        self._valid[:len(keep), n:] = False
        self.starts = [self.starts[r] - start for r in keep]
        self.length = n
        self._use_rows(len(keep))

    def _gather_rows(self, keep: list[int], start: int) -> None:
        """`keep_rows` for any order of rows: each buffer gathered through a copy of its kept part."""
        idx = torch.tensor(keep, device=self._valid.device)
        n = self.length - start
        for buf in (*self._k, *self._v):
            buf[:len(keep), :, :n] = buf.index_select(0, idx)[:, :, start:self.length]
        self._valid[:len(keep), :n] = self._valid.index_select(0, idx)[:, start:self.length]
        if self.cross is not None:
            self.cross = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cross]

    @staticmethod
    def concat(a: KVCache, b: KVCache, capacity: int) -> KVCache:
        """Stack two caches' rows, right-aligned at the longer one's length (the shorter one is
        left-padded with invalid slots), with at least `capacity` slots per row. `a` (the running
        batch) is consumed: its buffers become the result's.

        When `a`'s buffers have room for `b`'s rows and `capacity` slots, `b` is written into
        its free rows in place (and `a`'s rows move right if `b` is longer): the only memory
        taken is `b`'s own cache, which the caller drops after. Otherwise new buffers are
        allocated one layer at a time, each of `a`'s layers freed as soon as it is copied, so
        at any moment there is the new cache and one old layer, not two whole caches."""
        if (a.cross is None) != (b.cross is None):
            raise ValueError("cannot batch a row with cross-attention image features with one without")
        length = max(a.length, b.length)
        ra, rb = a.batch_size, b.batch_size
        in_place = a.row_capacity >= ra + rb and a._valid.shape[1] >= capacity
        out = KVCache.__new__(KVCache)
        out.bucketed, out.slot = a.bucketed, a.slot
        if in_place:
            out._valid = a._valid
            _move_slots(out._valid[:ra], 1, 0, length - a.length, a.length)
            out._valid[:ra, :length - a.length] = False
            out._valid[ra:ra + rb] = False
        else:
            rows = row_bucket(ra + rb) if a.bucketed else ra + rb
            slots = max(DECODE_WINDOW, 1 << (capacity - 1).bit_length()) if a.bucketed else capacity
            out._valid = a._valid.new_zeros(rows, slots)
            out._valid[:ra, length - a.length:length] = a._valid[:ra, :a.length]
        out._valid[ra:ra + rb, length - b.length:length] = b.valid[:, :b.length]
        old_k, old_v = a._k, a._v
        a._k = a._v = a.k = a.v = []  # a's every reference to its layers: each is freed once moved
        a._step_views = {}
        out._k, out._v = [], []
        for old_list, b_list, new_list in ((old_k, b.k, out._k), (old_v, b.v, out._v)):
            for i, tb in enumerate(b_list):
                if in_place:
                    t = old_list[i]
                    _move_slots(t[:ra], 2, 0, length - a.length, a.length)
                else:
                    old = old_list[i]
                    t = old.new_zeros(out._valid.shape[0], old.shape[1], out._valid.shape[1], old.shape[3])
                    t[:ra, :, length - a.length:length] = old[:ra, :, :a.length]
                    old_list[i] = old = None
                t[ra:ra + rb, :, length - b.length:length] = tb[:, :, :b.length]
                new_list.append(t)
        out.length = length
        out.padded = a.padded or b.padded or a.length != b.length
        out.starts = [s + length - a.length for s in a.starts] + [s + length - b.length for s in b.starts]
        out.cross = None if a.cross is None else [
            (torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.cross, b.cross)]
        out._use_rows(ra + rb)
        return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention for one query per row: q (B, H, 1, hd), k and v (B, H_kv, T, hd), mask
    (B, 1, 1, T). SDPA (its own grouped-query attention), except on CPU in bf16/fp16, with
    grouped-query attention, or inside torch.compile, where the same math as plain matmuls is
    faster: SDPA's CPU kernel is 2-4x slower in bf16 for a single query (measured, 16 heads x 128
    slots); with groups the G = H / H_kv query heads of a group become the G query rows of one
    product with their KV head, which SDPA's kernel does not do (fp32, 700 slots, measured side
    by side: CogVLM2's 32:8 heads 13.9 -> 11.2 ms at batch 8, 1.26 -> 0.87 ms at batch 1; a
    decode step of the video benchmark's 4:1 model 7.4-8.6 -> 6.7-7.0 ms at batch 8, batch 1
    unchanged); and compiled, inductor fuses the plain math into the step (fp32 decoding +3-7%
    tok/s at batch 1, +24% at batch 8). Exact as query rows are independent: no copy of K, V or
    the mask. The math runs in fp32, as SDPA accumulates, so the results agree to the output
    rounding."""
    grouped = k.shape[1] != q.shape[1]
    if q.device.type != "cpu" or (q.dtype == torch.float32 and not grouped and not torch.compiler.is_compiling()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
    b, h, _, d = q.shape
    groups = q.float().reshape(b, k.shape[1], h // k.shape[1], d)
    scores = (groups @ k.float().transpose(-1, -2)) * d ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype).reshape(b, h, 1, d)


class RotaryFrequencies(nn.Module):
    """CogVLM2's per-layer `rotary_emb.inv_freq` checkpoint buffer (see `rope_freqs_in_weights`).
    A fresh one holds the published values: theta^(-2i/head_dim), rounded to bf16."""

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        freqs = CogVLMForCausalLM.rope_inv_freq(cfg).to(torch.bfloat16).float()
        self.register_buffer("inv_freq", freqs.to(torch.get_default_device()))


class VisionExpertAttention(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_key_value_heads
        expert = cfg.visual_expert  # CogVLM2-Video: the language weights alone
        self.language_expert_query_key_value = nn.Linear(h, cfg.qkv_size, bias=False)
        self.vision_expert_query_key_value = nn.Linear(h, cfg.qkv_size, bias=cfg.vision_qkv_bias) if expert else None
        self.language_expert_dense = nn.Linear(h, h, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False) if expert else None
        if cfg.rope_freqs_in_weights:
            self.rotary_emb = RotaryFrequencies(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                span: tuple[int, int] | None, layer: int, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = routed(x, self.language_expert_query_key_value, self.vision_expert_query_key_value, span)
        q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, rope)
        if cache is not None:
            start, end = cache.length, cache.length + n
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        out = sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return routed(out, self.language_expert_dense, self.vision_expert_dense, span)

    def decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slot: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One text token per row (B, hidden): written to cache slot `slot`, attending over the
        cache window under `mask`. Language expert only: generated tokens are never image tokens."""
        q, k, v = split_qkv(self.language_expert_query_key_value(x)[:, None], self.num_heads, self.num_kv_heads,
                            rope)
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
        out = attend_one(q, k_cache, v_cache, mask)
        return self.language_expert_dense(out.reshape(x.shape[0], -1))  # (local heads under tensor parallelism)


CrossKV = tuple[torch.Tensor, torch.Tensor]  # one layer's cross-attention keys, values (B, H, N, hd)


class CrossAttention(nn.Module):
    """CogAgent: every token attends to the high-resolution image features; no RoPE, no mask, no
    expert split. Keys/values depend on the image only, so they are computed once (`kv`)."""

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        inner = cfg.cross_compute_hidden_size
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.key_value = nn.Linear(cfg.cross_vision.hidden_size, 2 * inner, bias=False)
        self.dense = nn.Linear(inner, cfg.hidden_size, bias=False)

    def kv(self, features: torch.Tensor) -> CrossKV:
        """(B, N, width) tower output → k, v (B, H, N, hd): the two contiguous halves of key_value."""
        b, n, _ = features.shape
        k, v = self.key_value(features).view(b, n, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.query(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv)  # scale 1/sqrt(cross head dim)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = VisionExpertAttention(cfg)
        if cfg.cross_vision is not None:  # CogAgent: self-attention → cross-attention → MLP
            self.cross_attn = CrossAttention(cfg)
            self.post_cross_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # its input norm
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = VisionExpertMLP(cfg)

    def _cross(self, x: torch.Tensor, kv: CrossKV | None) -> torch.Tensor:
        if kv is None:
            return x
        return x + self.cross_attn(self.post_cross_attention_layernorm(x), kv)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                span: tuple[int, int] | None, layer: int, cache: KVCache | None,
                mask: torch.Tensor | None, cross: CrossKV | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, span, layer, cache, mask)
        x = self._cross(x, cross)
        return x + self.mlp(self.post_attention_layernorm(x), span)

    def decode(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slot: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
               cross: CrossKV | None = None) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), rope, slot, k_cache, v_cache, mask)
        x = x if cross is None else self._cross(x[:, None], cross)[:, 0]
        return x + self.mlp.language_mlp(self.post_attention_layernorm(x))


@dataclass
class Chunk:
    """The tokens of one forward call: a prefill (prompt, or a later chat turn) or a decode step.

    - `input_ids`, `position_ids`: (B, N); `attention_mask` (B, N), False at padding, or None
      when every token is real (decode steps: saves a host sync per step).
    - `images`: (R, 3, S, S) pixels for the rows `image_rows` (None: every row), or None. Their
      P+2 embeddings replace the placeholders at columns `image_start : image_start + P + 2`.
      The batch layout (`prompt.layout_batch`) keeps those columns padding in text-only rows.
    - `cross_images`: CogAgent's high-resolution pixels of the same pictures (R, 3, S', S').
    - `frames`: video frames (F, 3, S, S), every clip of the batch, row by row in frame order;
      their P+2 embeddings each fill the slots `frame_slots` (B, N) marks, in row-major order
      (docs/spec/cogvlm2-video.md section 5.3). The rows' clips may differ in length and sit at
      different columns: a video model has no visual expert to route.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    images: torch.Tensor | None = None
    image_rows: torch.Tensor | None = None
    image_start: int = 1
    cross_images: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    frame_slots: torch.Tensor | None = None


class CogVLMModel(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision = EVA2CLIPModel(cfg)
        if cfg.cross_vision is not None:
            self.cross_vision = CrossVisionModel(cfg.cross_vision)


GRAPHS_PER_MODEL = 4  # compiled decode graphs: batch 1 and batches, each with a short and a full window
BUCKET_GRAPHS_PER_MODEL = 128  # graphs of the bucketed step: row buckets x windows x cache lengths met
_COMPILED_MODELS = itertools.count(1)


class CogVLMForCausalLM(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = CogVLMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", self.rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.decode_buckets = False  # set by compile_decode(graphs=True): caches and steps in static shapes
        self.decode_compiled = False  # set by compile_decode: windows double (`decode_window`)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled
        self.model.vision.transformer.gradient_checkpointing = enabled
        if self.config.cross_vision is not None:
            self.model.cross_vision.vit.model.gradient_checkpointing = enabled

    @staticmethod
    def rope_inv_freq(cfg: CogVLMConfig) -> torch.Tensor:
        """theta^(-2i/head_dim), always computed for real (also when the model is built on meta)."""
        i = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device="cpu")
        return cfg.rope_theta ** (-i / cfg.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype  # (the head may be quantized)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(batch, max_len, self.config, self.dtype, self.device, bucketed=self.decode_buckets)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels → (B, P+2, hidden) embeddings, in the model's dtype (video frames
        too: each frame is an image to the tower, docs/spec/cogvlm2-video.md section 5.2)."""
        return self.model.vision(images.to(self.device, self.dtype))

    def cross_kv(self, images: torch.Tensor) -> list[CrossKV]:
        """CogAgent: (B, 3, S', S') high-resolution pixels → every layer's cross-attention k, v.
        The high-resolution tower's one run per image."""
        features = self.model.cross_vision(images.to(self.device, self.dtype))
        return [layer.cross_attn.kv(features) for layer in self.model.layers]

    def _cross(self, chunk: Chunk, cache: KVCache | None) -> list[CrossKV] | list[None]:
        """The chunk's images' cross k, v (kept in `cache`), or those the cache already holds."""
        if self.config.cross_vision is None:
            return [None] * self.config.num_layers
        if chunk.cross_images is not None:
            if chunk.image_rows is not None:
                raise ValueError("CogAgent needs an image in every row of a batch")
            cross = self.cross_kv(chunk.cross_images)
            if cache is not None:
                cache.cross = cross
            return cross
        if cache is None or cache.cross is None:
            raise ValueError("CogAgent cannot run without an image: its cross-attention needs the "
                             "high-resolution image features (cross_images)")
        return cache.cross

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.rope_freqs_in_weights:
            # the authors' CogVLM2: positions, angles, cos and sin in the buffer's dtype, which is
            # the model's (a bf16 model rounds positions past 256); layers share one table, as
            # the published checkpoints store the same frequencies in every layer
            inv_freq = self.model.layers[0].self_attn.rotary_emb.inv_freq
        else:
            inv_freq = self.inv_freq.float()
        freqs = position_ids.to(inv_freq.device, inv_freq.dtype)[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, N, hd)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _mask(self, chunk: Chunk, cache: KVCache | None) -> torch.Tensor | None:
        """Boolean (B, 1, N, T) mask: causal over real tokens, built once for all layers. Each
        query also sees itself, so padding positions stay finite (their outputs are never used).
        None where no padding is involved and the chunk is one token or starts the cache: then
        attention needs no mask (`sdpa`)."""
        b, n = chunk.input_ids.shape
        start = cache.length if cache is not None else 0
        end = start + n
        real = chunk.attention_mask
        has_padding = real is not None and not bool(real.all())
        if real is None:
            real = torch.ones(b, n, dtype=torch.bool, device=self.device)
        if cache is None:
            valid, padded = real.to(self.device), has_padding
        else:
            cache.valid[:, start:end] = real
            cache.padded = cache.padded or has_padding
            valid, padded = cache.valid[:, :end], cache.padded
        if not padded and (n == 1 or start == 0):
            return None  # one new token attends to every slot; a fresh prompt is plain causal (`sdpa`)
        q_pos = torch.arange(start, end, device=valid.device)[:, None]
        k_pos = torch.arange(end, device=valid.device)[None, :]
        allowed = ((k_pos <= q_pos) & valid[:, None, :]) | (k_pos == q_pos)  # (B, N, T)
        return allowed[:, None]

    def forward(self, chunk: Chunk, cache: KVCache | None = None,
                last_only: bool = False, at: torch.Tensor | None = None) -> torch.Tensor:
        """Run `chunk` after the `cache.length` tokens already in `cache` (None: no history, as in
        training) and return float32 logits (B, N, vocab), or with `last_only` (B, vocab) at each
        row's last real token, or with `at` ((B, N) bool) (K, vocab) at its K true positions in
        row-major order: training needs logits only where a label is, a few answer tokens of
        each prompt, and at every position they would be its largest activation (14 bytes per
        vocabulary entry per token with the loss's fp32 copies and gradient)."""
        n = chunk.input_ids.shape[1]
        if cache is not None and cache.length + n > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; "
                             f"{cache.length} used + {n} new do not fit")
        x = self.model.embed_tokens(chunk.input_ids.to(self.device))
        span = None
        if chunk.images is not None:
            img = self.encode_images(chunk.images)
            start, end = chunk.image_start, chunk.image_start + img.shape[1]
            rows = slice(None) if chunk.image_rows is None else chunk.image_rows.to(self.device)
            x[rows, start:end] = img
            if self.config.visual_expert:
                span = (start, end - 1)  # boi + patches; eoi is routed to the language expert
        if chunk.frames is not None:
            x[chunk.frame_slots.to(self.device)] = self.encode_images(chunk.frames).flatten(0, 1)
        cross = self._cross(chunk, cache)
        rope = self._rope(chunk.position_ids)
        mask = self._mask(chunk, cache)
        recompute = self.gradient_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.model.layers):
            x = _run(layer, recompute, x, rope, span, i, cache, mask, cross[i])
        if cache is not None:
            cache.length += n
        if last_only and chunk.attention_mask is None:
            x = x[:, -1]
        elif last_only:  # the last real token of each row (rows may end in padding)
            last = (chunk.attention_mask.to(self.device) * torch.arange(n, device=self.device)).argmax(-1)
            x = x[torch.arange(x.shape[0], device=self.device), last]
        elif at is not None:
            x = x[at.to(self.device)]
        return self.lm_head(self.model.norm(x)).float()

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The hot loop of generation: one text token per row, `tokens` and `positions` (B,) on
        the model's device, goes to slot `cache.length`; returns float32 next-token logits (B, vocab).

        Equal to `forward` on a one-token chunk, but lean and shape-stable: no expert routing, no
        host syncs and no host-to-device copies (the slot is set on the device with `fill_`), and
        attention reads a window of the cache that grows as it fills (`decode_window`). In a
        bucketed cache (`compile_decode(graphs=True)`) the step runs at `row_bucket` rows: the
        idle rows after the batch's compute what nobody reads, so rows that join or leave within
        a bucket reuse its graph."""
        slot = cache.length
        if slot >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; all are used")
        if self.config.cross_vision is not None and cache.cross is None:
            raise ValueError("CogAgent cannot decode without an image's cross-attention keys/values")
        rows = cache.batch_size
        # CogAgent's cross keys/values are exactly the batch's rows: it runs unbucketed
        bucket = row_bucket(rows) if cache.bucketed and cache.cross is None else rows
        k, v, valid = cache.step_views(bucket)
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        if bucket > rows:
            tokens, positions = F.pad(tokens, (0, bucket - rows)), F.pad(positions, (0, bucket - rows))
        cache.slot.fill_(slot)
        window = decode_window(slot + 1, cache.max_len, self.decode_compiled)
        logits = self._decode(tokens, positions, cache.slot, k, v, valid, window, cache.cross)
        cache.length += 1
        return logits[:rows]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], valid: torch.Tensor,
                window: int, cross: list[CrossKV] | None = None) -> torch.Tensor:
        # 2-D activations (B, hidden) throughout: inductor packs a linear layer's weight only
        # when its input is a matrix
        x = self.model.embed_tokens(tokens)
        rope = self._rope(positions[:, None])
        valid.index_fill_(1, slot, True)
        mask = valid[:, None, None, :window]  # once per step; later slots are never valid (KVCache.rewind)
        for i, (layer, k, v) in enumerate(zip(self.model.layers, k_cache, v_cache)):
            x = layer.decode(x, rope, slot, k[:, :, :window], v[:, :, :window], mask,
                             None if cross is None else cross[i])
        return self.lm_head(self.model.norm(x)).float()

    def compile_decode(self, graphs: bool | None = None) -> None:
        """Run `decode_step` through torch.compile, one of two ways.

        `graphs` (the default on CUDA): the step is compiled whole (`fullgraph`) at static shapes,
        the row bucket and window of each step (`row_bucket`, `decode_window`) and the cache's
        power-of-two length, and on CUDA captured as CUDA graphs (`mode="reduce-overhead"`):
        decode there is launch-bound, ~30 kernels per layer that a graph replays in one launch.
        The cache buffers and its slot tensor are static addresses the graphs write in place.
        Each bucket compiles once; weights stay inputs (no freezing: that is a CPU layout
        choice, and would hold a copy of the weights per graph). On CPU this mode is what the
        tests check the bucketing with.

        Otherwise (the default on CPU): inductor fuses the many small per-token ops (they
        dominate CPU decoding at batch 1). Batches are compiled with inductor's weight
        freezing, which keeps the decode weights as constants in its packed matmul layout (a
        plain matmul repacks them on every call). Batch 1 in fp32 is compiled without: MKL's
        plain matrix-vector product is as fast there, and freezing would hold a copy in MKL's
        packed layout, 1.2-3.3x the size of each weight (measured); bf16 has no fast plain
        one-row product on CPU, so it is frozen at every batch size. Inference only. Shapes are
        compiled dynamic, so there are at most two graphs for batch 1 and two for larger batches
        (a window that spans the whole cache compiles separately), and each frozen one holds its
        own packed copy of the language weights: memory, not speed, is what `compile` costs."""
        from torch._dynamo import config as dynamo_config
        from torch._inductor import config as inductor_config

        graphs = self.device.type == "cuda" if graphs is None else graphs
        self.decode_compiled = True
        # every model's step is the code of this one method, whose graphs dynamo keeps for the
        # whole process, running it eagerly once there are `recompile_limit` of them; a frozen
        # graph holds one model's weights, so each model adds its own: make room for its graphs,
        # or a third compiled bf16 model in one process (a notebook that reloads, an evaluation
        # of several checkpoints) would silently decode uncompiled
        limit = (BUCKET_GRAPHS_PER_MODEL if graphs else GRAPHS_PER_MODEL) * next(_COMPILED_MODELS)
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, limit)
        if graphs:
            self.decode_buckets = True
            cuda = self.device.type == "cuda"
            step = torch.compile(self._decode, mode="reduce-overhead" if cuda else None, fullgraph=True,
                                 dynamic=False)

            def graph_step(*args: object) -> torch.Tensor:
                if not cuda:
                    return step(*args)
                # a new iteration: the graphs' output memory is reused by the next replay, so the
                # logits are copied out (one small kernel) for callers that keep them a while
                torch.compiler.cudagraph_mark_step_begin()
                return step(*args).clone()

            self._decode = graph_step
            return
        step = torch.compile(self._decode, dynamic=True)
        freeze_one_row = self.dtype != torch.float32

        def frozen_step(tokens: torch.Tensor, *args: object) -> torch.Tensor:
            # inductor decides on freezing from its global config when it compiles (the first
            # call with new shapes); torch.compile's `options` reach it too late for that
            with inductor_config.patch(freezing=freeze_one_row or tokens.shape[0] > 1):
                return step(tokens, *args)

        self._decode = frozen_step
