//! Reading named tensors from a Hugging Face safetensors folder (single file or sharded with an
//! index) or from a GGUF file, with the file and tensor named in every error. GGUF tensors keep
//! their quantized form; safetensors tensors in f16/bf16 are widened to f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use super::{ModelError, Result};

/// One safetensors file, memory-mapped and its header validated once.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
}

impl SafetensorsFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside what
        // we can defend against, exactly as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Format {
            file: path.to_path_buf(),
            format: "safetensors",
            message: describe_safetensors_error(&e),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
        })
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated when opened")
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer | E::HeaderTooSmall => {
            format!("the file is truncated or its header is corrupt ({e})")
        }
        other => other.to_string(),
    }
}

/// Where a model's tensors come from.
pub struct WeightStore(Store);

enum Store {
    Safetensors {
        dir: PathBuf,
        files: Vec<SafetensorsFile>,
        /// tensor name -> index into `files`
        by_name: HashMap<String, usize>,
    },
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        file: std::sync::Mutex<File>,
    },
}

/// A weight as stored: dense f32, or quantized blocks.
pub enum StoredTensor {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl WeightStore {
    /// Opens the safetensors of a Hugging Face folder: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
                file: index_path.clone(),
                source,
            })?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let index: Index = serde_json::from_str(&text).map_err(|e| ModelError::Format {
                file: index_path.clone(),
                format: "safetensors index",
                message: e.to_string(),
            })?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                    return Err(ModelError::Format {
                        file: index_path.clone(),
                        format: "safetensors index",
                        message: format!("shard name {s:?} must be a plain file name"),
                    });
                }
            }
            shards
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ModelError::Config {
                file: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json in this folder"
                    .into(),
            });
        };
        let mut files = Vec::new();
        let mut by_name = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let f = SafetensorsFile::open(&dir.join(name))?;
            for tensor in f.view().names() {
                by_name.insert(tensor.to_string(), i);
            }
            files.push(f);
        }
        Ok(WeightStore(Store::Safetensors {
            dir: dir.to_path_buf(),
            files,
            by_name,
        }))
    }

    /// Opens a GGUF file and reads its header (metadata and tensor table).
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Format {
            file: path.to_path_buf(),
            format: "GGUF",
            message: e.to_string(),
        })?;
        Ok(WeightStore(Store::Gguf {
            path: path.to_path_buf(),
            content,
            file: std::sync::Mutex::new(file),
        }))
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.0, Store::Gguf { .. })
    }

    /// The file to blame when `name` is missing or wrong.
    pub fn file_for(&self, name: &str) -> PathBuf {
        match &self.0 {
            Store::Safetensors {
                dir,
                files,
                by_name,
            } => by_name
                .get(name)
                .map(|&i| files[i].path.clone())
                .unwrap_or_else(|| match files.as_slice() {
                    [only] => only.path.clone(),
                    _ => dir.join("model.safetensors.index.json"),
                }),
            Store::Gguf { path, .. } => path.clone(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.0 {
            Store::Safetensors { by_name, .. } => by_name.contains_key(name),
            Store::Gguf { content, .. } => content.tensor_infos.contains_key(name),
        }
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.0 {
            Store::Safetensors { by_name, .. } => by_name.keys().cloned().collect(),
            Store::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.0 {
            Store::Gguf { content, .. } => Some(&content.metadata),
            Store::Safetensors { .. } => None,
        }
    }

    /// The shape of `name` as stored (rows first), checked against `expected`.
    fn check_shape(&self, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
        if actual != expected {
            return Err(ModelError::TensorShape {
                file: self.file_for(name),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            });
        }
        Ok(())
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            file: self.file_for(name),
            tensor: name.to_string(),
        }
    }

    fn tensor_err(&self, name: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tensor {
            file: self.file_for(name),
            tensor: name.to_string(),
            message: e.to_string(),
        }
    }

    /// Reads `name` with the given shape as stored: dense f32 for safetensors, quantized blocks
    /// (or dense for f32/f16 entries) for GGUF.
    pub fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<StoredTensor> {
        match &self.0 {
            Store::Safetensors { files, by_name, .. } => {
                let &i = by_name.get(name).ok_or_else(|| self.missing(name))?;
                let view = files[i].view();
                let t = view.tensor(name).map_err(|e| self.tensor_err(name, e))?;
                self.check_shape(name, t.shape(), shape)?;
                let dtype = match t.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    other => {
                        return Err(self.tensor_err(
                            name,
                            format!("dtype {other:?} is not supported (f32, f16, bf16)"),
                        ));
                    }
                };
                let tensor = Tensor::from_raw_buffer(t.data(), dtype, shape, device)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|e| self.tensor_err(name, e))?;
                Ok(StoredTensor::Dense(tensor))
            }
            Store::Gguf { content, file, .. } => {
                let info = content
                    .tensor_infos
                    .get(name)
                    .ok_or_else(|| self.missing(name))?;
                self.check_shape(name, info.shape.dims(), shape)?;
                let mut f = file.lock().expect("gguf file lock");
                let q = info
                    .read(&mut *f, content.tensor_data_offset, device)
                    .map_err(|e| self.tensor_err(name, e))?;
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        let t = q.dequantize(device).map_err(|e| self.tensor_err(name, e))?;
                        Ok(StoredTensor::Dense(t))
                    }
                    _ => Ok(StoredTensor::Quantized(Arc::new(q))),
                }
            }
        }
    }

    /// Reads `name` as a dense f32 tensor (dequantizing when stored quantized).
    pub fn dense(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self.stored(name, shape, device)? {
            StoredTensor::Dense(t) => Ok(t),
            StoredTensor::Quantized(q) => {
                q.dequantize(device).map_err(|e| self.tensor_err(name, e))
            }
        }
    }

    /// Stored shape of `name`, rows first, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.0 {
            Store::Safetensors { files, by_name, .. } => {
                let &i = by_name.get(name)?;
                files[i]
                    .view()
                    .tensor(name)
                    .ok()
                    .map(|t| t.shape().to_vec())
            }
            Store::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec()),
        }
    }
}
