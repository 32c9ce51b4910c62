//! Helpers shared by the integration tests: fixtures, oracles, logits, a GGUF writer.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use ramole_core::model::{Decoder, LoadOptions, LogitsAt, Model, NoDelta, RowInput, SeqCache};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn smollm2() -> PathBuf {
    let p = ramole_core::config::starter_base();
    assert!(
        p.exists(),
        "test model missing: {} — run scripts/fetch-test-models.sh (RAMOLE_TEST_MODELS={})",
        p.display(),
        ramole_core::config::starter_models_dir().display()
    );
    p
}

pub fn expected(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

pub fn ids_of(case: &Value) -> Vec<u32> {
    case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn rows_of(case: &Value) -> Vec<Vec<f32>> {
    case["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn logits_all(d: &Decoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = d.new_cache();
    d.forward(
        &[RowInput { tokens: ids }],
        &mut [&mut cache],
        LogitsAt::All,
        &NoDelta,
    )
    .unwrap()
    .to_vec2()
    .unwrap()
}

pub fn logits_last(d: &Decoder, ids: &[u32]) -> Vec<f32> {
    let mut cache = d.new_cache();
    d.forward(
        &[RowInput { tokens: ids }],
        &mut [&mut cache],
        LogitsAt::Last,
        &NoDelta,
    )
    .unwrap()
    .squeeze(0)
    .unwrap()
    .to_vec1()
    .unwrap()
}

/// Feeds one token after what `cache` holds; the next-token logits.
pub fn step_logits(d: &Decoder, cache: &mut SeqCache, token: u32) -> Vec<f32> {
    d.forward(
        &[RowInput { tokens: &[token] }],
        &mut [cache],
        LogitsAt::Last,
        &NoDelta,
    )
    .unwrap()
    .squeeze(0)
    .unwrap()
    .to_vec1()
    .unwrap()
}

pub fn load(path: &Path) -> Model {
    Model::load(path, &LoadOptions::default()).unwrap()
}

/// Writes the tiny-llama fixture as a llama.cpp-style GGUF: q/k rows permuted for adjacent-pair
/// RoPE as llama.cpp's converter does, the llama3 scaling as `rope_freqs.weight`, linear weights
/// in `dtype`, norms in f32. The tokenizer.json is copied beside it.
pub fn write_tiny_llama_gguf(dir: &Path, dtype: GgmlDType) -> PathBuf {
    let src = fixture("tiny-llama");
    let model = load(&src);
    let cfg = model.decoder.config().clone();
    let dev = ramole_core::device::compute();
    let st = ramole_core::model::WeightStore::open_safetensors_dir(&src).unwrap();
    let dense = |name: &str| -> Tensor {
        let shape = st.shape_of(name).unwrap();
        st.dense(name, &shape, &dev).unwrap()
    };
    // [out, in] with out = heads * head_dim: within each head, interleave the two halves.
    let permute = |w: Tensor, heads: usize| -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        w.reshape((heads, 2, out / heads / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q = |t: &Tensor, dt: GgmlDType| QTensor::quantize(t, dt).unwrap();
    tensors.push((
        "token_embd.weight".into(),
        q(&dense("model.embed_tokens.weight"), dtype),
    ));
    tensors.push((
        "output_norm.weight".into(),
        q(&dense("model.norm.weight"), GgmlDType::F32),
    ));
    tensors.push(("output.weight".into(), q(&dense("lm_head.weight"), dtype)));
    let divisors: Vec<f32> = {
        let base = ramole_core::model::ModelConfig {
            rope_scaling: ramole_core::model::RopeScaling::None,
            ..cfg.clone()
        }
        .rope_inv_freq();
        base.iter()
            .zip(cfg.rope_inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect()
    };
    tensors.push((
        "rope_freqs.weight".into(),
        q(&Tensor::new(divisors, &dev).unwrap(), GgmlDType::F32),
    ));
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}.");
        let mut put = |gguf: &str, hf: &str, dt: GgmlDType, heads: Option<usize>| {
            let mut t = dense(&format!("{p}{hf}"));
            if let Some(h) = heads {
                t = permute(t, h);
            }
            tensors.push((format!("blk.{i}.{gguf}"), q(&t, dt)));
        };
        put(
            "attn_norm.weight",
            "input_layernorm.weight",
            GgmlDType::F32,
            None,
        );
        put(
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            GgmlDType::F32,
            None,
        );
        put(
            "attn_q.weight",
            "self_attn.q_proj.weight",
            dtype,
            Some(cfg.num_heads),
        );
        put(
            "attn_k.weight",
            "self_attn.k_proj.weight",
            dtype,
            Some(cfg.num_kv_heads),
        );
        put("attn_v.weight", "self_attn.v_proj.weight", dtype, None);
        put("attn_output.weight", "self_attn.o_proj.weight", dtype, None);
        put("ffn_gate.weight", "mlp.gate_proj.weight", dtype, None);
        put("ffn_up.weight", "mlp.up_proj.weight", dtype, None);
        put("ffn_down.weight", "mlp.down_proj.weight", dtype, None);
    }
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(cfg.num_layers as u32)),
        ("llama.embedding_length", V::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            V::U32(cfg.intermediate_size as u32),
        ),
        ("llama.attention.head_count", V::U32(cfg.num_heads as u32)),
        (
            "llama.attention.head_count_kv",
            V::U32(cfg.num_kv_heads as u32),
        ),
        ("llama.rope.dimension_count", V::U32(cfg.head_dim as u32)),
        ("llama.rope.freq_base", V::F32(cfg.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            V::F32(cfg.rms_norm_eps as f32),
        ),
        (
            "llama.context_length",
            V::U32(cfg.max_position_embeddings as u32),
        ),
    ];
    let path = dir.join("tiny-llama.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.join("tokenizer_config.json"),
    )
    .unwrap();
    path
}

pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// Rewrites the safetensors header of `file` with `edit` applied (data unchanged).
pub fn edit_safetensors_header(
    file: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}
