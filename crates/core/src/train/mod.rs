//! Training with candle's autograd on the CPU: LoRA adapters from examples ([`lora`]),
//! RouterLoRAs over frozen adapters ([`router`]), the retriever's sentence encoder by
//! contrastive fine-tuning ([`retriever`]), and the pieces every training loop here shares: the
//! examples file, the AdamW optimizer whose state can be checkpointed, and the typed errors.

pub mod lora;
pub mod retriever;
pub mod router;

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};

pub use lora::{
    Encoded, LoraTrainer, PromptTemplate, StepReport, TrainConfig, TrainOutcome, TrainableLora,
    encode_example, parse_targets, prompt_tokens, train_lora,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad line of a data file: the file, the 1-based line and what is wrong.
    #[error("{}: line {line}: {message}", file.display())]
    Data {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: cannot read or write: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    #[error(transparent)]
    Embed(#[from] crate::embed::EmbedError),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(e.into())
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Examples in a data file: at most this many.
pub const MAX_EXAMPLES: usize = 100_000;
/// Characters of one input or target.
pub const MAX_EXAMPLE_CHARS: usize = 32_000;
/// Bytes of an examples file (a full set of the longest examples fits).
pub const MAX_EXAMPLES_FILE_BYTES: u64 = 8 << 30;

/// One training example: the text the model reads and the text it should answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Example {
    pub input: String,
    pub target: String,
}

/// Reads JSON lines with `input` or `inputs` and `target` or `targets` (strings). Blank lines
/// are skipped; any other bad line is an error naming its number.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let field = |v: &serde_json::Value, names: [&str; 2]| -> std::result::Result<String, String> {
        let text = crate::files::text_field(v, names)?;
        let name = names[0];
        if text.trim().is_empty() {
            return Err(format!("\"{name}\" is empty"));
        }
        let n = text.chars().count();
        if n > MAX_EXAMPLE_CHARS {
            return Err(format!(
                "\"{name}\" has {n} characters, the limit is {MAX_EXAMPLE_CHARS}"
            ));
        }
        Ok(text.to_string())
    };
    let mut count = 0;
    let out = crate::files::read_json_lines(path, MAX_EXAMPLES_FILE_BYTES, |v| {
        count += 1;
        if count > MAX_EXAMPLES {
            return Err(format!(
                "more than {MAX_EXAMPLES} examples; the limit is {MAX_EXAMPLES}"
            ));
        }
        Ok(Example {
            input: field(v, ["input", "inputs"])?,
            target: field(v, ["target", "targets"])?,
        })
    })
    .map_err(|e| match e {
        crate::files::JsonLinesError::Io { path, source } => TrainError::Io { path, source },
        crate::files::JsonLinesError::Line {
            path,
            line,
            message,
        } => TrainError::Data {
            file: path,
            line,
            message,
        },
        e @ crate::files::JsonLinesError::TooLarge { .. } => TrainError::Invalid(e.to_string()),
    })?;
    if out.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no examples (JSON lines with \"input\" and \"target\")",
            path.display()
        )));
    }
    Ok(out)
}

/// The name of an adapter trained in the app (also its folder name): trimmed, 1..=64 letters,
/// digits, `-`, `_` or `.`, not starting with `.`.
pub fn check_adapter_name(name: &str) -> Result<String> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if !ok {
        return Err(TrainError::Invalid(format!(
            "adapter name {name:?} must be 1..=64 letters, digits, '-', '_' or '.' (not starting with '.')"
        )));
    }
    Ok(name.to_string())
}

/// AdamW (decoupled weight decay) over a fixed list of variables. Its moments are plain tensors
/// so a checkpoint can save and restore them exactly.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates applied so far (bias correction uses it).
    pub step: usize,
    /// First and second moments, one per variable, in the order of `vars`.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = || -> Result<Vec<Tensor>> {
            Ok(vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?)
        };
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: zeros()?,
            v: zeros()?,
        })
    }

    /// One update of every variable with its gradient, at learning rate `lr`.
    pub fn update(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let p = var.as_tensor();
            let decayed = if self.weight_decay > 0.0 {
                (p * (1.0 - lr * self.weight_decay))?
            } else {
                p.clone()
            };
            var.set(&(decayed - (step * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// One optimizer update with gradient accumulation, shared by the LoRA and router trainers:
/// pass `i` of `passes` returns its summed loss, which is scaled by the batch's
/// `answer_tokens` and back-propagated on its own (so only one pass's activations are alive),
/// the gradients of `vars` are summed over the passes, clipped to `max_grad_norm` and applied
/// at learning rate `lr`. Returns the batch's mean loss per answer token and the gradient norm
/// before clipping; a loss that is not finite stops the run with the step named.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulated_update(
    opt: &mut AdamW,
    vars: &[Var],
    lr: f64,
    max_grad_norm: f64,
    answer_tokens: usize,
    passes: usize,
    mut pass_loss: impl FnMut(usize) -> Result<Tensor>,
) -> Result<(f64, f64)> {
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut loss_sum = 0f64;
    for i in 0..passes {
        let nll = pass_loss(i)?;
        loss_sum += nll.to_scalar::<f32>()? as f64;
        let store = (nll / answer_tokens.max(1) as f64)?.backward()?;
        for (g, var) in grads.iter_mut().zip(vars) {
            if let Some(d) = store.get(var.as_tensor()) {
                *g = Some(match g.take() {
                    Some(acc) => (acc + d)?,
                    None => d.clone(),
                });
            }
        }
    }
    let mut grads: Vec<Tensor> = grads
        .into_iter()
        .zip(vars)
        .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    let loss = loss_sum / answer_tokens.max(1) as f64;
    if !loss.is_finite() {
        return Err(TrainError::Invalid(format!(
            "the loss became {loss} at step {}; try a lower learning rate than {lr}",
            opt.step + 1
        )));
    }
    let grad_norm = clip_grad_norm(&mut grads, max_grad_norm)?;
    opt.update(vars, &grads, lr)?;
    Ok((loss, grad_norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn examples_accept_both_field_names_and_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"input\": \"a\", \"target\": \"b\"}\n\n{\"inputs\": \"c\", \"targets\": \"d\"}\n",
        )
        .unwrap();
        let ex = read_examples(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].input, "c");
        assert_eq!(ex[1].target, "d");
        for (text, want) in [
            (
                "{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\"}\n",
                "line 2: needs a \"target\"",
            ),
            (
                "{\"input\": \"a\", \"target\": \"b\"}\nnot json\n",
                "line 2: not valid JSON",
            ),
            (
                "{\"input\": 3, \"target\": \"b\"}\n",
                "line 1: \"input\" must be a string",
            ),
            (
                "{\"input\": \"a\", \"target\": \"  \"}\n",
                "line 1: \"target\" is empty",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_examples(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("d.jsonl"), "{e}");
        }
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_examples(&p)
                .unwrap_err()
                .to_string()
                .contains("no examples")
        );
    }

    #[test]
    fn adamw_matches_the_formula_on_one_scalar() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&var), 0.1, 0.0).unwrap();
        let g = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        opt.update(std::slice::from_ref(&var), std::slice::from_ref(&g), 0.1)
            .unwrap();
        // First step: m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps) = lr.
        let p = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p - 0.9).abs() < 1e-6, "{p}");
        opt.update(std::slice::from_ref(&var), &[g], 0.1).unwrap();
        let p2 = var.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((p2 - 0.8).abs() < 1e-5, "{p2}");
    }

    #[test]
    fn clipping_scales_to_the_limit() {
        let mut g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
