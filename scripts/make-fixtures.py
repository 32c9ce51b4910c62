#!/usr/bin/env python3
"""Makes the tiny decoder fixtures under tests/fixtures/ and their expected logits.

An independent implementation: the forward pass below is plain numpy in float64, written from the
Hugging Face modelling code's definitions (RMSNorm, rotate-half RoPE with llama3 / linear scaling,
GQA, SwiGLU, Qwen2 q/k/v biases, Mistral's sliding window), not from our Rust code. The tokenizer
is trained with the `tokenizers` Python package. Not run by CI; its outputs are committed.

    python3 -m venv /tmp/fx && . /tmp/fx/bin/activate && pip install numpy tokenizers
    python3 scripts/make-fixtures.py
"""
import json
import os
import struct

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

CORPUS = [
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The quick brown fox jumps over the lazy dog. 12345 apples and 678 pears!",
    "Translate to French: the cat sits on the mat. Le chat est assis sur le tapis.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 2 + 2? Answer: 4. Café, naïve, über, 東京, emoji 🙂.",
] * 20

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TEXTS = [
    "Once upon a time, there was a little",
    "The fox jumps 123 times.",
    "Café 東京 🙂 ok",
]


def make_tokenizer(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, round to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def save_safetensors(path, tensors, dtype):
    """Writes a safetensors file by hand (the format is a JSON header and raw little-endian data)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if dtype == "F32":
            raw = a.astype("<f4").tobytes()
        elif dtype == "F16":
            raw = a.astype("<f2").tobytes()
        elif dtype == "BF16":
            raw = to_bf16_bits(a).astype("<u2").tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def stored_values(a, dtype):
    """What a reader of the file gets back, as float64."""
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float64)
    if dtype == "BF16":
        return from_bf16_bits(to_bf16_bits(a)).astype(np.float64)
    return a.astype(np.float32).astype(np.float64)


def random_weights(cfg, rng):
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (v, d)), "model.norm.weight": 1 + rng.normal(0, 0.1, d)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rng.normal(0, 0.2, (v, d))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, d)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, d)
        shapes = {
            "self_attn.q_proj": (nh * hd, d),
            "self_attn.k_proj": (nkv * hd, d),
            "self_attn.v_proj": (nkv * hd, d),
            "self_attn.o_proj": (d, nh * hd),
            "mlp.gate_proj": (ff, d),
            "mlp.up_proj": (ff, d),
            "mlp.down_proj": (d, ff),
        }
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        if cfg["model_type"] == "qwen2":
            for n in ("q", "k", "v"):
                w[p + f"self_attn.{n}_proj.bias"] = rng.normal(0, 0.1, shapes[f"self_attn.{n}_proj"][0])
    return {k: np.asarray(a, dtype=np.float32) for k, a in w.items()}


def inv_freq(cfg):
    hd, theta = cfg["head_dim"], cfg["rope_theta"]
    f = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        wl = 2 * np.pi / f
        smooth = (old / wl - lo) / (hi - lo)
        scaled = np.where(wl > old / lo, f / factor, f)
        mid = (wl >= old / hi) & (wl <= old / lo)
        return np.where(mid, (1 - smooth) * f / factor + smooth * f, scaled)
    if rs and rs.get("rope_type") == "linear":
        return f / rs["factor"]
    return f


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def forward(cfg, W, ids, delta=None):
    """Logits for every position of one sequence, float64. `delta(layer, module, h)` returns a
    term added to that linear's output (the LoRA mixture), or None."""

    def add(L, module, h, y):
        d = delta(L, module, h) if delta else None
        return y if d is None else y + d

    d, hd = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    t = len(ids)
    x = W["model.embed_tokens.weight"][ids]
    ang = np.outer(np.arange(t), inv_freq(cfg))
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(z):  # z: [heads, t, hd]
        half = hd // 2
        rot = np.concatenate([-z[..., half:], z[..., :half]], -1)
        return z * cos + rot * sin

    mask = np.triu(np.full((t, t), -np.inf), 1)
    win = cfg.get("sliding_window") if cfg["model_type"] == "mistral" else None
    if win:
        i, j = np.indices((t, t))
        mask = np.where(i - j >= win, -np.inf, mask)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = rms(x, W[p + "input_layernorm.weight"], eps)

        def proj(n):
            y = h @ W[p + f"self_attn.{n}_proj.weight"].T
            b = W.get(p + f"self_attn.{n}_proj.bias")
            y = y + b if b is not None else y
            return add(L, f"{n}_proj", h, y)

        q = rope(proj("q").reshape(t, nh, hd).transpose(1, 0, 2))
        k = rope(proj("k").reshape(t, nkv, hd).transpose(1, 0, 2))
        v = proj("v").reshape(t, nkv, hd).transpose(1, 0, 2)
        rep = nh // nkv
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + add(L, "o_proj", a, a @ W[p + "self_attn.o_proj.weight"].T)
        h = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g = add(L, "gate_proj", h, h @ W[p + "mlp.gate_proj.weight"].T)
        u = add(L, "up_proj", h, h @ W[p + "mlp.up_proj.weight"].T)
        m = (g / (1 + np.exp(-g))) * u
        x = x + add(L, "down_proj", m, m @ W[p + "mlp.down_proj.weight"].T)
    x = rms(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T


def build(name, cfg, dtype, shards, specials, template, bos, eos, seed):
    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    tok = make_tokenizer(specials)
    cfg = dict(cfg, vocab_size=tok.get_vocab_size())
    cfg["bos_token_id"] = tok.token_to_id(bos)
    cfg["eos_token_id"] = tok.token_to_id(eos)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": False, "chat_template": template}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    rng = np.random.default_rng(seed)
    W = random_weights(cfg, rng)
    names = sorted(W)
    if shards == 1:
        save_safetensors(os.path.join(out, "model.safetensors"), W, dtype)
    else:
        per = (len(names) + shards - 1) // shards
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: W[n] for n in names[s * per:(s + 1) * per]}
            save_safetensors(os.path.join(out, fname), part, dtype)
            weight_map.update({n: fname for n in part})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    W64 = {k: stored_values(a, dtype) for k, a in W.items()}
    cases = []
    for text in TEXTS:
        ids = tok.encode(text).ids
        cases.append({"text": text, "ids": ids, "logits": forward(cfg, W64, ids).astype(np.float32).round(6).tolist()})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"generator": "scripts/make-fixtures.py (numpy float64)", "dtype": dtype, "cases": cases}, f)
    print(name, "vocab", cfg["vocab_size"], "cases", [len(c["ids"]) for c in cases])


if __name__ == "__main__":
    BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256)

    build("tiny-llama", dict(BASE, model_type="llama", rope_theta=10000.0, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
          "F32", 2, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
          LLAMA3_LIKE, "<|begin_of_text|>", "<|eot_id|>", 1)
    build("tiny-qwen2", dict(BASE, model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True,
                             num_key_value_heads=1),
          "BF16", 1, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|endoftext|>", "<|im_end|>", 2)
    build("tiny-mistral", dict(BASE, model_type="mistral", rope_theta=10000.0, tie_word_embeddings=False,
                               sliding_window=4),
          "F16", 1, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"], CHATML, "<s>", "</s>", 3)
