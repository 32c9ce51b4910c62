// The commands the UI may call: the build script turns them into permissions and the
// capability grants exactly these (included by build.rs and commands.rs).

#[allow(dead_code)]
pub const COMMANDS: &[&str] = &[
    "app_status",
    "app_watch",
    "setup_models",
    "model_pull",
    "hub_search",
    "adapter_install",
    "task_cancel",
    "adapters_list",
    "adapter_get",
    "adapter_set_enabled",
    "adapter_remove",
    "adapter_add_local",
    "adapter_set_samples",
    "adapter_train",
    "chats_list",
    "chat_get",
    "chat_rename",
    "chat_set_system_prompt",
    "chat_delete",
    "chat_export",
    "chat_send",
    "settings_get",
    "settings_set",
    "hub_token_set",
];
