"""CogVLM's forward pass written straight from the spec, slowly and in float64, for comparison.

Deliberately naive: token-by-token expert choice through boolean masks, explicit RoPE angles,
eager softmax attention, the spec's token-type rule for positions. Shares no code with `cogvlm`.
CogAgent (cogagent.md) is the same forward plus a high-resolution tower and a cross-attention
step in every layer, present when the state dict has them.
CogVLM2 (cogvlm2.md) is read off the weights present: the 2x2 conv (patch by patch), the vision
QKV bias, [q | k | v] with fewer KV heads (query head h reads KV head h // group), and RoPE with
each layer's stored `rotary_emb.inv_freq`.
CogVLM2-Video (cogvlm2-video.md) has no visual expert: `reference_decoder` runs every token through
the language weights when the state dict has no vision-expert weights.
"""

from __future__ import annotations

import math

import torch

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
L, V = "L", "V"


def reference_prompt(query: str, history: list[tuple[str, str]], template: str) -> str:
    if template == "base":
        return query
    if template == "inst":  # docs/spec/cogagent.md section 11: " [INST] q1 [/INST] a1 [INST] … [INST] {query} [/INST] "
        prompt = ""
        for q, a in history:
            prompt += " [INST] " + q + " [/INST] " + a
        return prompt + " [INST] " + query + " [/INST] "
    fmt = {"chat": "Answer:", "vqa": "Short answer:"}[template]
    prompt = ""
    for q, a in history:
        prompt += "Question: " + q + " " + fmt + " " + a + "\n"
    return prompt + "Question: " + query + " " + fmt


def reference_layout(text_ids: list[int], with_image: bool, num_patches: int, bos: int = 1, placeholder: int = 0):
    """Token ids, token types and position ids of one conversation (docs/spec/cogvlm.md section 4)."""
    n_img = num_patches + 2 if with_image else 0
    ids = [bos] + [placeholder] * n_img + list(text_ids)
    types = [L] + [V] * n_img + [L] * len(text_ids)
    positions, pos = [], -1
    for t in range(len(ids)):
        k = t - 1  # index inside the image run: 0 = boi, 1..P = patches, P+1 = eoi
        if types[t] == L or k in (0, 1, n_img - 1):  # text, boi, first patch, eoi advance
            pos += 1
        positions.append(pos)
    return ids, types, positions


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _attention(q, k, v, causal):
    # q, k, v: (heads, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def reference_vision(sd, cfg, pixels):
    w = {k: v.double() for k, v in sd.items()}
    vc = cfg.vision
    pre = "model.vision."
    x = torch.nn.functional.conv2d(pixels.double()[None], w[pre + "patch_embedding.proj.weight"],
                                   w[pre + "patch_embedding.proj.bias"], stride=vc.patch_size)
    x = x.flatten(2)[0].T  # (P, D)
    x = torch.cat([w[pre + "patch_embedding.cls_embedding"], x]) + w[pre + "patch_embedding.position_embedding.weight"]
    hd = vc.hidden_size // vc.num_heads
    for j in range(vc.num_layers):
        p = f"{pre}transformer.layers.{j}."
        qkv = x @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]
        qkv = qkv.view(x.shape[0], 3, vc.num_heads, hd)
        q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))
        a = _attention(q, k, v, causal=False).transpose(0, 1).reshape(x.shape[0], -1)
        a = a @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        x = x + _ln(a, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], vc.layer_norm_eps)
        m = _gelu(x @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"]) @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        x = x + _ln(m, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], vc.layer_norm_eps)
    x = x[1:]
    if pre + "pos_embed" in w:  # CogAgent: a learned [P, 1792] table before the adapter
        x = x + w[pre + "pos_embed"]
    if pre + "conv.weight" in w:  # CogVLM2: output (i, j) sees patches (2i+r, 2j+c), weight [out, in, r, c]
        g = vc.image_size // vc.patch_size
        conv, merged = w[pre + "conv.weight"], []
        for i in range(g // 2):
            for j in range(g // 2):
                merged.append(w[pre + "conv.bias"] + sum(conv[:, :, r, c] @ x[(2 * i + r) * g + 2 * j + c]
                                                         for r in range(2) for c in range(2)))
        x = torch.stack(merged)
    a = pre + "linear_proj."
    x = x @ w[a + "linear_proj.weight"].T
    x = _gelu(_ln(x, w[a + "norm1.weight"], w[a + "norm1.bias"], 1e-5))
    g = x @ w[a + "gate_proj.weight"].T
    x = (g * torch.sigmoid(g) * (x @ w[a + "dense_h_to_4h.weight"].T)) @ w[a + "dense_4h_to_h.weight"].T
    return torch.cat([w[pre + "boi"][0], x, w[pre + "eoi"][0]])


def reference_cross_vision(sd, cfg, pixels):
    """docs/spec/cogagent.md section 7: EVA2-CLIP-L at high resolution → (N, width) features."""
    w = {k: v.double() for k, v in sd.items()}
    cv = cfg.cross_vision
    pre = "model.cross_vision.vit.model."
    x = torch.nn.functional.conv2d(pixels.double()[None], w[pre + "patch_embed.proj.weight"],
                                   w[pre + "patch_embed.proj.bias"], stride=cv.patch_size)
    grid = x.shape[-1]
    x = x.flatten(2)[0].T  # (N, D), row-major patches
    x = torch.cat([w[pre + "cls_token"][0], x]) + w[pre + "pos_embed"][0]
    heads = cv.num_heads
    hd = cv.hidden_size // heads
    half = hd // 2

    def rope2d(t):  # t: (heads, N+1, hd); CLS (index 0) is not rotated
        out = t.clone()
        for p in range(grid * grid):
            row, col = divmod(p, grid)
            for base, coord in ((0, row), (half, col)):
                for m in range(half // 2):
                    angle = (coord * cv.rope_grid / grid) * 10000.0 ** (-2 * m / half)
                    c, s_ = math.cos(angle), math.sin(angle)
                    a, b = t[:, p + 1, base + 2 * m], t[:, p + 1, base + 2 * m + 1]
                    out[:, p + 1, base + 2 * m] = a * c - b * s_
                    out[:, p + 1, base + 2 * m + 1] = b * c + a * s_
        return out

    n_blocks = sum(1 for k in w if k.startswith(pre + "blocks.") and k.endswith(".norm1.weight"))
    for j in range(n_blocks - 1):  # the last block never runs
        p = f"{pre}blocks.{j}."
        h = _ln(x, w[p + "norm1.weight"], w[p + "norm1.bias"], cv.layer_norm_eps)
        q = h @ w[p + "attn.q_proj.weight"].T + w[p + "attn.q_bias"]
        k = h @ w[p + "attn.k_proj.weight"].T  # no k bias
        v = h @ w[p + "attn.v_proj.weight"].T + w[p + "attn.v_bias"]
        q, k, v = (t.view(x.shape[0], heads, hd).transpose(0, 1) for t in (q, k, v))
        a = _attention(rope2d(q), rope2d(k), v, causal=False).transpose(0, 1).reshape(x.shape[0], -1)
        a = _ln(a, w[p + "attn.inner_attn_ln.weight"], w[p + "attn.inner_attn_ln.bias"], cv.layer_norm_eps)
        x = x + a @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = _ln(x, w[p + "norm2.weight"], w[p + "norm2.bias"], cv.layer_norm_eps)
        g = h @ w[p + "mlp.w1.weight"].T + w[p + "mlp.w1.bias"]
        u = h @ w[p + "mlp.w2.weight"].T + w[p + "mlp.w2.bias"]
        m = _ln(g * torch.sigmoid(g) * u, w[p + "mlp.ffn_ln.weight"], w[p + "mlp.ffn_ln.bias"], cv.layer_norm_eps)
        x = x + m @ w[p + "mlp.w3.weight"].T + w[p + "mlp.w3.bias"]
    return x[1:] + w["model.cross_vision.pos_embed"]  # no final norm, no head; CLS dropped


def reference_logits(sd, cfg, text_ids: list[int], pixels=None, cross_pixels=None) -> torch.Tensor:
    """float64 logits (L, vocab) for `<s> [image] text` (CogAgent: `cross_pixels` too)."""
    w = {k: v.double() for k, v in sd.items()}
    cross = "model.layers.0.cross_attn.query.weight" in w
    if cross:
        assert pixels is not None and cross_pixels is not None, "CogAgent has no text-only mode"
        enc = reference_cross_vision(sd, cfg, cross_pixels)
    merge = 4 if "model.vision.conv.weight" in w else 1
    ids, types, positions = reference_layout(text_ids, pixels is not None, cfg.vision.num_patches // merge,
                                             cfg.bos_token_id, cfg.pad_token_id)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    if pixels is not None:
        img = reference_vision(sd, cfg, pixels)
        x[1:1 + img.shape[0]] = img
    n = len(ids)
    vision_mask = torch.tensor([types[t] == V and t + 1 < n and types[t + 1] == V for t in range(n)])
    return reference_decoder(sd, cfg, x, positions, vision_mask, enc if cross else None)


def reference_decoder(sd, cfg, x, positions, vision_mask, enc=None) -> torch.Tensor:
    """float64 logits of the decoder over input embeddings `x` (L, hidden) at `positions`;
    tokens in `vision_mask` take the visual expert. A model without one (CogVLM2-Video: no
    `vision_expert_*` / `vision_mlp` weights) runs every token through the language weights."""
    w = {k: v.double() for k, v in sd.items()}
    cross = enc is not None
    n = x.shape[0]
    if "model.layers.0.self_attn.vision_expert_dense.weight" not in w:
        assert not vision_mask.any()
        vision_mask = torch.zeros(n, dtype=torch.bool)
    hd = cfg.hidden_size // cfg.num_heads
    kv_heads = cfg.num_key_value_heads

    def expert(h, lang_w, vis_w, vis_b=None):
        out = torch.zeros(h.shape[0], lang_w.shape[0], dtype=h.dtype)
        if vision_mask.any():
            out[vision_mask] = h[vision_mask] @ vis_w.T + (0 if vis_b is None else vis_b)
        out[~vision_mask] = h[~vision_mask] @ lang_w.T
        return out

    def rope(t, inv_freq):  # t: (heads, L, hd)
        out = torch.empty_like(t)
        for idx, p in enumerate(positions):
            for i in range(hd // 2):
                theta = p * (cfg.rope_theta ** (-2 * i / hd) if inv_freq is None else inv_freq[i].item())
                c, s = math.cos(theta), math.sin(theta)
                a, b = t[:, idx, i], t[:, idx, i + hd // 2]
                out[:, idx, i] = a * c - b * s
                out[:, idx, i + hd // 2] = b * c + a * s
        return out

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = expert(h, w[p + "self_attn.language_expert_query_key_value.weight"],
                     w.get(p + "self_attn.vision_expert_query_key_value.weight"),
                     w.get(p + "self_attn.vision_expert_query_key_value.bias"))
        q = qkv[:, :cfg.num_heads * hd].view(n, cfg.num_heads, hd).transpose(0, 1)
        k, v = (qkv[:, (cfg.num_heads + j * kv_heads) * hd:(cfg.num_heads + (j + 1) * kv_heads) * hd]
                .view(n, kv_heads, hd).transpose(0, 1) for j in range(2))
        inv_freq = w.get(p + "self_attn.rotary_emb.inv_freq")
        q, k = rope(q, inv_freq), rope(k, inv_freq)
        group = cfg.num_heads // kv_heads
        a = torch.stack([_attention(q[h:h + 1], k[h // group:h // group + 1], v[h // group:h // group + 1],
                                    causal=True)[0] for h in range(cfg.num_heads)])
        a = a.transpose(0, 1).reshape(n, -1)
        x = x + expert(a, w[p + "self_attn.language_expert_dense.weight"], w.get(p + "self_attn.vision_expert_dense.weight"))
        if cross:  # docs/spec/cogagent.md section 8: every token attends to all image features, no RoPE, no mask
            h = _rms(x, w[p + "post_cross_attention_layernorm.weight"], cfg.rms_norm_eps)
            inner = w[p + "cross_attn.query.weight"].shape[0]
            cd = inner // cfg.num_heads
            q = (h @ w[p + "cross_attn.query.weight"].T).view(n, cfg.num_heads, cd).transpose(0, 1)
            kv = enc @ w[p + "cross_attn.key_value.weight"].T
            k = kv[:, :inner].view(-1, cfg.num_heads, cd).transpose(0, 1)
            v = kv[:, inner:].view(-1, cfg.num_heads, cd).transpose(0, 1)
            a = _attention(q, k, v, causal=False).transpose(0, 1).reshape(n, -1)
            x = x + a @ w[p + "cross_attn.dense.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        out = torch.zeros_like(x)
        for name, sel in (("language_mlp", ~vision_mask), ("vision_mlp", vision_mask)):
            if not sel.any():
                continue
            hs = h[sel]
            g = hs @ w[f"{p}mlp.{name}.gate_proj.weight"].T
            u = hs @ w[f"{p}mlp.{name}.up_proj.weight"].T
            out[sel] = (g * torch.sigmoid(g) * u) @ w[f"{p}mlp.{name}.down_proj.weight"].T
        x = x + out
    x = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    return x @ w["lm_head.weight"].T
