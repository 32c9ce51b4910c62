//! Seeded random PEFT adapters: the adapters of benchmarks and math tests (no adapters are
//! published in a registry this project can reach).

use std::path::Path;

use candle_core::Tensor;
use ramole_core::adapter::AdapterError;
use ramole_core::model::Decoder;

/// Writes a PEFT adapter with seeded random factors on every linear of `base` (all-linear):
/// the adapters of benchmarks and math tests. `B` is non-zero, unlike a fresh PEFT init, so the
/// adapter changes the output. Files are written to a temporary name and renamed.
pub fn write_random_peft(
    dir: &Path,
    base: &Decoder,
    rank: usize,
    alpha: f64,
    seed: u64,
) -> Result<(), AdapterError> {
    use rand::{Rng, SeedableRng};
    let err = |file: &Path, message: String| AdapterError::Invalid {
        file: file.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = std::collections::HashMap::new();
    for l in base.sites() {
        let site = l.site().expect("decoder sites carry a Site");
        let path = format!("base_model.model.{}", site.hf_path());
        let (out_f, in_f) = (l.out_features(), l.in_features());
        let a_scale = 1.0 / (in_f as f32).sqrt();
        let b_scale = 0.3 / (rank as f32).sqrt();
        let a: Vec<f32> = (0..rank * in_f)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * a_scale)
            .collect();
        let b: Vec<f32> = (0..out_f * rank)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * b_scale)
            .collect();
        let to_t = |v: Vec<f32>, shape: (usize, usize)| {
            Tensor::from_vec(v, shape, &ramole_core::device::compute())
                .map_err(|e| err(dir, e.to_string()))
        };
        tensors.insert(format!("{path}.lora_A.weight"), to_t(a, (rank, in_f))?);
        tensors.insert(format!("{path}.lora_B.weight"), to_t(b, (out_f, rank))?);
    }
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": "all-linear", "use_rslora": false, "use_dora": false, "bias": "none",
        "modules_to_save": null, "lora_dropout": 0.0, "inference_mode": true,
    });
    let st = dir.join("adapter_model.safetensors");
    let tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| err(&st, e.to_string()))?;
    std::fs::rename(&tmp, &st).map_err(|source| AdapterError::Io { file: st, source })?;
    let cfg = dir.join("adapter_config.json");
    let tmp = dir.join(".adapter_config.json.tmp");
    std::fs::write(&tmp, config.to_string())
        .and_then(|_| std::fs::rename(&tmp, &cfg))
        .map_err(|source| AdapterError::Io { file: cfg, source })?;
    Ok(())
}
