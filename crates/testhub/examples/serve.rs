//! Serves local PEFT adapter folders as Hub repositories, for trying the CLI or the app by hand:
//! `cargo run -p ramole-testhub --example serve -- <base-id> <org/name>=<dir> ...`; prints the
//! endpoint to put in `HF_ENDPOINT`, then serves until killed.

use ramole_testhub::{Repo, TestHub};

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .expect("usage: serve <base-id> <org/name>=<dir> ...");
    let hub = TestHub::start();
    for spec in args {
        let (id, dir) = spec.split_once('=').expect("<org/name>=<dir>");
        let base = base.clone();
        hub.add_repo(
            Repo::new(id)
                .dir(std::path::Path::new(dir), "")
                .meta(move |m| {
                    m.library_name = Some("peft".into());
                    m.tags = vec!["lora".into()];
                    m.card_data = serde_json::json!({"base_model": base, "license": "apache-2.0"});
                    m.downloads = 100;
                }),
        );
    }
    println!("{}", hub.url());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
