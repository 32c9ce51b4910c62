//! Generates the Tauri context and one permission per app command, so the capability can grant
//! exactly the app's own commands and nothing else.

include!("src/allowed.rs");

fn main() {
    let manifest = tauri_build::AppManifest::new().commands(COMMANDS);
    tauri_build::try_build(tauri_build::Attributes::new().app_manifest(manifest))
        .expect("tauri-build: tauri.conf.json, icons and capabilities must be valid");
}
