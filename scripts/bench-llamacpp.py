#!/usr/bin/env python3
"""llama.cpp's prefill and decode tokens/s on a GGUF, measured like `ramole bench model`:
synthetic ids (i*7919) % (vocab-200) + 100, prefill of N tokens, then 64 greedy steps after a
32-token prompt, best of R after one warm-up. Prints one JSON line. Needs llama-cpp-python."""
import json
import sys
import time

import llama_cpp
import numpy as np

path, threads = sys.argv[1], int(sys.argv[2])
prompt_n, decode_n, repeats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = llama_cpp.Llama(model_path=path, n_ctx=max(1024, prompt_n + 64), n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
ids = lambda n: [(i * 7919) % (vocab - 200) + 100 for i in range(n)]
best_p = best_d = 0.0
for rep in range(repeats + 1):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids(prompt_n))
    p = prompt_n / (time.perf_counter() - t)
    llm.reset()
    llm.eval(ids(32))
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(decode_n):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    d = decode_n / (time.perf_counter() - t)
    if rep > 0:
        best_p, best_d = max(best_p, p), max(best_d, d)
print(json.dumps({"engine": "llama.cpp " + llama_cpp.__version__, "prefill_tok_s": best_p, "decode_tok_s": best_d}))
