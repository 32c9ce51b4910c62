//! ramole-desktop: the Tauri v2 shell over ramole-core. `state` holds the app's state and is
//! tested without a window; `commands` are the thin Tauri wrappers; `dto` and `error` are what
//! crosses into the UI, and `bindings` the TypeScript generated from them.

pub mod bindings;
pub mod commands;
pub mod dto;
pub mod error;
pub mod state;
pub mod token;

use std::sync::Arc;

use ramole_core::config;

/// Starts the app: opens the data folder (`$RAMOLE_HOME`, else the folder chosen in Settings,
/// else the platform data dir), starts loading the model, opens the window.
pub fn run() {
    let home = config::desktop_data_dir();
    let threads = config::Settings::load(&home)
        .map(|s| s.chat.threads)
        .unwrap_or(0);
    // SAFETY: first thing in the process, before any other thread starts.
    unsafe { config::set_thread_count(threads) };
    let suggested = dto::Suggested {
        base_path: Some(config::starter_base()).filter(|p| p.is_file()),
        embedder_path: Some(config::starter_embedder()).filter(|p| p.is_dir()),
    };
    let state = state::AppState::new(home, suggested, token::TokenStore::default());
    tauri::Builder::default()
        .manage(Arc::clone(&state))
        .invoke_handler(tauri::generate_handler![
            commands::app_status,
            commands::app_watch,
            commands::setup_models,
            commands::model_pull,
            commands::hub_search,
            commands::adapter_install,
            commands::task_cancel,
            commands::adapters_list,
            commands::adapter_get,
            commands::adapter_set_enabled,
            commands::adapter_remove,
            commands::adapter_add_local,
            commands::adapter_set_samples,
            commands::adapter_train,
            commands::chats_list,
            commands::chat_get,
            commands::chat_rename,
            commands::chat_set_system_prompt,
            commands::chat_delete,
            commands::chat_export,
            commands::chat_send,
            commands::settings_get,
            commands::settings_set,
            commands::hub_token_set,
        ])
        .run(tauri::generate_context!())
        .expect("the desktop app failed to start");
}
