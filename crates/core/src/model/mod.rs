//! The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral) written on candle ops, its
//! weights (Hugging Face safetensors folders and GGUF files), tokenizer, chat template and
//! generation loop. Every linear layer is a [`Linear`] with a [`Site`], where the adapter code adds
//! per-row low-rank deltas through [`SiteDelta`]; this module never owns adapters.

mod cache;
pub mod config;
mod decoder;
mod generate;
mod linear;
mod loader;
pub mod qgemm;
mod sample;
mod template;
mod tokenizer;
mod weights;

use std::path::PathBuf;

pub use cache::SeqCache;
pub use config::{Arch, ModelConfig, RopeScaling, RopeStyle};
pub use decoder::{Decoder, LogitsAt, QuantLayout, RowInput};
pub use generate::{Decoding, GenerateParams, Generation, Next, Timings, check_request, generate};
pub(crate) use linear::add_tensor;
pub use linear::{
    DENSE_PREFILL_MIN_ROWS, Linear, LinearWeight, NoDelta, QuantKernel, Site, SiteDelta, SiteKind,
};
pub use loader::{BaseInfo, LoadOptions, Model, inspect_base, strip_format_suffix};
pub use sample::{Sampler, Sampling};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::TextTokenizer;
pub use weights::WeightStore;

/// The CPU kernel set this process runs (`avx512`, `avx2`, ...), for benchmark tables.
pub fn kernel_set() -> &'static str {
    ramole_kernels::Isa::detect().name()
}

/// Errors of loading and running a model. Each names the file and, where there is one, the tensor
/// or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {message}", file.display())]
    Config { file: PathBuf, message: String },
    #[error("{}: cannot read: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid {format} file: {message}", file.display())]
    Format {
        file: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{}: tensor {tensor} is missing", file.display())]
    MissingTensor { file: PathBuf, tensor: String },
    #[error("{}: tensor {tensor} has shape {actual:?}, expected {expected:?}", file.display())]
    TensorShape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{}: tensor {tensor}: {message}", file.display())]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("tokenizer ({source_name}): {message}")]
    Tokenizer {
        source_name: String,
        message: String,
    },
    #[error("chat template: {0}")]
    Template(String),
    #[error("input: {0}")]
    Input(String),
    #[error("tensor op: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    /// Keeps the message and drops candle's captured backtrace, which would otherwise be printed
    /// to users as part of the error text.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        ModelError::Candle(e)
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Parses a JSON file that a model folder may or may not have: `None` when it is absent, an
/// error naming the file when it is unreadable or malformed.
pub(crate) fn read_optional_json(path: &std::path::Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::Format {
            file: path.to_path_buf(),
            format: "JSON",
            message: e.to_string(),
        })
}
