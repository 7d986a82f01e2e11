"""Memory planning on the meta device: what a model needs per GPU for a given split (`--tp`),
quantization, dtype, batch and context, computed from its config alone (no download).

Weights are counted exactly from the model's shapes on the meta device, cut as `split_rule`
cuts each tensor across ranks (as `ParallelCogVLM` does); quantized ones from the real stored
layout (`weight_bytes`: packed weights, scales, padding); the KV cache exactly from its shape;
activations are an estimate: the largest
set of tensors alive at once in the prefill of one image prompt (a ViT layer at the model's image
size, or a decoder layer over `max_length` tokens); a padded batch's attention mask is counted as
the model and SDPA materialize it (`attention_bytes`: quadratic in the length, the term that grows
fastest; one prompt needs none); `runtime_overhead` itemizes the CUDA context, cuBLAS workspaces, NCCL buffers (tensor
parallel only) and allocator slack. A card is planned by what it offers CUDA, not its nominal
size (`usable_memory`: a "24 GB" card has 23.7 GiB). `cogvlm plan` prints it; loads on CUDA run
`check_fits` first, so a model that cannot fit fails with this advice instead of out of memory.

`plan`, `rank_weight_bytes` and `weight_bytes` check the split (`check_split`), then hand over to
private twins that trust it; `check_fits` goes straight to the twins, because the load that calls
it has checked the split already, and a load checks it once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from .config import CogVLMConfig
from .checkpoint import expected_shapes
from .errors import PlanError, TensorParallelError
from .model import CogVLMForCausalLM
from .quantize import DEQUANT_ROWS, Int4Linear, Int8Linear, QuantConfig, quantize_layout, route
from .sharding import check_split, rank_shape
from .tp import ParallelCogVLM

GiB = 2**30
MiB = 2**20

# What a device spends outside the model's tensors. Estimates from the sources named, not
# measured by us (no GPU run yet); benchmarks/gpu.py records the real peak beside them.
# The CUDA context with lazy module loading (PyTorch's default since CUDA 11.7): nvidia-smi shows
# 300-500 MiB used after torch.cuda.init() on A100/H100-class cards, before any tensor.
CUDA_CONTEXT = 512 * MiB
# PyTorch's cuBLAS workspace per handle, CUBLAS_WORKSPACE_CONFIG's default: 32 MiB on Hopper (sm90),
# 8 MiB + 128 KiB elsewhere (aten/src/ATen/cuda/CublasHandlePool.cpp); cuBLASLt takes a second
# workspace of the same size. Hopper's figure, twice.
CUBLAS_WORKSPACE = 2 * 32 * MiB
# NCCL's buffers, only with tensor parallelism: NCCL_BUFFSIZE (4 MiB) for the Simple protocol plus
# about 5 MiB for LL and LL128, for sending and receiving, per channel and peer; NVLink opens
# 16-32 channels (NCCL docs, "Environment variables"): 2 x 9 MiB x 32 = 576 MiB, about 0.5 GiB.
NCCL_BUFFERS = 512 * MiB
# The caching allocator keeps freed blocks for reuse and splits segments of 2 MiB (small) or the
# request rounded up (large); prefill activations of shapes that never recur stay cached but unusable
# (fragmentation). A quarter GiB; `cogvlm serve` sets expandable_segments, which returns most of it.
ALLOCATOR_SLACK = 256 * MiB


@lru_cache(maxsize=16)
def _shapes(config: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(config)


def rank_weight_bytes(config: CogVLMConfig, world: int = 1, dtype: torch.dtype = torch.bfloat16,
                      quant_bits: int | None = None, group_size: int = 128, vision_bits: int | None = None) -> int:
    """Bytes of the weights one rank of `world` holds: each tensor of the model's meta-device
    shapes as `split_rule` cuts it (every rank holds the same). Quantized, `weight_bytes` of the
    modules a rank builds (each slice with its own padding and scales)."""
    check_split(config, world)
    return _rank_weight_bytes(config, world, dtype, quant_bits, group_size, vision_bits)


def _rank_weight_bytes(config: CogVLMConfig, world: int, dtype: torch.dtype, quant_bits: int | None,
                       group_size: int, vision_bits: int | None) -> int:
    """`rank_weight_bytes` for a split already checked."""
    if quant_bits is not None or vision_bits is not None:
        return _weight_bytes(config, dtype, quant_bits, group_size, vision_bits, world)["total"]
    size = torch.finfo(dtype).bits // 8
    return sum(math.prod(rank_shape(name, shape, world)) * size for name, shape in _shapes(config).items())


PARTS = ("embeddings", "decoder", "lm_head", "vision")


def _part(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith(("model.vision.", "model.cross_vision.")):
        return "vision"
    if name.startswith("lm_head."):
        return "lm_head"
    return "decoder"  # model.layers.* and model.norm


def weight_bytes(config: CogVLMConfig, dtype: torch.dtype = torch.bfloat16, quant_bits: int | None = None,
                 group_size: int = 128, vision_bits: int | None = None, world: int = 1) -> dict[str, int]:
    """Bytes of every stored tensor on one device, by part: embeddings, decoder (both experts,
    norms), lm_head, vision (ViT + adapter, CogAgent's high-resolution tower), total; and
    decode_step, what one text token's step reads (language expert, norms, lm_head and one
    embedding row; not the visual expert or the ViT). Counted from the model as a load builds it
    on the meta device, quantized modules included (`quantize_layout`): the packed layout's
    bytes, scales and padding. `dtype`: the tensors left in full precision. With `world` > 1,
    those of one tensor-parallel rank (`ParallelCogVLM`)."""
    if world > 1:
        check_split(config, world)
    return _weight_bytes(config, dtype, quant_bits, group_size, vision_bits, world)


def _meta_model(config: CogVLMConfig, dtype: torch.dtype, quant_bits: int | None, group_size: int,
                vision_bits: int | None, world: int) -> torch.nn.Module:
    """The model (one rank's, with `world` > 1) as a load builds it, on the meta device."""
    with torch.device("meta"):
        model = (ParallelCogVLM(config, 0, world) if world > 1 else CogVLMForCausalLM(config)).to(dtype)
    if quant_bits is not None or vision_bits is not None:
        quantize_layout(model, QuantConfig(quant_bits, group_size, vision_bits))
    return model


def dequant_buffer_bytes(config: CogVLMConfig, world: int = 1, quant_bits: int | None = None, group_size: int = 128,
                         vision_bits: int | None = None, batch: int = 1) -> int:
    """CUDA's one shared bf16 buffer that packed layers are dequantized into (`quantize.scratch`):
    as large as the largest layer `quantize.route` sends there while `batch` prompts prefill and
    decode. Every int8 layer goes (the output head included); an int4 layer from DEQUANT_ROWS
    rows, which a prefill's decoder and ViT layers reach and the output head (one row per prompt)
    only at that batch."""
    return _dequant_buffer(_meta_model(config, torch.bfloat16, quant_bits, group_size, vision_bits, world), batch)


def _dequant_buffer(model: torch.nn.Module, batch: int) -> int:
    """`dequant_buffer_bytes` of a model built by `_meta_model`."""
    return max((2 * math.prod(m.dequantized_shape) for name, m in model.named_modules()
                if isinstance(m, (Int4Linear, Int8Linear))
                and route("cuda", 8 if isinstance(m, Int8Linear) else 4,
                          batch if name == "lm_head" else DEQUANT_ROWS[("cuda", 4)]) == "dequant"), default=0)


def _weight_bytes(config: CogVLMConfig, dtype: torch.dtype, quant_bits: int | None, group_size: int,
                  vision_bits: int | None, world: int) -> dict[str, int]:
    """`weight_bytes` for a split already checked (`ParallelCogVLM` trusts it)."""
    return _bytes_by_part(_meta_model(config, dtype, quant_bits, group_size, vision_bits, world), config, dtype)


def _bytes_by_part(model: torch.nn.Module, config: CogVLMConfig, dtype: torch.dtype) -> dict[str, int]:
    """`weight_bytes` of a model built by `_meta_model`."""
    out = dict.fromkeys(PARTS, 0)
    step = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        part = _part(name)
        out[part] += nbytes
        if part in ("decoder", "lm_head") and "vision_" not in name:
            step += nbytes
    out["total"] = sum(out[p] for p in PARTS)
    out["decode_step"] = step + config.hidden_size * dtype.itemsize
    return out


def kv_cache_bytes(config: CogVLMConfig, batch: int, length: int, dtype: torch.dtype = torch.bfloat16,
                   world: int = 1) -> int:
    """Keys and values of every layer for `batch` rows of `length` slots (one rank's heads of
    `world`), plus the slots' validity mask."""
    size = torch.finfo(dtype).bits // 8
    kv_width = config.num_key_value_heads * config.head_dim  # GQA (CogVLM2): only the KV heads
    total = 2 * config.num_layers * batch * length * (kv_width // world) * size + batch * length
    if config.cross_vision is not None:  # CogAgent: each row's image keys/values for cross-attention
        cross = config.cross_vision.num_patches * config.cross_compute_hidden_size // world
        total += 2 * config.num_layers * batch * cross * size
    return total


def runtime_overhead(tp: int) -> dict[str, int]:
    """What each device spends besides tensors, by item (see the constants' sources); NCCL only
    when the model is split, since one device never starts a communicator."""
    items = {"CUDA context": CUDA_CONTEXT, "cuBLAS workspaces": CUBLAS_WORKSPACE}
    if tp > 1:
        items["NCCL buffers"] = NCCL_BUFFERS
    items["allocator slack"] = ALLOCATOR_SLACK
    return items


# SDPA's memory-efficient kernel (the one CUDA picks when a mask is passed) needs the bias rows
# aligned to 8 elements; a bias whose last dimension is not a multiple is copied into a padded one.
MEM_EFF_ALIGNMENT = 8


def attention_bytes(config: CogVLMConfig, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                    max_length: int = 2048) -> int:
    """The prefill's attention mask at its peak, as the code allocates it: quadratic in the length,
    so at CogVLM2's 8K it can be most of the activations. Over `max_length` = N = T tokens:

    - one prompt (or prompts of one length): no mask at all. `CogVLMForCausalLM._mask` returns
      None and `sdpa` passes `is_causal`, which FlashAttention / the memory-efficient kernel
      apply without materializing anything; grouped-query attention goes through SDPA's
      `enable_gqa`, so no head group copies anything either;
    - a padded batch (B > 1 prompts of different lengths, the case a plan must cover): `_mask`'s
      boolean (B, 1, N, T), alive through every layer; SDPA turns it into an additive bias in the
      query's dtype (`convert_boolean_attn_mask`: where(mask.logical_not(), -inf, 0)), a second
      copy at 2 bytes an element, plus the inverted boolean while it is built (1 byte); the
      memory-efficient kernel then pads a bias whose rows are not 8-aligned (a copy again, which
      replaces the inverted mask at the peak).

    Heads are not multiplied in: the mask broadcasts over them by strides. A tensor-parallel rank
    holds the same mask, so `world` does not divide it."""
    if batch == 1:
        return 0
    n = max_length
    elements = batch * n * n
    bias = elements * dtype.itemsize
    padded = batch * n * -(-n // MEM_EFF_ALIGNMENT) * MEM_EFF_ALIGNMENT * dtype.itemsize if n % MEM_EFF_ALIGNMENT else 0
    return elements + bias + max(elements, padded)  # the inverted mask is freed before padding


def images_per_prompt(config: CogVLMConfig, max_length: int) -> int:
    """Pictures the tower encodes at once for one prompt: one image, or for a video model as many
    frames as fit in `max_length` slots (image_tokens each; the API takes any count that fits)."""
    return max(1, (max_length - 1) // config.image_tokens) if config.video else 1


def vit_bytes(config: CogVLMConfig, images: int, world: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """The vision tower's peak encoding `images` pictures at once (a clip's frames are a batch of
    them): per ViT token, the residual and a norm's output whole on every rank, the attention's
    and the MLP's tensors split across `world` ranks."""
    v, size = config.vision, torch.finfo(dtype).bits // 8
    s = v.num_positions  # ViT tokens: patches + CLS
    return images * s * (2 * v.hidden_size + (7 * v.hidden_size + 2 * v.intermediate_size) // world) * size


def embedding_bytes(config: CogVLMConfig, images: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The tower's output for `images` pictures, held until it is scattered into the sequence."""
    return images * config.image_tokens * config.hidden_size * (torch.finfo(dtype).bits // 8)


def activation_bytes(config: CogVLMConfig, world: int = 1, dtype: torch.dtype = torch.bfloat16,
                     batch: int = 1, max_length: int = 2048) -> int:
    """Estimated peak of the prefill: `batch` prompts of `max_length` tokens, one image each (a
    video model: a clip of `images_per_prompt` frames each), besides the attention mask
    (`attention_bytes`, counted on top: a conservative sum, since the decoder layer's tensors are
    the largest whenever the mask matters)."""
    size = torch.finfo(dtype).bits // 8
    images = batch * images_per_prompt(config, max_length)
    vit = vit_bytes(config, images, world, dtype)
    t, h = max_length, config.hidden_size
    lm = batch * t * (4 * h + (10 * h + 3 * config.intermediate_size) // world) * size
    logits = batch * config.vocab_size * 4 * 2  # fp32 logits, gathered from the ranks' parts
    cross = 0
    if config.cross_vision is not None:  # CogAgent's high-resolution tower, whole on every rank
        c = config.cross_vision
        tokens = c.num_patches + 1
        cross = batch * tokens * (6 * c.hidden_size + 3 * c.intermediate_size) * size
    return max(vit, lm, cross) + embedding_bytes(config, images, dtype) + logits


@dataclass(frozen=True)
class Plan:
    tp: int
    quant: int | None
    weights: int
    kv_cache: int
    activations: int
    attention: int
    dequantized: int = 0  # quantized on CUDA: the shared bf16 buffer (`dequant_buffer_bytes`)

    @property
    def runtime(self) -> int:
        return sum(runtime_overhead(self.tp).values())

    @property
    def per_device(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.attention + self.dequantized + self.runtime

    def fits(self, memory: int) -> bool:
        return self.per_device <= memory


def plan(config: CogVLMConfig, tp: int = 1, quant: int | None = None, dtype: torch.dtype = torch.bfloat16,
         batch: int = 1, max_length: int = 2048, group_size: int = 128, vision_bits: int | None = None) -> Plan:
    """What one device needs for `config` split over `tp` ranks; `TensorParallelError` if `tp`
    does not divide the model."""
    check_split(config, tp)
    return _plan(config, tp, quant, dtype, batch, max_length, group_size, vision_bits)


def _plan(config: CogVLMConfig, tp: int, quant: int | None, dtype: torch.dtype, batch: int, max_length: int,
          group_size: int = 128, vision_bits: int | None = None) -> Plan:
    """`plan` for a split already checked."""
    if quant is None and vision_bits is None:  # float: weights from the shapes alone, nothing dequantized
        weights, dequantized = _rank_weight_bytes(config, tp, dtype, None, group_size, None), 0
    else:  # one meta-device model gives both
        model = _meta_model(config, dtype, quant, group_size, vision_bits, tp)
        weights, dequantized = _bytes_by_part(model, config, dtype)["total"], _dequant_buffer(model, batch)
    return Plan(tp, quant, weights, kv_cache_bytes(config, batch, max_length, dtype, tp),
                activation_bytes(config, tp, dtype, batch, max_length),
                attention_bytes(config, dtype, batch, max_length), dequantized)


def smallest_fit(config: CogVLMConfig, memory: int, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                 max_length: int = 2048) -> tuple[Plan | None, Plan | None]:
    """The fewest GPUs that fit without quantization, and the fewest bits that fit on one GPU."""
    splits = []
    for n in (1, 2, 4, 8, 16):
        try:
            splits.append(plan(config, n, None, dtype, batch, max_length))
        except TensorParallelError:
            continue
    quantized = [plan(config, 1, bits, dtype, batch, max_length) for bits in (8, 4)]
    return (next((p for p in splits if p.fits(memory)), None),
            next((p for p in quantized if p.fits(memory)), None))


# What a card sold as N GB offers CUDA: torch.cuda.get_device_properties(i).total_memory (which
# torch prints in MiB as "total_memory=...MB"), lower than N GiB because the driver keeps some for
# itself. Figures from public reports of that print (not measured by us), the smallest seen for
# the common card of each size without ECC taking a share: data-center cards with ECC on (T4,
# A10, A40, L40S) offer about 6% less; plan those with the exact figure (`--gpu-memory 22.5GiB`),
# or run `cogvlm plan` on the machine itself, which reads the card.
CARDS: dict[int, tuple[int, str]] = {
    12: (11931 * MiB, "an RTX 3060 12GB reports 11,931-12,044 MiB"),
    16: (16130 * MiB, "a V100 16GB reports 16,130-16,160 MiB"),
    24: (24259 * MiB, "an RTX 3090 reports 24,259-24,268 MiB, a 4090 24,563 MiB"),
    40: (40536 * MiB, "an A100-SXM4-40GB reports 40,536 MiB"),
    48: (48676 * MiB, "an RTX A6000 reports 48,676 MiB"),
    80: (81082 * MiB, "an H100 80GB HBM3 reports 81,082-81,090 MiB"),
}
# For a nominal size the table lacks: the table's lowest ratio of usable to nominal (the 12 GB card's)
UNLISTED_SHARE = min(usable / (gib * GiB) for gib, (usable, _) in CARDS.items())


def usable_memory(text: str) -> tuple[int, str]:
    """What a card offers CUDA, in bytes, and where the figure comes from (`describe` prints it).
    '24GB' is a nominal size, as the card is sold: planned at what such a card reports (`CARDS`;
    sizes not listed at the table's lowest share). '23.7GiB' and '24259MiB' (or 'MB', as torch
    prints it) are exact figures, taken as written."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([GM])(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; write it like 24GB (a card's nominal size) "
                         f"or 23.7GiB (exact)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if unit == "M":
        return int(value * MiB), f"{value:g} MiB as given"
    if binary:
        return int(value * GiB), f"{value:g} GiB as given"
    if value.is_integer() and int(value) in CARDS:
        usable, source = CARDS[int(value)]
        return usable, f"a nominal {value:g} GB card offers CUDA {gb(usable)}: {source}; ECC-on cards less"
    usable = int(value * GiB * UNLISTED_SHARE)
    return usable, (f"a nominal {value:g} GB card, not in the table: planned at {UNLISTED_SHARE:.1%} of {value:g} "
                    f"GiB; give the exact figure as GiB")


def gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def describe(config: CogVLMConfig, p: Plan, memory: int | None, dtype: torch.dtype, batch: int,
             max_length: int, memory_source: str | None = None) -> str:
    """The plan as the command prints it, with advice when it does not fit; `memory_source` says
    where the card's figure came from (`usable_memory`, or the card itself)."""
    what = f"--tp {p.tp}" + (f" --quant {p.quant}" if p.quant else "") + f", {str(dtype).removeprefix('torch.')}"
    lines = [f"per device ({what}, batch {batch}, max length {max_length}):",
             f"  weights      {p.weights:>16,} bytes  {gb(p.weights)}",
             f"  KV cache     {p.kv_cache:>16,} bytes  {gb(p.kv_cache)}",
             f"  activations  {p.activations:>16,} bytes  {gb(p.activations)}  (estimate: prefill with "
             + (f"a clip of {images_per_prompt(config, max_length)} frames)" if config.video else "one image)"),
             f"  attention    {p.attention:>16,} bytes  {gb(p.attention)}  "
             + (f"(a padded batch's prefill mask and SDPA's {str(dtype).removeprefix('torch.')} bias, "
                f"{max_length}x{max_length} per row)" if batch > 1 else "(none: one prompt prefills with is_causal)"),
             *([f"  dequantized  {p.dequantized:>16,} bytes  {gb(p.dequantized)}  (on CUDA: the bf16 buffer "
                f"packed layers are multiplied from, the largest that uses it)"] if p.dequantized else []),
             f"  runtime      {p.runtime:>16,} bytes  {gb(p.runtime)}  (estimate: "
             + ", ".join(f"{name} {n // MiB} MiB" for name, n in runtime_overhead(p.tp).items()) + ")",
             f"  total        {p.per_device:>16,} bytes  {gb(p.per_device)}"]
    if memory is None:
        return "\n".join(lines)
    if memory_source:
        lines.append(f"card: {gb(memory)} ({memory_source})")
    if p.fits(memory):
        lines.append(f"fits in {gb(memory)} per device ({gb(memory - p.per_device)} to spare)")
        return "\n".join(lines)
    lines.append(f"does NOT fit in {gb(memory)} per device")
    lines.append(advice(config, memory, dtype, batch, max_length))
    return "\n".join(lines)


def advice(config: CogVLMConfig, memory: int, dtype: torch.dtype, batch: int, max_length: int) -> str:
    split, quantized = smallest_fit(config, memory, dtype, batch, max_length)
    ways = []
    if split:
        ways.append(f"--tp {split.tp} ({split.tp} GPUs, {gb(split.per_device)} each)")
    if quantized:
        ways.append(f"--quant {quantized.quant} on one GPU ({gb(quantized.per_device)})")
    if not ways:
        return "nothing fits: use GPUs with more memory, a smaller --batch or --max-length"
    return "smallest set-ups that fit: " + ", or ".join(ways)


def check_fits(config: CogVLMConfig, tp: int, dtype: torch.dtype, quant: QuantConfig | None, max_length: int,
               device: torch.device) -> None:
    """Before a CUDA load: raise `PlanError` with advice if the weights, one prompt's cache and its
    prefill cannot fit the GPUs (instead of an out-of-memory crash mid-load). Reads the cards'
    sizes only: that creates no CUDA context on the other ranks' GPUs. The caller has checked
    the split (`check_split`; `CogVLM.from_pretrained` does, once per load)."""
    if device.type != "cuda":
        return
    cards = range(tp) if tp > 1 else [device.index or 0]
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in cards)
    p = _plan(config, tp, quant and quant.bits, dtype, 1, max_length, *(
        (quant.group_size, quant.vision_bits) if quant else ()))
    if not p.fits(memory):
        raise PlanError(f"the model needs {gb(p.per_device)} per GPU (weights {gb(p.weights)}) but the GPU "
                        f"has {gb(memory)}; {advice(config, memory, dtype, 1, max_length)}. "
                        f"`cogvlm plan` shows the numbers")


# ---------------------------------------------------------------------------------------------
# Fine-tuning (`cogvlm plan --finetune lora|full`)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetunePlan:
    """Bytes per GPU of a fine-tuning run (see `finetune_plan` for how each is counted)."""

    mode: str
    fsdp: int
    quant: int | None
    trainable_params: int
    weights: int  # frozen weights (packed, or in the load dtype), this GPU's share
    gather: int  # FSDP: the unsharded layers being all-gathered (this one and the prefetched next)
    masters: int  # fp32 trainable parameters
    gradients: int
    optimizer: int  # AdamW's two fp32 states
    activations: int
    checkpointing: bool
    dequantized: int = 0  # QLoRA: the shared buffer a packed layer is dequantized into (its bf16 weight)

    @property
    def runtime(self) -> int:
        """As for inference (`runtime_overhead`): NCCL's buffers only when FSDP spans GPUs."""
        return sum(runtime_overhead(self.fsdp).values())

    @property
    def per_device(self) -> int:
        return (self.weights + self.gather + self.masters + self.gradients + self.optimizer + self.activations
                + self.dequantized + self.runtime)

    def fits(self, memory: int) -> bool:
        return self.per_device <= memory

    def describe(self, memory: int | None, batch: int, max_length: int) -> str:
        """The plan as `cogvlm plan --finetune` prints it."""
        what = (f"{'QLoRA int' + str(self.quant) if self.quant else self.mode}"
                f"{f', FSDP over {self.fsdp} GPUs' if self.fsdp > 1 else ''}, batch {batch}, {max_length} tokens, "
                f"gradient checkpointing {'on' if self.checkpointing else 'off'}")
        rows = [("frozen weights", self.weights, ""), ("FSDP gather", self.gather, "two unsharded layers"),
                ("trainable fp32", self.masters, f"{self.trainable_params:,} parameters"),
                ("gradients", self.gradients, "fp32"), ("optimizer", self.optimizer, "AdamW: 2 fp32 states"),
                ("activations", self.activations, "estimate, see cogvlm.plan.finetune_plan"),
                ("dequantized", self.dequantized, "bf16 buffer: the largest packed layer"),
                ("runtime", self.runtime, "estimate: " + ", ".join(
                    f"{name} {n // MiB} MiB" for name, n in runtime_overhead(self.fsdp).items())),
                ("total", self.per_device, "")]
        lines = [f"fine-tuning, per GPU ({what}):"] + [
            f"  {name:<15}{n:>16,} bytes  {gb(n)}" + (f"  ({note})" if note else "") for name, n, note in rows
            if n or name not in ("FSDP gather", "dequantized")]
        if memory is not None:
            lines.append(f"fits in {gb(memory)} per GPU ({gb(memory - self.per_device)} to spare)" if self.fits(memory)
                         else f"does NOT fit in {gb(memory)} per GPU: add --grad-checkpointing, --quant 4 "
                              f"(with lora), more --fsdp GPUs, or lower --batch-size / --max-length")
        return "\n".join(lines)


def finetune_plan(config: CogVLMConfig, mode: str, selected: Callable[[str], bool], lora_r: int = 8,
                  quant: int | None = None, group_size: int = 128, fsdp: int = 1, batch: int = 1,
                  max_length: int = 2048, checkpointing: bool = False,
                  dtype: torch.dtype = torch.bfloat16) -> FinetunePlan:
    """Memory per GPU to fine-tune `config`: `mode` "full" trains the parameters `selected`
    picks by name, "lora" trains rank-`lora_r` adapters on the Linear modules it picks, over a
    base quantized to `quant` bits (QLoRA) or in `dtype`. (The job decides what the names mean,
    `cogvlm.finetune.PARTS` / `LORA_TARGETS`: the engine plans whatever it is given.)

    Counted exactly from the meta-device model: frozen weights (packed bytes and scales, or
    `dtype`); trainable parameters as fp32 masters, fp32 gradients and AdamW's two fp32 states
    (16 bytes per parameter). With `fsdp` N all of these but the packed buffers (FSDP shards
    parameters, not buffers) are split N ways, and two whole layers are gathered at a time (the
    running one, the prefetched next). QLoRA adds the bf16 buffer its packed layers are
    dequantized into, the size of the largest (the output head).

    Activations are an estimate, in bf16, for `batch` rows of `max_length` tokens. Each decoder
    layer keeps, per token, its two norm inputs and outputs, q/k/v, the attention output and
    the expert routing's copies (7 x hidden + qkv) and the MLP's gate, up, silu(gate) and
    product (4 x intermediate); attention is taken to be a fused kernel that keeps no
    tokens x tokens matrix; CogAgent's cross-attention adds 2 x (hidden + cross width). Without
    checkpointing every layer keeps all of that; with it each keeps only its input (hidden)
    and one layer at a time is recomputed with its gradients (twice one layer's set). The ViT
    keeps the same kind of set (6 x hidden + 2 x intermediate per patch, for each frame of a
    video model's clip, `images_per_prompt`) only if something in or before it trains; else it
    runs as in inference (`activation_bytes`, a transient peak before the decoder starts). The logits take 14 bytes per vocabulary entry per token:
    bf16 out of the head, the fp32 copy, the fp32 log-softmax cross-entropy keeps and its
    gradient. Training computes them only at answer tokens (`forward(at=)`); counted here at
    every token, the bound for a batch that is all answer."""
    if mode not in ("lora", "full"):
        raise PlanError(f"fine-tuning is 'lora' or 'full', not {mode!r}")
    if quant is not None and mode != "lora":
        raise PlanError("quantized weights do not train: plan --finetune lora with --quant (QLoRA)")
    with torch.device("meta"):
        model = CogVLMForCausalLM(config).to(dtype)
    if quant is not None:
        quantize_layout(model, QuantConfig(quant, group_size))
    packed = {n for n, m in model.named_modules() if hasattr(m, "qweight")}  # Int4Linear / Int8Linear
    if mode == "lora":
        targets = [m for n, m in model.named_modules() if selected(n) and hasattr(m, "in_features")]
        trainable = sum(lora_r * (m.in_features + m.out_features) for m in targets)
        trained_names: list[str] = [n for n, m in model.named_modules() if selected(n)]
        frozen_params = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        trained = {n: p for n, p in model.named_parameters() if selected(n)}
        trainable = sum(p.numel() for p in trained.values())
        trained_names = list(trained)
        frozen_params = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in trained)
    if not trainable:
        raise PlanError("nothing to train: the selection names no parameter of this model")
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.rpartition(".")[0] in packed)
    weights = buffers + frozen_params // fsdp
    per_param = 4  # fp32
    gather = 0
    if fsdp > 1:
        layer = model.model.layers[0]
        gather = 2 * sum(p.numel() * (per_param if mode == "full" and selected(f"model.layers.0.{n}") else
                                      p.element_size()) for n, p in layer.named_parameters())

    size = 2  # bf16 activations
    h, t = config.hidden_size, batch * max_length
    per_token = (7 * h + config.qkv_size + 4 * config.intermediate_size) * size
    if config.cross_vision is not None:
        per_token += 2 * (h + config.cross_compute_hidden_size) * size
    kept = (config.num_layers * t * h * size + 2 * t * per_token if checkpointing
            else config.num_layers * t * per_token)
    v = config.vision
    if any(n.startswith("model.vision.") for n in trained_names):
        patches = batch * images_per_prompt(config, max_length) * v.num_positions  # a video model: every frame
        vit_token = (6 * v.hidden_size + 2 * v.intermediate_size) * size
        kept += (v.num_layers * patches * v.hidden_size * size + 2 * patches * vit_token if checkpointing
                 else v.num_layers * patches * vit_token)
    logits = t * config.vocab_size * 14
    activations = max(kept + logits, activation_bytes(config, 1, dtype, batch, max_length))
    shard = -(-trainable * per_param // fsdp)
    # QLoRA on CUDA multiplies long inputs by a packed layer dequantized into one shared bf16
    # buffer (quantize.route; int8 at every row count): the largest such layer, the output head
    # when answers are long or int8 (its backward alone goes in BACKWARD_CHUNK pieces)
    dequantized = max((2 * math.prod(m.dequantized_shape) for m in model.modules()
                       if isinstance(m, (Int4Linear, Int8Linear))), default=0)
    return FinetunePlan(mode, fsdp, quant, trainable, weights, gather, shard, shard, 2 * shard, activations,
                        checkpointing, dequantized)
