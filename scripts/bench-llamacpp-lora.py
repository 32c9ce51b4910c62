#!/usr/bin/env python3
"""llama.cpp's decode tokens/s with no adapter and with a gated mixture of GGUF LoRAs (scale 1/k
each), interleaved, best of R, measured like `ramole bench lora`. Prints one JSON line.

    python3 scripts/bench-llamacpp-lora.py BASE.gguf THREADS STEPS REPEATS LORA.gguf...
"""
import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np

path, threads, steps, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loras = sys.argv[5:]
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919) % (vocab - 200) + 100 for i in range(32)]
handles = [llama_cpp.llama_adapter_lora_init(llm._model.model, p.encode()) for p in loras]
arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
scales = (ctypes.c_float * len(handles))(*([1.0 / len(handles)] * len(handles)))


def rate(with_lora):
    if with_lora:
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, len(handles), scales)
    else:
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
    llm.reset()
    llm.eval(prompt)
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return steps / (time.perf_counter() - t)


base = mixed = 0.0
for rep in range(repeats + 1):
    b, m = rate(False), rate(True)
    if rep:
        base, mixed = max(base, b), max(mixed, m)
print(json.dumps({"engine": "llama.cpp " + llama_cpp.__version__, "base_decode_tok_s": base,
                  "mixture_decode_tok_s": mixed, "slowdown": 1 - mixed / base}))
