//! The decoder against independent oracles: numpy logits for tiny Llama / Qwen2 / Mistral
//! fixtures, llama.cpp for the real SmolLM2 GGUF, and our own slow references (one row at a time,
//! one token at a time, dequantized weights).

use std::path::Path;

use crate::common::*;
use candle_core::quantized::GgmlDType;
use ramole_core::model::{
    ChatMessage, GenerateParams, LoadOptions, LogitsAt, Model, ModelError, NoDelta, QuantLayout,
    RowInput, generate,
};
use ramole_core::vocab::FinishReason;
use ramole_core::vocab::Role;
use serde_json::Value;

#[test]
fn tiny_fixtures_match_numpy_logits_and_tokenizer() {
    // llama: f32, two shards, llama3 rope scaling, untied head; qwen2: bf16, q/k/v bias, tied;
    // mistral: f16, sliding window 4 (shorter than every case).
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let model = load(&fixture(name));
        for case in expected(name) {
            let ids = ids_of(&case);
            let text = case["text"].as_str().unwrap();
            assert_eq!(model.tokenizer.encode(text).unwrap(), ids, "{name}: {text}");
            let got = logits_all(&model.decoder, &ids);
            let want = rows_of(&case);
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| max_abs_diff(g, w))
                .fold(0.0, f32::max);
            assert!(worst < 1e-4, "{name} {text:?}: max |diff| {worst}");
        }
    }
}

#[test]
fn rows_of_different_lengths_in_one_batch_equal_each_row_alone() {
    let model = load(&fixture("tiny-llama"));
    let d = &model.decoder;
    let cases = expected("tiny-llama");
    let seqs: Vec<Vec<u32>> = cases.iter().map(ids_of).collect();
    let alone: Vec<Vec<f32>> = seqs.iter().map(|s| logits_last(d, s)).collect();

    // Prefill of three rows of lengths 21, 16, 18 together.
    let mut caches: Vec<_> = seqs.iter().map(|_| d.new_cache()).collect();
    let rows: Vec<RowInput> = seqs.iter().map(|s| RowInput { tokens: s }).collect();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let batched: Vec<Vec<f32>> = d
        .forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (b, a) in batched.iter().zip(&alone) {
        assert!(max_abs_diff(b, a) < 1e-5);
    }

    // A decode step where the rows sit at different positions, mixed with a fresh prefill row.
    let fresh = &seqs[0][..5];
    let mut fresh_cache = d.new_cache();
    let step: Vec<Vec<u32>> = vec![vec![7], vec![42], vec![100]];
    let mut rows: Vec<RowInput> = step.iter().map(|s| RowInput { tokens: s }).collect();
    rows.push(RowInput { tokens: fresh });
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    refs.push(&mut fresh_cache);
    let mixed: Vec<Vec<f32>> = d
        .forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)
        .unwrap()
        .to_vec2()
        .unwrap();
    for i in 0..3 {
        let mut full = seqs[i].clone();
        full.extend(&step[i]);
        let want = logits_last(d, &full);
        let diff = max_abs_diff(&mixed[i], &want);
        assert!(diff < 1e-4, "row {i}: {diff}");
    }
    assert!(max_abs_diff(&mixed[3], &logits_last(d, fresh)) < 1e-5);
}

#[test]
fn token_by_token_decoding_equals_one_prefill() {
    // The KV cache path (and the sliding window, which the mistral fixture exceeds) against the
    // full causal forward.
    for name in ["tiny-qwen2", "tiny-mistral"] {
        let model = load(&fixture(name));
        let d = &model.decoder;
        let ids = ids_of(&expected(name)[0]);
        let full = logits_all(d, &ids);
        let mut cache = d.new_cache();
        for (i, &t) in ids.iter().enumerate() {
            let step = step_logits(d, &mut cache, t);
            let diff = max_abs_diff(&step, &full[i]);
            assert!(diff < 1e-4, "{name} position {i}: {diff}");
        }
        assert_eq!(cache.len(), ids.len());
    }
}

#[test]
fn gguf_f32_of_tiny_llama_matches_numpy_exactly() {
    // Exercises GGUF naming, the converter's q/k permutation with adjacent-pair RoPE and the
    // llama3 scaling stored as rope_freqs.
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_llama_gguf(dir.path(), GgmlDType::F32);
    let model = load(&path);
    for case in expected("tiny-llama") {
        let got = logits_all(&model.decoder, &ids_of(&case));
        let worst = got
            .iter()
            .zip(rows_of(&case))
            .map(|(g, w)| max_abs_diff(g, &w))
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "max |diff| {worst}");
    }
}

#[test]
fn quantized_gguf_agrees_with_its_dequantized_twin() {
    // Quantized matmuls quantize activations to 8 bits, so the twins differ by rounding: we
    // require a relative error below 3% of the logits' spread and the same greedy choice.
    let dir = tempfile::tempdir().unwrap();
    for (dtype, layout) in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1]
        .into_iter()
        .flat_map(|d| [(d, QuantLayout::Stored), (d, QuantLayout::Packed)])
    {
        let path = write_tiny_llama_gguf(dir.path(), dtype);
        let model = Model::load(
            &path,
            &LoadOptions {
                layout,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(model.decoder.sites().all(|l| l.is_quantized()));
        let twin = model.decoder.dequantized().unwrap();
        for case in expected("tiny-llama") {
            let ids = ids_of(&case);
            let q = logits_last(&model.decoder, &ids);
            let f = logits_last(&twin, &ids);
            let spread = f.iter().cloned().fold(f32::MIN, f32::max)
                - f.iter().cloned().fold(f32::MAX, f32::min);
            let rel = max_abs_diff(&q, &f) / spread;
            assert!(rel < 0.03, "{dtype:?} {layout:?}: relative error {rel}");
        }
    }
}

#[test]
fn smollm2_tokenizer_rebuilt_from_gguf_matches_llama_cpp() {
    let model = load(&smollm2());
    let oracle: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-llamacpp.json")).unwrap())
            .unwrap();
    for case in oracle["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode(text).unwrap(),
            ids_of(case),
            "{text:?}"
        );
        // Decoding gives the text back (special tokens are skipped).
        if !text.contains("<|") {
            assert_eq!(model.tokenizer.decode(&ids_of(case)).unwrap(), text);
        }
    }
}

#[test]
fn smollm2_logits_agree_with_llama_cpp() {
    // llama.cpp runs the Q4_1/Q8_0 weights with activations rounded to 8 bits; so does `packed`,
    // independently, and each rounding moves the logits by ~0.12 on average here (logits span
    // ~40). So: the same top-1 token; the top-10 logits within 0.75 of llama.cpp's; and, against
    // the exact product (the dequantized f32 twin), an error no larger than 1.25x llama.cpp's own.
    let oracle: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-llamacpp.json")).unwrap())
            .unwrap();
    let exact = Model::load(
        &smollm2(),
        &LoadOptions {
            layout: QuantLayout::Stored,
            ..Default::default()
        },
    )
    .unwrap()
    .decoder
    .dequantized()
    .unwrap();
    let exact: Vec<Vec<f32>> = oracle["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| logits_last(&exact, &ids_of(case)))
        .collect();
    for layout in [
        QuantLayout::Stored,
        QuantLayout::SlowTypesAsQ8_0,
        QuantLayout::Packed,
    ] {
        let model = Model::load(
            &smollm2(),
            &LoadOptions {
                layout,
                ..Default::default()
            },
        )
        .unwrap();
        let (mut ours_err, mut llama_err) = (0f64, 0f64);
        for (case, exact) in oracle["cases"].as_array().unwrap().iter().zip(&exact) {
            let logits = logits_last(&model.decoder, &ids_of(case));
            let top: Vec<u32> = case["top_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let best = ramole_core::model::Sampler::new(Default::default())
                .unwrap()
                .sample(&logits);
            assert_eq!(best, top[0], "{layout:?} {:?}", case["text"]);
            for (id, want) in top.iter().zip(case["top_logits"].as_array().unwrap()) {
                let (ours, want, x) = (
                    logits[*id as usize],
                    want.as_f64().unwrap() as f32,
                    exact[*id as usize],
                );
                let diff = (ours - want).abs();
                assert!(diff < 0.75, "{layout:?} {:?} id {id}: {diff}", case["text"]);
                ours_err += f64::from((ours - x).abs());
                llama_err += f64::from((want - x).abs());
            }
        }
        assert!(
            ours_err <= 1.25 * llama_err,
            "{layout:?}: error against the exact product {ours_err} vs llama.cpp's {llama_err}"
        );
    }
}

#[test]
fn smollm2_quantized_agrees_with_dequantized_twin() {
    let model = Model::load(
        &smollm2(),
        &LoadOptions {
            layout: QuantLayout::Stored,
            ..Default::default()
        },
    )
    .unwrap();
    let twin = model.decoder.dequantized().unwrap();
    let ids = model
        .tokenizer
        .encode("Once upon a time, there was a little")
        .unwrap();
    let q = logits_last(&model.decoder, &ids);
    let f = logits_last(&twin, &ids);
    let sampler = || ramole_core::model::Sampler::new(Default::default()).unwrap();
    assert_eq!(sampler().sample(&q), sampler().sample(&f));
    let diff = max_abs_diff(&q, &f);
    assert!(diff < 1.0, "max |diff| {diff}");
}

#[test]
fn smollm2_batched_decode_equals_each_row_alone() {
    // Batched decode sends up to 31 rows through our quantized kernel (Q8_0 decoded in registers,
    // Q4_1 through decoded f32 rows), 8 rows per pass with a remainder; a row alone takes the
    // one-row path and the batched prefill the dequantized f32 GEMM. All multiply the same
    // weights with f32 activations, so every row must get the logits it gets alone, up to
    // summation order. candle's kernel (8-bit activations) stays within quantization error.
    let texts = [
        "Once upon a time",
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at",
        "My favourite colour is",
        "In 1969, the first",
        "The quick brown fox",
        "To be or not to be,",
        "Rust is a language that",
    ];
    for layout in [QuantLayout::SlowTypesAsQ8_0, QuantLayout::Stored] {
        let model = Model::load(
            &smollm2(),
            &LoadOptions {
                layout,
                ..Default::default()
            },
        )
        .unwrap();
        // `Own` also at one row, where `Auto` may pick candle's kernel.
        let d = &model
            .decoder
            .with_quant_kernel(ramole_core::model::QuantKernel::Own)
            .unwrap();
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| model.tokenizer.encode(t).unwrap())
            .collect();
        let steps: Vec<[u32; 1]> = (0..texts.len() as u32).map(|i| [100 + 37 * i]).collect();
        let alone_with = |d: &ramole_core::model::Decoder, i: usize| {
            let mut cache = d.new_cache();
            let p = RowInput {
                tokens: &prompts[i],
            };
            d.forward(&[p], &mut [&mut cache], LogitsAt::Last, &NoDelta)
                .unwrap();
            step_logits(d, &mut cache, steps[i][0])
        };
        let alone: Vec<Vec<f32>> = (0..texts.len()).map(|i| alone_with(d, i)).collect();
        for batch in [3, texts.len()] {
            let mut caches: Vec<_> = (0..batch).map(|_| d.new_cache()).collect();
            let rows: Vec<RowInput> = prompts[..batch]
                .iter()
                .map(|p| RowInput { tokens: p })
                .collect();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            d.forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)
                .unwrap();
            let rows: Vec<RowInput> = steps[..batch]
                .iter()
                .map(|t| RowInput { tokens: t })
                .collect();
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let batched: Vec<Vec<f32>> = d
                .forward(&rows, &mut refs, LogitsAt::Last, &NoDelta)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
                let diff = max_abs_diff(b, a);
                assert!(diff < 2e-3, "{layout:?} batch {batch} row {i}: {diff}");
            }
        }
        // Against the dequantized twin (the same weights in f32, candle's f32 GEMM): ours is exact
        // up to summation order, candle's 8-bit activations are not.
        let twin = d.dequantized().unwrap();
        let candle = d
            .with_quant_kernel(ramole_core::model::QuantKernel::Candle)
            .unwrap();
        for i in [0, 4] {
            let t = alone_with(&twin, i);
            let c = alone_with(&candle, i);
            let spread = t.iter().cloned().fold(f32::MIN, f32::max)
                - t.iter().cloned().fold(f32::MAX, f32::min);
            let ours = max_abs_diff(&alone[i], &t) / spread;
            let theirs = max_abs_diff(&c, &t) / spread;
            eprintln!("{layout:?} row {i}: relative error ours {ours:.2e}, candle {theirs:.2e}");
            assert!(ours < 1e-4, "{layout:?} row {i}: ours differs by {ours}");
            assert!(
                theirs < 0.1,
                "{layout:?} row {i}: candle differs by {theirs}"
            );
        }
    }
}

/// Continues the story prompt; the result and the text streamed on the way.
fn story(model: &Model, params: GenerateParams) -> (ramole_core::model::Generation, String) {
    let ids = model
        .tokenizer
        .encode("Once upon a time, there was a little")
        .unwrap();
    let mut streamed = String::new();
    let g = generate(model, &ids, &params, &NoDelta, &mut |p| {
        streamed.push_str(p)
    })
    .unwrap();
    (g, streamed)
}

#[test]
fn smollm2_greedy_story_and_chat_reply_stop_cleanly() {
    let model = load(&smollm2());
    let (g, streamed) = story(
        &model,
        GenerateParams {
            max_tokens: 8,
            ..Default::default()
        },
    );
    assert!(g.text.starts_with(" girl"), "{:?}", g.text);
    assert_eq!(streamed, g.text);
    assert_eq!(g.generated_tokens, 8);
    assert_eq!(g.finish_reason, FinishReason::Length);

    let prompt = model
        .chat_prompt(&[ChatMessage::new(Role::User, "Say hello.")])
        .unwrap();
    let g = generate(
        &model,
        &prompt,
        &GenerateParams {
            max_tokens: 100,
            ..Default::default()
        },
        &NoDelta,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(g.finish_reason, FinishReason::Eos, "{:?}", g.text);
    assert!(
        !g.text.contains("<|im_end|>") && !g.text.is_empty(),
        "{:?}",
        g.text
    );
    assert!(g.generated_tokens < 100);
}

#[test]
fn stop_strings_end_generation_before_them() {
    let model = load(&smollm2());
    let (g, streamed) = story(
        &model,
        GenerateParams {
            max_tokens: 30,
            stop: vec![" who".into(), " named".into()],
            ..Default::default()
        },
    );
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, " girl");
    assert_eq!(streamed, " girl");
}

// ---- bad input -------------------------------------------------------------------------------

fn load_err(path: &Path) -> ModelError {
    match Model::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn malformed_config_is_refused_naming_the_file() {
    let dir = copy_fixture("tiny-qwen2");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, "{\"model_type\": \"qwen2\", \"hidden_size\": ").unwrap();
    let e = load_err(dir.path()).to_string();
    assert!(
        e.contains("config.json") && e.contains("not a valid config.json"),
        "{e}"
    );

    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-qwen2/config.json")).unwrap())
            .unwrap();
    v["num_key_value_heads"] = 3.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load_err(dir.path()).to_string();
    assert!(
        e.contains("num_key_value_heads = 3") && e.contains("num_attention_heads = 4"),
        "{e}"
    );

    v["num_key_value_heads"] = 1.into();
    v["model_type"] = "gpt_neox".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load_err(dir.path()).to_string();
    assert!(e.contains("\"gpt_neox\" is not supported"), "{e}");
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let dir = copy_fixture("tiny-qwen2");
    let file = dir.path().join("model.safetensors");
    edit_safetensors_header(&file, |h| {
        // Renaming keeps the data layout valid while the decoder's tensor disappears.
        let t = h.remove("model.layers.1.mlp.up_proj.weight").unwrap();
        h.insert("model.layers.1.mlp.up_proj.renamed".into(), t);
    });
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight is missing"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("tiny-qwen2");
    let file = dir.path().join("model.safetensors");
    edit_safetensors_header(&file, |h| {
        // [128, 64] stored as [64, 128]: same byte count, wrong shape.
        h.get_mut("model.layers.0.mlp.gate_proj.weight").unwrap()["shape"] =
            serde_json::json!([64, 128]);
    });
    let e = load_err(dir.path()).to_string();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight has shape [64, 128], expected [128, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_files_are_refused() {
    let dir = copy_fixture("tiny-llama");
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(dir.path()).to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("truncated"),
        "{e}"
    );

    let gdir = tempfile::tempdir().unwrap();
    let gguf = write_tiny_llama_gguf(gdir.path(), GgmlDType::Q8_0);
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 5000]).unwrap();
    let e = load_err(&gguf).to_string();
    assert!(e.contains("tiny-llama.gguf") && e.contains("tensor"), "{e}");
    std::fs::write(&gguf, &bytes[..100]).unwrap();
    let e = load_err(&gguf).to_string();
    assert!(e.contains("tiny-llama.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn chat_template_comes_from_the_model() {
    let qwen = load(&fixture("tiny-qwen2"));
    let msgs = [
        ChatMessage::new(Role::System, "Be brief."),
        ChatMessage::new(Role::User, "Hi"),
    ];
    let text = qwen.template.as_ref().unwrap().render(&msgs, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let llama = load(&fixture("tiny-llama"));
    let text = llama
        .template
        .as_ref()
        .unwrap()
        .render(&msgs[1..], true)
        .unwrap();
    assert_eq!(
        text,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // The template's special tokens stay single tokens.
    let ids = llama.chat_prompt(&msgs[1..]).unwrap();
    assert_eq!(
        ids[0],
        llama.tokenizer.encode("<|begin_of_text|>").unwrap()[0]
    );
    assert!(
        llama
            .tokenizer
            .is_eos(llama.tokenizer.encode("<|eot_id|>").unwrap()[0])
    );
}

#[test]
fn long_prefill_on_quantized_weights_equals_the_dequantized_reference() {
    // From DENSE_PREFILL_MIN_ROWS rows on, quantized linears dequantize and run the f32 GEMM:
    // that fast path must equal the dequantized twin, and stay within the quantization error of
    // the 8-bit-activation kernel that short inputs (decode) use.
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_llama_gguf(dir.path(), GgmlDType::Q4_0);
    let model = Model::load(
        &path,
        &LoadOptions {
            layout: QuantLayout::Stored,
            ..Default::default()
        },
    )
    .unwrap();
    let ids: Vec<u32> = expected("tiny-llama").iter().flat_map(ids_of).collect();
    assert!(ids.len() >= ramole_core::model::DENSE_PREFILL_MIN_ROWS);
    let fast = logits_all(&model.decoder, &ids);
    let twin = logits_all(&model.decoder.dequantized().unwrap(), &ids);
    for (f, t) in fast.iter().zip(&twin) {
        assert!(max_abs_diff(f, t) < 1e-4);
    }
    let mut cache = model.decoder.new_cache();
    for (i, &t) in ids.iter().enumerate() {
        let step = step_logits(&model.decoder, &mut cache, t);
        let spread = fast[i].iter().cloned().fold(f32::MIN, f32::max)
            - fast[i].iter().cloned().fold(f32::MAX, f32::min);
        let rel = max_abs_diff(&step, &fast[i]) / spread;
        assert!(rel < 0.03, "position {i}: relative error {rel}");
    }
}

#[test]
fn a_base_is_identified_by_its_repository_name() {
    let gguf = ramole_core::config::starter_base();
    assert!(
        gguf.exists(),
        "test models missing — run scripts/fetch-test-models.sh"
    );
    // general.name is a training-run label here; the file is named after the repository.
    let info = ramole_core::model::inspect_base(&gguf).unwrap();
    assert_eq!(info.id, "HuggingFaceTB/SmolLM2-135M-Instruct");
    for (copy, original) in [
        ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"),
        ("SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct"),
        ("Llama-3.2-1B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct"),
        ("Qwen2.5-0.5B-Instruct-AWQ", "Qwen2.5-0.5B-Instruct"),
        ("Mistral-7B-v0.1", "Mistral-7B-v0.1"),
    ] {
        assert_eq!(ramole_core::model::strip_format_suffix(copy), original);
    }
}
