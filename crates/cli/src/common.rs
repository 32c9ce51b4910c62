//! What the command files share: opening the library, reading JSON inputs, the base-model and
//! sampling flags, an adapter's JSON, the Hub client and a terminal progress bar. Command files
//! import this module and ramole-core, never each other.

use std::io::{IsTerminal, StdoutLock, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ramole_core::catalog::AdapterRecord;
use ramole_core::config::{self, Settings};
use ramole_core::hub::{HubCache, HubClient, Progress, ProgressEvent, Stage};
use ramole_core::library::Library;
use ramole_core::model::{GenerateParams, LoadOptions, Model, QuantLayout, Sampling};
use ramole_core::vocab::Gating;
use serde_json::json;

/// The library in `$RAMOLE_HOME`, reporting what opening it repaired.
pub(crate) fn open() -> Result<Library> {
    let dir = config::data_dir();
    let lib = Library::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    for r in &lib.repairs {
        eprintln!("ramole: repaired: {r}");
    }
    Ok(lib)
}

/// `--gating` parsed, when given.
pub(crate) fn parse_gating(g: &Option<String>) -> Result<Option<Gating>> {
    Ok(g.as_deref().map(str::parse).transpose()?)
}

pub(crate) fn adapter_json(
    lib: &Library,
    rec: &AdapterRecord,
    with_samples: bool,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(rec)?;
    v["path"] = json!(lib.adapter_dir(&rec.id));
    let samples = lib.catalog().samples(rec.key)?;
    v["sample_count"] = json!(samples.len());
    if with_samples {
        v["samples"] = serde_json::to_value(&samples)?;
    }
    Ok(v)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not the expected JSON", path.display()))
}

/// The embedder given, else the library's, else the test MiniLM.
pub(crate) fn embedder_or_default(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| match config::Settings::load(&config::data_dir()) {
        Ok(s) => s.embedder_path,
        Err(_) => config::starter_embedder(),
    })
}

#[derive(Args, Clone)]
pub(crate) struct BaseArgs {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub(crate) base: PathBuf,
    /// How quantized GGUF tensors are held: `packed` (our int8 kernels on the stored types,
    /// where the CPU has them, else `q8`; the fastest and the file's size), `q8` (candle's
    /// kernels and ours with f32 activations, Q4_1/Q5_0/Q5_1 re-quantized to Q8_0) or `stored`
    /// (candle's kernels on the file's tensors).
    #[arg(long, value_enum, default_value_t = LayoutArg::Packed)]
    pub(crate) quant_layout: LayoutArg,
}

impl BaseArgs {
    pub(crate) fn load(&self) -> Result<Model> {
        let opts = LoadOptions {
            layout: self.quant_layout.into(),
            ..LoadOptions::default()
        };
        Model::load(&self.base, &opts).with_context(|| format!("loading {}", self.base.display()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LayoutArg {
    Packed,
    Stored,
    Q8,
}

impl From<LayoutArg> for QuantLayout {
    fn from(a: LayoutArg) -> Self {
        match a {
            LayoutArg::Packed => QuantLayout::Packed,
            LayoutArg::Stored => QuantLayout::Stored,
            LayoutArg::Q8 => QuantLayout::SlowTypesAsQ8_0,
        }
    }
}

/// Generation settings shared by `generate` and `chat`.
#[derive(Args)]
pub(crate) struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    pub(crate) fn params(&self, stop: Vec<String>) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            stop,
            ignore_eos: false,
        }
    }
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub(crate) struct TerminalProgress {
    bar: Option<Mutex<(ProgressBar, String)>>,
}

impl TerminalProgress {
    pub(crate) fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            Mutex::new((b, String::new()))
        });
        Self { bar }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.lock().expect("progress lock").0.finish_and_clear();
        }
    }
}

impl Progress for TerminalProgress {
    fn report(&self, e: &ProgressEvent) {
        let Some(b) = &self.bar else { return };
        let mut g = b.lock().expect("progress lock");
        let (bar, file) = &mut *g;
        match e.stage {
            Stage::Download => {
                if *file != e.file {
                    *file = e.file.clone();
                    bar.set_message(e.file.clone());
                    bar.set_length(e.total);
                }
                bar.set_position(e.done);
            }
            s => bar.set_message(format!("{s:?}").to_lowercase()),
        }
    }
}

pub(crate) fn client_for(settings: Option<&Settings>) -> (HubClient, HubCache) {
    let cfg = config::hub_config(&settings.map(|s| s.hub.clone()).unwrap_or_default());
    (HubClient::new(&cfg), HubCache::new(cfg.cache_dir.clone()))
}

/// Standard output of a reply: the text streams as it comes unless `--json` asked for one
/// object at the end, which is then written through `Write`.
pub(crate) struct ReplyOut {
    out: StdoutLock<'static>,
    stream: bool,
}

impl ReplyOut {
    pub(crate) fn new(json: bool) -> Self {
        Self {
            out: std::io::stdout().lock(),
            stream: !json,
        }
    }

    /// One piece of streamed text. A closed pipe must not kill generation with a panic: the
    /// result is still returned.
    pub(crate) fn text(&mut self, piece: &str) {
        if self.stream {
            let _ = self.out.write_all(piece.as_bytes());
            let _ = self.out.flush();
        }
    }
}

impl Write for ReplyOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
