#!/usr/bin/env python3
"""PEFT LoRA adapters for the tiny-llama fixture and the logits they should produce, computed
with the numpy reference forward of make-fixtures.py (float64) and the LoRA math written from
PEFT's definitions: y = W x + sum_j g_j s_j B_j (A_j x) (mixture), s = alpha / r, or
alpha / sqrt(r) with rsLoRA, per-module overrides from rank_pattern / alpha_pattern;
fusion: y = W x + (sum_j g_j s_j B_j)(sum_j g_j A_j) x. Not run by CI.

    python3 scripts/make-lora-fixtures.py
"""
import importlib.util
import json
import os
import re
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fx", os.path.join(HERE, "make-fixtures.py"))
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)

BASE = os.path.join(fx.ROOT, "tiny-llama")
OUT = os.path.join(fx.ROOT, "lora")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def load_base():
    cfg = json.load(open(os.path.join(BASE, "config.json")))
    W = {}
    for fname in sorted(os.listdir(BASE)):
        if fname.endswith(".safetensors"):
            W.update(read_safetensors(os.path.join(BASE, fname)))
    return cfg, W


def module_path(layer, module):
    block = "self_attn" if module in ALL[:4] else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def pattern(patterns, path, default):
    for key, v in patterns.items():
        if re.match(rf"^(.*\.)?({key})$", path):
            return v
    return default


def make_adapter(name, cfg, rng, r, alpha, targets, rslora=False, rank_pattern=None, alpha_pattern=None):
    """Random factors (B non-zero, unlike a fresh PEFT init, so the adapter does something)."""
    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"q_proj": (nh * hd, d), "k_proj": (nkv * hd, d), "v_proj": (nkv * hd, d), "o_proj": (d, nh * hd),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    def targeted(path, m):  # PEFT: a regex string is fullmatched against the module path
        if targets == "all-linear":
            return True
        return bool(re.fullmatch(targets, path)) if isinstance(targets, str) else m in targets

    tensors, factors = {}, {}
    for L in range(cfg["num_hidden_layers"]):
        for m in ALL:
            path = module_path(L, m)
            if not targeted(path, m):
                continue
            rr = pattern(rank_pattern, path, r)
            aa = pattern(alpha_pattern, path, alpha)
            out_f, in_f = shapes[m]
            A = rng.normal(0, 1 / np.sqrt(in_f), (rr, in_f)).astype(np.float32)
            B = rng.normal(0, 0.3 / np.sqrt(rr), (out_f, rr)).astype(np.float32)
            tensors[f"base_model.model.{path}.lora_A.weight"] = A
            tensors[f"base_model.model.{path}.lora_B.weight"] = B
            s = aa / np.sqrt(rr) if rslora else aa / rr
            factors[(L, m)] = (A.astype(np.float64), B.astype(np.float64), s)
    target_modules = targets if isinstance(targets, str) else list(targets)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "ramole/tiny-llama",
              "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": target_modules,
              "use_rslora": rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "init_lora_weights": True, "layers_to_transform": None, "inference_mode": True}
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    fx.save_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors, "F32")
    return factors


def mixture(adapters):
    """adapters: [(factors, gate)] -> delta hook."""
    def delta(L, m, h):
        terms = [g * s * (h @ A.T) @ B.T for f, g in adapters if (L, m) in f for A, B, s in [f[(L, m)]]]
        return sum(terms) if terms else None
    return delta


def fusion(adapters):
    def delta(L, m, h):
        parts = [(f[(L, m)], g) for f, g in adapters if (L, m) in f]
        if not parts:
            return None
        A = sum(g * p[0] for p, g in parts)
        B = sum(g * p[2] * p[1] for p, g in parts)
        return (h @ A.T) @ B.T
    return delta


def main():
    cfg, W = load_base()
    rng = np.random.default_rng(7)
    a1 = make_adapter("all-linear-r4", cfg, rng, 4, 8.0, "all-linear")
    a2 = make_adapter("rslora-r8", cfg, rng, 8, 16.0, r".*\.(q_proj|k_proj|o_proj|up_proj|down_proj)", rslora=True,
                      rank_pattern={"down_proj": 6}, alpha_pattern={"model.layers.1.self_attn.o_proj": 32.0})
    a3 = make_adapter("qv-r4", cfg, rng, 4, 4.0, ["q_proj", "v_proj"])
    cases = json.load(open(os.path.join(BASE, "expected.json")))["cases"]
    ids = [c["ids"] for c in cases]
    runs = {
        "all-linear-r4": mixture([(a1, 1.0)]),
        "rslora-r8": mixture([(a2, 1.0)]),
        "qv-r4": mixture([(a3, 1.0)]),
        "mixture": mixture([(a1, 0.5), (a2, 0.3), (a3, 0.2)]),
        "fusion": fusion([(a1, 0.6), (a3, 0.4)]),
        "mixture-a1-a3": mixture([(a1, 0.7), (a3, 0.3)]),
    }
    expected = {}
    for name, delta in runs.items():
        expected[name] = [fx.forward(cfg, W, i, delta)[-1].astype(np.float32).round(6).tolist() for i in ids]
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"generator": "scripts/make-lora-fixtures.py (numpy float64)", "base": "tiny-llama",
                   "runs": {"all-linear-r4": [["all-linear-r4", 1.0]], "rslora-r8": [["rslora-r8", 1.0]],
                            "qv-r4": [["qv-r4", 1.0]],
                            "mixture": [["all-linear-r4", 0.5], ["rslora-r8", 0.3], ["qv-r4", 0.2]],
                            "fusion": [["all-linear-r4", 0.6], ["qv-r4", 0.4]],
                            "mixture-a1-a3": [["all-linear-r4", 0.7], ["qv-r4", 0.3]]},
                   "last_logits": expected}, f)
    base_last = [fx.forward(cfg, W, i)[-1] for i in ids]
    for name in runs:
        print(name, "effect", max(np.abs(np.array(expected[name][0]) - base_last[0]).max(), 0))


main()
