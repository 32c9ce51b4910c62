#!/usr/bin/env python3
"""llama.cpp's next-token logits of SmolLM2-135M Q4_1 with one seeded random rank-8 all-linear
adapter at scale 4 (`ramole bench lora --adapters 1` writes it: seed 1000, alpha 16), for
tests/fixtures/smollm2-lora-llamacpp.json. Checks our LoRA on a llama GGUF (permuted q/k) against
an independent engine. Not run by CI; needs llama-cpp-python, gguf, numpy and a release build.

    python3 scripts/make-smollm2-lora-oracle.py SMOLLM2.gguf
"""
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import llama_cpp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
gguf_path = sys.argv[1]
tmp = tempfile.mkdtemp()
subprocess.run([os.path.join(HERE, "..", "target", "release", "ramole"), "bench", "lora", "--base", gguf_path,
                "--adapters", "1", "--rank", "8", "--decode-tokens", "1", "--repeats", "0", "--out", tmp], check=True)
lora = os.path.join(tmp, "adapter-0.gguf")
subprocess.run([sys.executable, os.path.join(HERE, "peft-to-gguf-lora.py"), os.path.join(tmp, "adapter-0"), "9", "3", lora], check=True)
llm = llama_cpp.Llama(model_path=gguf_path, verbose=False, logits_all=True, n_ctx=256, n_threads=2)
h = llama_cpp.llama_adapter_lora_init(llm._model.model, lora.encode())
llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(h), 1, (ctypes.c_float * 1)(4.0))
cases = []
for text in ["Once upon a time, there was a little", "The capital of France is"]:
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    l = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    top = np.argsort(-l)[:10]
    cases.append({"text": text, "ids": ids, "top_ids": top.tolist(), "top_logits": l[top].round(4).tolist()})
out = os.path.join(HERE, "..", "tests", "fixtures", "smollm2-lora-llamacpp.json")
json.dump({"generator": "scripts/make-smollm2-lora-oracle.py (llama-cpp-python %s)" % llama_cpp.__version__,
           "adapter": {"seed": 1000, "rank": 8, "alpha": 16.0, "gate": 4.0}, "cases": cases}, open(out, "w"), indent=1)
print("wrote", out)
