//! Adapter repositories for the local fake Hub.

use std::path::Path;

use ramole_testhub::Repo;
use serde_json::json;

/// A PEFT adapter repository `id` for `base` holding the adapter folder `dir` at its root, with
/// a model card naming the base and giving `widget` prompts (retrieval samples), tagged and
/// counted as the Hub's listing shows them.
pub fn peft_repo(dir: &Path, id: &str, base: &str, downloads: u64, widget: &[&str]) -> Repo {
    let widget: String = widget
        .iter()
        .map(|t| format!("- text: {}\n", json!(t)))
        .collect();
    Repo::new(id)
        .dir(dir, "")
        .file(
            "README.md",
            format!("---\nbase_model: {base}\nlicense: mit\nlibrary_name: peft\nwidget:\n{widget}---\n\nAn adapter.\n"),
        )
        .meta(|m| {
            m.library_name = Some("peft".into());
            m.tags = vec!["lora".into()];
            m.card_data = json!({"base_model": base, "license": "mit"});
            m.downloads = downloads;
            m.likes = downloads / 22;
        })
}
