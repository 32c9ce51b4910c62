#!/usr/bin/env python3
"""Converts a PEFT LoRA adapter (f32/f16 safetensors) for a Llama-architecture base into a GGUF
LoRA that llama.cpp loads, so both engines run the same adapters in benchmarks. lora_B of q/k is
row-permuted like llama.cpp's converter permutes the base's q/k. Needs numpy and gguf.

    python3 scripts/peft-to-gguf-lora.py ADAPTER_DIR N_HEADS N_KV_HEADS OUT.gguf
"""
import json
import os
import struct
import sys

import gguf
import numpy as np

src, n_head, n_kv, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = json.load(open(os.path.join(src, "adapter_config.json")))
with open(os.path.join(src, "adapter_model.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
w = gguf.GGUFWriter(out, "llama")
w.add_string("general.type", "adapter")
w.add_string("adapter.type", "lora")
w.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
for key in sorted(k for k in header if k != "__metadata__"):
    info = header[key]
    a, b = info["data_offsets"]
    dt = {"F32": "<f4", "F16": "<f2"}[info["dtype"]]
    t = np.frombuffer(data[a:b], dtype=dt).reshape(info["shape"]).astype(np.float32)
    parts = key.split(".")  # base_model.model.model.layers.I.block.proj.lora_X.weight
    layer, proj, ab = int(parts[4]), parts[6], parts[7]
    if ab == "lora_B" and proj in ("q_proj", "k_proj"):
        heads = n_head if proj == "q_proj" else n_kv
        o, r = t.shape
        t = t.reshape(heads, 2, o // heads // 2, r).swapaxes(1, 2).reshape(o, r)
    w.add_tensor(f"blk.{layer}.{NAMES[proj]}.weight.lora_{ab[-1].lower()}", np.ascontiguousarray(t))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(out)
