//! The Tauri commands: DTO in, one `AppState` call on a blocking thread (the webview's event
//! loop never waits on the model, the disk or the network), DTO or `{code, message}` out.
//! Progress and tokens stream through `Channel`s. `COMMANDS` is the allow-list the build
//! script turns into permissions; the capability grants exactly these.

use std::sync::Arc;

use ramole_core::hub::ProgressEvent;
use tauri::State;
use tauri::ipc::Channel;

use crate::dto::*;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

type St<'a> = State<'a, Arc<AppState>>;

include!("allowed.rs");

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    state: &St<'_>,
    f: impl FnOnce(&Arc<AppState>) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = state.inner().clone();
    tauri::async_runtime::spawn_blocking(move || f(&st))
        .await
        .map_err(|e| ApiError::internal(format!("the command stopped: {e}")))?
}

/// Sends progress to the UI; a closed channel (the window went away) is not an error.
fn progress_sink(ch: Channel<ProgressEvent>) -> impl Fn(&ProgressEvent) + Sync {
    move |e| {
        let _ = ch.send(e.clone());
    }
}

#[tauri::command(rename_all = "snake_case")]
pub async fn app_status(state: St<'_>) -> ApiResult<AppStatus> {
    blocking(&state, |s| Ok(s.status())).await
}

/// The status now; `on_status` then hears it again whenever the engine's state changes (the
/// model loaded, failed, or a new base started loading), instead of the UI polling.
#[tauri::command(rename_all = "snake_case")]
pub async fn app_watch(state: St<'_>, on_status: Channel<AppStatus>) -> ApiResult<AppStatus> {
    blocking(&state, move |s| {
        Ok(s.watch(Box::new(move |st| on_status.send(st.clone()).is_ok())))
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn setup_models(state: St<'_>, request: SetupRequest) -> ApiResult<AppStatus> {
    blocking(&state, move |s| s.setup(request)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn model_pull(
    state: St<'_>,
    request: PullRequestDto,
    task_id: String,
    on_progress: Channel<ProgressEvent>,
) -> ApiResult<ramole_core::hub::Pulled> {
    blocking(&state, move |s| {
        s.pull(request, &task_id, &progress_sink(on_progress))
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn hub_search(state: St<'_>, request: HubSearchRequest) -> ApiResult<Vec<AdapterHitDto>> {
    blocking(&state, move |s| s.hub_search(request)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_install(
    state: St<'_>,
    request: InstallRequestDto,
    task_id: String,
    on_progress: Channel<ProgressEvent>,
) -> ApiResult<AdapterDto> {
    blocking(&state, move |s| {
        s.install(request, &task_id, &progress_sink(on_progress))
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub fn task_cancel(state: St<'_>, task_id: String) -> bool {
    state.cancel(&task_id)
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapters_list(state: St<'_>) -> ApiResult<Vec<AdapterDto>> {
    blocking(&state, |s| s.adapters()).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_get(state: St<'_>, id: String) -> ApiResult<AdapterDetail> {
    blocking(&state, move |s| s.adapter(&id)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_set_enabled(
    state: St<'_>,
    id: String,
    enabled: bool,
) -> ApiResult<AdapterDto> {
    blocking(&state, move |s| s.set_enabled(&id, enabled)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_remove(state: St<'_>, id: String) -> ApiResult<AdapterDto> {
    blocking(&state, move |s| s.remove(&id)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_add_local(state: St<'_>, request: AddLocalRequest) -> ApiResult<AdapterDto> {
    blocking(&state, move |s| s.add_local(request)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_set_samples(
    state: St<'_>,
    id: String,
    samples: Vec<String>,
) -> ApiResult<AdapterDetail> {
    blocking(&state, move |s| s.set_samples(&id, samples)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn adapter_train(
    state: St<'_>,
    request: TrainRequest,
    task_id: String,
    on_progress: Channel<TrainProgress>,
) -> ApiResult<AdapterDto> {
    blocking(&state, move |s| {
        s.train(request, &task_id, &mut |p| {
            let _ = on_progress.send(p);
        })
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chats_list(state: St<'_>) -> ApiResult<Vec<ramole_core::catalog::ChatSession>> {
    blocking(&state, |s| s.chats()).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_get(state: St<'_>, id: i64) -> ApiResult<ramole_core::transcript::Transcript> {
    blocking(&state, move |s| s.chat(id)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_rename(
    state: St<'_>,
    id: i64,
    title: String,
) -> ApiResult<ramole_core::catalog::ChatSession> {
    blocking(&state, move |s| s.rename_chat(id, &title)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_set_system_prompt(
    state: St<'_>,
    id: i64,
    system_prompt: Option<String>,
) -> ApiResult<ramole_core::catalog::ChatSession> {
    blocking(&state, move |s| {
        s.set_system_prompt(id, system_prompt.as_deref())
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_delete(state: St<'_>, id: i64) -> ApiResult<()> {
    blocking(&state, move |s| s.delete_chat(id)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_export(
    state: St<'_>,
    id: i64,
    format: String,
) -> ApiResult<ramole_core::transcript::Exported> {
    blocking(&state, move |s| {
        let dir = dirs::download_dir()
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| s.home().join("exports"));
        s.export_chat(id, &format, &dir)
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn chat_send(
    state: St<'_>,
    request: SendRequest,
    on_event: Channel<ChatEvent>,
) -> ApiResult<ramole_core::chat::ChatReply> {
    blocking(&state, move |s| {
        s.send(request, &mut |e| {
            let _ = on_event.send(e);
        })
    })
    .await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn settings_get(state: St<'_>) -> ApiResult<AppSettings> {
    blocking(&state, |s| s.settings()).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn settings_set(state: St<'_>, settings: AppSettings) -> ApiResult<AppSettings> {
    blocking(&state, move |s| s.set_settings(settings)).await
}

#[tauri::command(rename_all = "snake_case")]
pub async fn hub_token_set(state: St<'_>, token: Option<String>) -> ApiResult<AppSettings> {
    blocking(&state, move |s| s.set_token(token.as_deref())).await
}
