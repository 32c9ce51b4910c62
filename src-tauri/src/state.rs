//! What the desktop app holds between commands, free of tauri so it is tested without a window:
//! the library (catalog + index + embedder) behind a lock, the engine (loaded in the background
//! once a base is set up), and the cancellable tasks the UI started (downloads, installs,
//! training, chat streams). Every operation is a core call plus the conversion to a DTO; the
//! library lock is never held while a reply generates. Whoever watches the app (the UI's
//! `app_watch` channel) hears the status whenever the engine's state changes, and a command
//! waiting for a loading model wakes when it is ready: nothing polls.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ramole_core::catalog::AdapterRecord;
use ramole_core::chat;
use ramole_core::config::{self, SettingsEdit};
use ramole_core::engine::{Engine, EngineConfig, JobHandle};
use ramole_core::hub::{
    self, AdapterHit, HubCache, HubClient, Progress, ProgressEvent, PullRequest, SearchRequest,
    Sort,
};
use ramole_core::library::{self, InstallRequest, Library, LibraryError};
use ramole_core::model::{LoadOptions, Model};
use ramole_core::train::{self, PromptTemplate, TrainConfig};
use ramole_core::transcript::{ExportFormat, Exported, Transcript};

use crate::dto::*;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::token::TokenStore;

/// How long a command waits for a model that is still loading.
const ENGINE_WAIT: Duration = Duration::from_secs(300);

enum EngineSlot {
    Idle,
    Loading,
    Ready(Arc<Engine>),
    Failed(String),
}

/// A task the UI may cancel.
enum Task {
    /// Downloads, installs, training: polled between steps.
    Flag(Arc<AtomicBool>),
    /// A chat reply in the engine.
    Job(JobHandle),
}

/// Hears the app's status when the engine's state changes; `false` says it is gone.
pub type Watcher = Box<dyn Fn(&AppStatus) -> bool + Send + Sync>;

pub struct AppState {
    home: PathBuf,
    library: Mutex<Option<Library>>,
    engine: Mutex<EngineSlot>,
    /// Signalled whenever `engine` changes, so a command waiting for the model wakes at once.
    engine_changed: Condvar,
    watchers: Mutex<Vec<Watcher>>,
    tasks: Mutex<HashMap<String, Task>>,
    /// Ids that name the active base's weights on the Hub (mirrors, quantized copies), per base.
    equivalents: Mutex<HashMap<String, Vec<String>>>,
    tokens: TokenStore,
    suggested: Suggested,
}

/// Reports progress through a callback and reads a cancel flag.
struct Reporter<'a> {
    report: &'a (dyn Fn(&ProgressEvent) + Sync),
    cancel: Arc<AtomicBool>,
}

impl Progress for Reporter<'_> {
    fn report(&self, event: &ProgressEvent) {
        (self.report)(event)
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Removes a task from the table when the work ends, however it ends.
struct TaskGuard<'a> {
    state: &'a AppState,
    id: String,
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        self.state.tasks().remove(&self.id);
    }
}

impl AppState {
    /// Opens the data folder `home`; when it is set up the model starts loading in the
    /// background. A damaged library is reported by `status`, not fatal.
    pub fn new(home: PathBuf, suggested: Suggested, tokens: TokenStore) -> Arc<Self> {
        let state = Arc::new(Self {
            home,
            library: Mutex::new(None),
            engine: Mutex::new(EngineSlot::Idle),
            engine_changed: Condvar::new(),
            watchers: Mutex::new(Vec::new()),
            tasks: Mutex::new(HashMap::new()),
            equivalents: Mutex::new(HashMap::new()),
            tokens,
            suggested,
        });
        match Library::open(&state.home) {
            Ok(lib) => {
                *state.lib_slot() = Some(lib);
                state.clone().load_engine();
            }
            Err(LibraryError::Settings(config::SettingsError::Missing { .. })) => {}
            Err(e) => state.set_engine(EngineSlot::Failed(e.to_string())),
        }
        state
    }

    /// Adds a watcher and returns the status it starts from; it hears every later change of the
    /// engine's state until it answers `false`.
    pub fn watch(&self, watcher: Watcher) -> AppStatus {
        let status = self.status();
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
        status
    }

    /// Records the engine's new state, wakes the commands waiting for it and tells the
    /// watchers (no other lock is held while they hear it).
    fn set_engine(&self, slot: EngineSlot) {
        *self.engine_slot() = slot;
        self.engine_changed.notify_all();
        let status = self.status();
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w(&status));
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    fn lib_slot(&self) -> MutexGuard<'_, Option<Library>> {
        // A panic while holding the lock leaves the library as it was between two core calls;
        // each core call is atomic on disk, so the value is still usable.
        self.library.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine_slot(&self) -> MutexGuard<'_, EngineSlot> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Task>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the library, or fails with `not_ready` before the first-run setup.
    fn with_lib<T>(&self, f: impl FnOnce(&mut Library) -> ApiResult<T>) -> ApiResult<T> {
        let mut slot = self.lib_slot();
        match slot.as_mut() {
            Some(lib) => f(lib),
            None => Err(ApiError::not_ready(
                "no base model is set up yet: choose one on the first-run screen",
            )),
        }
    }

    /// Loads the library's base model into a new engine on a background thread.
    fn load_engine(self: Arc<Self>) {
        let Some(base) = self
            .lib_slot()
            .as_ref()
            .map(|l| l.settings().base_path.clone())
        else {
            return;
        };
        self.set_engine(EngineSlot::Loading);
        std::thread::spawn(move || {
            let slot = match Model::load(&base, &LoadOptions::default()) {
                Ok(model) => {
                    let engine = Engine::start(Arc::new(model), EngineConfig::default());
                    // A router that does not load leaves the other plans working; `router`
                    // then answers that there is none.
                    match self.with_lib(|l| Ok(l.load_router()?)) {
                        Ok(router) => engine.set_router(router),
                        Err(e) => eprintln!("router not loaded: {}", e.message),
                    }
                    EngineSlot::Ready(Arc::new(engine))
                }
                Err(e) => EngineSlot::Failed(format!("loading {}: {e}", base.display())),
            };
            self.set_engine(slot);
        });
    }

    /// The engine, waiting (woken by [`AppState::set_engine`]) while the model loads.
    fn engine(&self) -> ApiResult<Arc<Engine>> {
        let deadline = Instant::now() + ENGINE_WAIT;
        let mut slot = self.engine_slot();
        loop {
            match &*slot {
                EngineSlot::Ready(e) => return Ok(e.clone()),
                EngineSlot::Failed(m) => return Err(ApiError::new(ErrorCode::Model, m.clone())),
                EngineSlot::Idle => {
                    return Err(ApiError::not_ready(
                        "no base model is set up yet: choose one on the first-run screen",
                    ));
                }
                EngineSlot::Loading => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::not_ready(format!(
                    "the model is still loading after {} s",
                    ENGINE_WAIT.as_secs()
                )));
            }
            slot = self
                .engine_changed
                .wait_timeout(slot, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Registers a cancellable task; the guard unregisters it.
    fn start_task(&self, id: &str, task: Task) -> ApiResult<TaskGuard<'_>> {
        check_task_id(id)?;
        let mut tasks = self.tasks();
        if tasks.contains_key(id) {
            return Err(ApiError::invalid(format!("task {id} is already running")));
        }
        tasks.insert(id.to_string(), task);
        Ok(TaskGuard {
            state: self,
            id: id.to_string(),
        })
    }

    fn flag_task(&self, id: &str) -> ApiResult<(TaskGuard<'_>, Arc<AtomicBool>)> {
        let flag = Arc::new(AtomicBool::new(false));
        Ok((self.start_task(id, Task::Flag(flag.clone()))?, flag))
    }

    /// Cancels a running task; false when no task has this id (it already ended).
    pub fn cancel(&self, id: &str) -> bool {
        match self.tasks().get(id) {
            Some(Task::Flag(f)) => {
                f.store(true, Ordering::Relaxed);
                true
            }
            Some(Task::Job(h)) => {
                h.cancel();
                true
            }
            None => false,
        }
    }

    // ---- status and setup --------------------------------------------------------------------

    pub fn status(&self) -> AppStatus {
        let (engine, engine_error) = match &*self.engine_slot() {
            EngineSlot::Idle => (EngineState::Idle, None),
            EngineSlot::Loading => (EngineState::Loading, None),
            EngineSlot::Ready(_) => (EngineState::Ready, None),
            EngineSlot::Failed(m) => (EngineState::Failed, Some(m.clone())),
        };
        let slot = self.lib_slot();
        let router = slot.as_ref().is_some_and(|l| l.has_router());
        let (base, embedder, adapters) = match slot.as_ref() {
            Some(lib) => (
                Some(BaseDto {
                    id: lib.settings().base_id.clone(),
                    path: lib.settings().base_path.clone(),
                    architecture: lib.base().config.arch.name().to_string(),
                    context: lib.base().config.max_position_embeddings,
                    weight_bytes: lib.base_weight_bytes(),
                }),
                Some(EmbedderDto {
                    id: lib.embedder_id().to_string(),
                    path: lib.settings().embedder_path.clone(),
                }),
                lib.catalog().adapters().map(|a| a.len()).unwrap_or(0),
            ),
            None => (None, None, 0),
        };
        AppStatus {
            ready: slot.is_some(),
            engine,
            engine_error,
            home: self.home.clone(),
            base,
            embedder,
            adapters,
            router,
            suggested: self.suggested.clone(),
        }
    }

    /// Records the base model and embedder (validating both), reopens the library and starts
    /// loading the model.
    pub fn setup(self: &Arc<Self>, req: SetupRequest) -> ApiResult<AppStatus> {
        for (what, p) in [
            ("base model", &req.base_path),
            ("embedder", &req.embedder_path),
        ] {
            if p.as_os_str().is_empty() {
                return Err(ApiError::invalid(format!("choose a {what} (a path)")));
            }
            if !p.exists() {
                return Err(ApiError::invalid(format!(
                    "{what} {}: no such file or folder",
                    p.display()
                )));
            }
        }
        {
            let mut slot = self.lib_slot();
            // Close the catalog before init reopens it.
            *slot = None;
            let opened = library::init(
                &self.home,
                &req.base_path,
                &req.embedder_path,
                req.base_id.as_deref(),
                None,
            )
            .and_then(|_| Library::open(&self.home));
            match opened {
                Ok(lib) => *slot = Some(lib),
                Err(e) => {
                    // The old settings stay valid when init refused the new ones.
                    *slot = Library::open(&self.home).ok();
                    return Err(e.into());
                }
            }
        }
        self.equivalents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.clone().load_engine();
        Ok(self.status())
    }

    fn hub(&self) -> (HubClient, HubCache) {
        let overrides = self
            .lib_slot()
            .as_ref()
            .map(|l| l.settings().hub.clone())
            .unwrap_or_default();
        let mut cfg = config::hub_config(&overrides);
        if let Some(t) = self.tokens.get() {
            cfg.token = Some(t);
        }
        (HubClient::new(&cfg), HubCache::new(cfg.cache_dir.clone()))
    }

    /// Downloads a base model or embedder into the Hub cache.
    pub fn pull(
        &self,
        req: PullRequestDto,
        task: &str,
        report: &(dyn Fn(&ProgressEvent) + Sync),
    ) -> ApiResult<hub::Pulled> {
        let (_guard, cancel) = self.flag_task(task)?;
        hub::check_repo_id(req.repo.trim())?;
        let (client, cache) = self.hub();
        let pull = PullRequest {
            repo: req.repo.trim().to_string(),
            revision: req
                .revision
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| "main".into()),
            file: req.file.filter(|f| !f.trim().is_empty()),
            max_bytes: 64 << 30,
        };
        Ok(hub::pull_model(
            &client,
            &cache,
            &pull,
            &Reporter { report, cancel },
        )?)
    }

    // ---- discover ----------------------------------------------------------------------------

    pub fn hub_search(&self, req: HubSearchRequest) -> ApiResult<Vec<AdapterHitDto>> {
        let sort: Sort = req.sort.parse().map_err(ApiError::invalid)?;
        if req.limit == 0 || req.limit > 200 {
            return Err(ApiError::invalid(format!(
                "limit = {} must be within 1..=200",
                req.limit
            )));
        }
        let query = req
            .query
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty());
        if query.as_ref().is_some_and(|q| q.chars().count() > 200) {
            return Err(ApiError::invalid(
                "the search text is longer than 200 characters",
            ));
        }
        let (client, _) = self.hub();
        let base_id = self.with_lib(|l| Ok(l.settings().base_id.clone()))?;
        let cached = self
            .equivalents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&base_id)
            .cloned();
        // Network first, without the library lock: chats go on while the Hub answers.
        let equivalents = match cached {
            Some(e) => e,
            None => {
                let e = hub::equivalent_bases(&client, &base_id)?;
                self.equivalents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(base_id.clone(), e.clone());
                e
            }
        };
        let (config, weight_bytes) =
            self.with_lib(|l| Ok((l.base().config.clone(), l.base_weight_bytes())))?;
        // The library stays unlocked while the Hub answers: a target of its own values.
        let target = hub::BaseTarget {
            id: &base_id,
            config: &config,
            weight_bytes,
            equivalents: &equivalents,
        };
        let hits: Vec<AdapterHit> = hub::search_adapters(
            &client,
            &SearchRequest {
                base_id: base_id.clone(),
                query,
                sort,
                limit: req.limit,
                equivalents: true,
            },
            &target,
        )?;
        let installed = self.with_lib(|l| Ok(l.catalog().adapters()?))?;
        Ok(hits
            .into_iter()
            .map(|hit| AdapterHitDto {
                installed_as: library::installed_as(
                    &installed,
                    &hit.repo,
                    hit.subfolder.as_deref(),
                ),
                hit,
            })
            .collect())
    }

    pub fn install(
        &self,
        req: InstallRequestDto,
        task: &str,
        report: &(dyn Fn(&ProgressEvent) + Sync),
    ) -> ApiResult<AdapterDto> {
        let (_guard, cancel) = self.flag_task(task)?;
        let install = InstallRequest::from_fields(
            &req.repo,
            req.revision.as_deref(),
            req.subfolder.as_deref(),
        )?;
        let (client, cache) = self.hub();
        self.with_lib(|lib| {
            let rec = library::install_adapter(
                lib,
                &client,
                &cache,
                &install,
                &Reporter { report, cancel },
            )?;
            adapter_dto(lib, rec)
        })
    }

    // ---- library -----------------------------------------------------------------------------

    pub fn adapters(&self) -> ApiResult<Vec<AdapterDto>> {
        self.with_lib(|lib| {
            lib.catalog()
                .adapters()?
                .into_iter()
                .map(|r| adapter_dto(lib, r))
                .collect()
        })
    }

    pub fn adapter(&self, id: &str) -> ApiResult<AdapterDetail> {
        self.with_lib(|lib| adapter_detail(lib, id))
    }

    pub fn set_enabled(&self, id: &str, enabled: bool) -> ApiResult<AdapterDto> {
        self.with_lib(|lib| {
            let rec = lib.set_enabled(id, enabled)?;
            adapter_dto(lib, rec)
        })
    }

    pub fn remove(&self, id: &str) -> ApiResult<AdapterDto> {
        self.with_lib(|lib| {
            let rec = lib.remove(id)?;
            Ok(AdapterDto {
                record: rec,
                samples: 0,
            })
        })
    }

    pub fn add_local(&self, req: AddLocalRequest) -> ApiResult<AdapterDto> {
        self.with_lib(|lib| {
            let rec = lib.add_local(&req.path, None, req.name.as_deref())?;
            adapter_dto(lib, rec)
        })
    }

    /// Replaces an adapter's sample prompts with `texts` (origin `user`) and re-embeds it.
    pub fn set_samples(&self, id: &str, texts: Vec<String>) -> ApiResult<AdapterDetail> {
        let samples = library::user_samples(&texts)?;
        self.with_lib(|lib| {
            lib.set_samples(id, &samples)?;
            adapter_detail(lib, id)
        })
    }

    /// Trains a LoRA on the active base from examples, then installs it like a local folder.
    pub fn train(
        &self,
        req: TrainRequest,
        task: &str,
        report: &mut dyn FnMut(TrainProgress),
    ) -> ApiResult<AdapterDto> {
        let name = train::check_adapter_name(&req.name)?;
        let template = PromptTemplate::parse(&req.template)?;
        let cfg = TrainConfig {
            rank: req.rank,
            alpha: req.alpha,
            steps: req.steps,
            lr: req.lr,
            batch: req.batch,
            template,
            ..TrainConfig::default()
        };
        cfg.check()?;
        let out = self.home.join("trained").join(&name);
        if out.join("adapter_config.json").exists() {
            return Err(ApiError::invalid(format!(
                "{} already holds a trained adapter: choose another name",
                out.display()
            )));
        }
        let examples = match (&req.examples_path, &req.examples) {
            (Some(p), None) => train::read_examples(p)?,
            (None, Some(list)) => {
                // The file reader's checks (lengths, blank fields, count) apply to inline
                // examples too: write them as a data file first.
                std::fs::create_dir_all(&out).map_err(|e| io_error(&out, e))?;
                let file = out.join("examples.jsonl");
                let mut text = String::new();
                for ex in list {
                    text.push_str(&serde_json::to_string(ex).expect("examples serialise"));
                    text.push('\n');
                }
                ramole_core::files::write_atomic(&file, text.as_bytes())
                    .map_err(|e| io_error(&file, e))?;
                train::read_examples(&file)?
            }
            _ => {
                return Err(ApiError::invalid(
                    "give the examples either as a file or inline, not both or neither",
                ));
            }
        };
        let engine = self.engine()?;
        let base_id = self.with_lib(|l| Ok(l.settings().base_id.clone()))?;
        let (_guard, cancel) = self.flag_task(task)?;
        let started = Instant::now();
        let mut on_step = |r: &train::StepReport| {
            let per_step = started.elapsed().as_secs_f64() / r.step.max(1) as f64;
            report(TrainProgress {
                step: r.step,
                steps: r.steps,
                loss: r.loss,
                tokens_per_s: r.tokens as f64 / r.seconds.max(1e-9),
                eta_s: per_step * (r.steps - r.step) as f64,
            });
            !cancel.load(Ordering::Relaxed)
        };
        let outcome = train::train_lora(
            engine.model(),
            &examples,
            &cfg,
            &out,
            Some(&base_id),
            false,
            &mut on_step,
        )?;
        if outcome.steps < cfg.steps {
            return Err(ApiError::new(
                ErrorCode::Cancelled,
                format!(
                    "training stopped at step {} of {}; nothing was installed",
                    outcome.steps, cfg.steps
                ),
            ));
        }
        self.with_lib(|lib| {
            let rec = lib.add_local(&out, None, Some(&name))?;
            adapter_dto(lib, rec)
        })
    }

    // ---- chat --------------------------------------------------------------------------------

    pub fn chats(&self) -> ApiResult<Vec<ramole_core::catalog::ChatSession>> {
        self.with_lib(|lib| Ok(lib.catalog().chats()?))
    }

    pub fn chat(&self, id: i64) -> ApiResult<Transcript> {
        self.with_lib(|lib| Ok(Transcript::read(lib.catalog(), id)?))
    }

    pub fn rename_chat(
        &self,
        id: i64,
        title: &str,
    ) -> ApiResult<ramole_core::catalog::ChatSession> {
        let title = title.trim();
        if title.is_empty() || title.chars().count() > 200 {
            return Err(ApiError::invalid(format!(
                "a session title is 1..=200 characters, got {}",
                title.chars().count()
            )));
        }
        self.with_lib(|lib| Ok(lib.catalog_mut().rename_chat(id, title)?))
    }

    pub fn set_system_prompt(
        &self,
        id: i64,
        prompt: Option<&str>,
    ) -> ApiResult<ramole_core::catalog::ChatSession> {
        if prompt.is_some_and(|p| p.chars().count() > chat::MAX_MESSAGE_CHARS) {
            return Err(ApiError::invalid(format!(
                "the system prompt is longer than {} characters",
                chat::MAX_MESSAGE_CHARS
            )));
        }
        self.with_lib(|lib| Ok(lib.catalog_mut().set_system_prompt(id, prompt)?))
    }

    pub fn delete_chat(&self, id: i64) -> ApiResult<()> {
        self.with_lib(|lib| Ok(lib.catalog_mut().delete_chat(id)?))
    }

    /// Writes the session as JSON or Markdown into `dir` (atomically) and returns it.
    pub fn export_chat(&self, id: i64, format: &str, dir: &Path) -> ApiResult<Exported> {
        let format: ExportFormat = format.parse()?;
        Ok(self.chat(id)?.export(format, dir)?)
    }

    /// Answers a chat request, streaming its events through `emit`: the routing before any
    /// token, then the text, then the stored reply. The library is locked only to route and to
    /// store, so other commands run while the reply generates.
    pub fn send(
        &self,
        req: SendRequest,
        emit: &mut dyn FnMut(ChatEvent),
    ) -> ApiResult<chat::ChatReply> {
        let core = req.to_core()?;
        let engine = self.engine()?;
        let mut turn = self.with_lib(|lib| Ok(chat::begin(lib, &engine, &core)?))?;
        let _guard = self.start_task(&req.stream_id, Task::Job(turn.handle().clone()))?;
        emit(ChatEvent::Routing {
            provenance: turn.provenance().clone(),
        });
        emit(ChatEvent::Started {
            session: turn.session(),
            user_message: None,
        });
        let generation = turn.generate(&mut |t| {
            emit(ChatEvent::Text {
                delta: t.to_string(),
            })
        })?;
        let reply = self.with_lib(|lib| Ok(chat::finish(lib, turn, generation)?))?;
        emit(ChatEvent::Done {
            reply: reply.clone(),
        });
        Ok(reply)
    }

    // ---- settings ----------------------------------------------------------------------------

    pub fn settings(&self) -> ApiResult<AppSettings> {
        let (token_set, token_store) = self.tokens.status();
        self.with_lib(|lib| {
            let s = lib.settings();
            Ok(AppSettings {
                data_dir: self.home.clone(),
                data_dir_next: config::desktop_next_data_dir(),
                hub_endpoint: s.hub.endpoint.clone(),
                hub_offline: s.hub.offline.unwrap_or(false),
                threads: s.chat.threads,
                k: s.retrieval.k.get(),
                scoring: s.retrieval.scoring.to_string(),
                gating: s.retrieval.gating.to_string(),
                plan: s.chat.plan.to_string(),
                max_tokens: s.chat.max_tokens,
                temperature: s.chat.temperature,
                top_p: s.chat.top_p,
                token_set,
                token_store,
            })
        })
    }

    /// Saves the editable settings (validated; the file is replaced atomically) and reopens
    /// the library with them.
    pub fn set_settings(&self, new: AppSettings) -> ApiResult<AppSettings> {
        let edit = SettingsEdit {
            k: Some(new.k),
            scoring: Some(new.scoring),
            gating: Some(new.gating),
            plan: Some(new.plan),
            max_tokens: Some(new.max_tokens),
            temperature: Some(new.temperature),
            top_p: Some(new.top_p),
            threads: Some(new.threads),
            hub_endpoint: Some(new.hub_endpoint),
            hub_offline: Some(new.hub_offline),
        };
        let next = new
            .data_dir_next
            .filter(|d| !d.as_os_str().is_empty() && *d != self.home);
        if let Some(d) = &next {
            config::check_data_dir(d)?;
        }
        {
            let mut slot = self.lib_slot();
            let Some(lib) = slot.as_ref() else {
                return Err(ApiError::not_ready(
                    "no base model is set up yet: choose one on the first-run screen",
                ));
            };
            let s = lib.settings().edited(&edit)?;
            s.save(&self.home)?;
            *slot = None;
            *slot = Some(Library::open(&self.home)?);
        }
        config::set_desktop_data_dir(next.as_deref()).map_err(|e| {
            ApiError::new(
                ErrorCode::Io,
                format!("{}: {e}", config::desktop_pointer_path().display()),
            )
        })?;
        self.settings()
    }

    pub fn set_token(&self, token: Option<&str>) -> ApiResult<AppSettings> {
        self.tokens.set(token)?;
        self.settings()
    }
}

fn io_error(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(ErrorCode::Io, format!("{}: {e}", path.display()))
}

fn adapter_dto(lib: &Library, record: AdapterRecord) -> ApiResult<AdapterDto> {
    let samples = lib.catalog().samples(record.key)?.len();
    Ok(AdapterDto { record, samples })
}

fn adapter_detail(lib: &Library, id: &str) -> ApiResult<AdapterDetail> {
    let record = lib.catalog().require_adapter(id)?;
    let sample_list = lib.catalog().samples(record.key)?;
    Ok(AdapterDetail {
        adapter: AdapterDto {
            record,
            samples: sample_list.len(),
        },
        sample_list,
    })
}
