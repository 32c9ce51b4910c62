//! `GET /api/models`: filters, derived tags, sorting, search, pagination, projections.

use crate::common::{get, get_with, ids};
use ramole_testhub::{Gated, Repo, TestHub};
use serde_json::json;

/// A small catalog around one base model, with adapters, a fine-tune, a quant and a merge.
fn catalog() -> TestHub {
    let hub = TestHub::start();
    hub.add_repo(Repo::new("base/llama").file("config.json", "{}").meta(|m| {
        m.library_name = Some("transformers".into());
        m.pipeline_tag = Some("text-generation".into());
        m.card_data = json!({"license": "apache-2.0"});
        m.downloads = 1000;
        m.likes = 50;
        m.created_at = "2023-01-01T00:00:00.000Z".into();
        m.last_modified = "2023-06-01T00:00:00.000Z".into();
    }));
    hub.add_repo(
        Repo::new("alice/llama-LoRA-chat")
            .file("adapter_config.json", "{}")
            .file("adapter_model.safetensors", vec![1u8; 64])
            .meta(|m| {
                m.library_name = Some("peft".into());
                m.tags = vec!["lora".into()];
                m.card_data = json!({"base_model": "base/llama", "license": "mit"});
                m.downloads = 10;
                m.likes = 7;
                m.created_at = "2024-03-01T00:00:00.000Z".into();
                m.last_modified = "2024-03-02T00:00:00.000Z".into();
            }),
    );
    hub.add_repo(Repo::new("bob/lora-b").meta(|m| {
        m.library_name = Some("peft".into());
        m.card_data = json!({"base_model": ["base/llama"], "license": "apache-2.0"});
        m.downloads = 50;
        m.likes = 1;
        m.created_at = "2024-02-01T00:00:00.000Z".into();
        m.last_modified = "2024-05-01T00:00:00.000Z".into();
        m.gated = Gated::Auto;
    }));
    hub.add_repo(Repo::new("carol/finetune").meta(|m| {
        m.library_name = Some("transformers".into());
        m.card_data = json!({"base_model": "base/llama"});
        m.downloads = 30;
    }));
    hub.add_repo(Repo::new("dave/llama-gguf").meta(|m| {
        m.tags = vec!["gguf".into()];
        m.card_data = json!({"base_model": "base/llama"});
    }));
    hub.add_repo(Repo::new("eve/merged").meta(|m| {
        m.card_data = json!({"base_model": ["base/llama", "other/model"], "base_model_relation": "merge"});
    }));
    hub.add_repo(Repo::new("zed/secret-lora").meta(|m| {
        m.library_name = Some("peft".into());
        m.card_data = json!({"base_model": "base/llama"});
        m.private = true;
        m.downloads = 5;
    }));
    hub
}

#[test]
fn and_filters_over_derived_base_model_tags() {
    let hub = catalog();
    let r = get(&format!(
        "{}/api/models?filter=base_model:adapter:base/llama&filter=peft&sort=downloads&direction=-1&limit=100&full=true",
        hub.url()
    ));
    assert_eq!(r.status, 200);
    let v = r.json();
    // Descending downloads; the private adapter is hidden without a token.
    assert_eq!(ids(&v), ["bob/lora-b", "alice/llama-LoRA-chat"]);
    let tags: Vec<&str> = v[1]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in [
        "lora",
        "peft",
        "license:mit",
        "base_model:base/llama",
        "base_model:adapter:base/llama",
    ] {
        assert!(tags.contains(&t), "{t} missing from {tags:?}");
    }
    assert_eq!(v[0]["gated"], json!("auto"));
    assert_eq!(v[1]["gated"], json!(false));

    // AND, not OR: peft + license:apache-2.0 leaves only bob.
    let v = get(&format!(
        "{}/api/models?filter=peft&filter=license:apache-2.0",
        hub.url()
    ))
    .json();
    assert_eq!(ids(&v), ["bob/lora-b"]);

    // The other relations the Hub infers or reads from the card.
    for (tag, want) in [
        ("base_model:finetune:base/llama", vec!["carol/finetune"]),
        ("base_model:quantized:base/llama", vec!["dave/llama-gguf"]),
        ("base_model:merge:other/model", vec!["eve/merged"]),
        ("base_model:other/model", vec!["eve/merged"]),
    ] {
        let v = get(&format!("{}/api/models?filter={tag}", hub.url())).json();
        assert_eq!(ids(&v), want, "{tag}");
    }

    // A library name and a pipeline tag are filterable tags too.
    let v = get(&format!("{}/api/models?filter=text-generation", hub.url())).json();
    assert_eq!(ids(&v), ["base/llama"]);
}

#[test]
fn private_repos_listed_only_with_the_token() {
    let hub = catalog();
    hub.set_token("hf_good");
    let url = format!("{}/api/models?filter=peft", hub.url());
    assert!(!ids(&get(&url).json()).contains(&"zed/secret-lora".to_string()));
    let v = get_with(&url, &[("Authorization", "Bearer hf_good")]).json();
    assert!(ids(&v).contains(&"zed/secret-lora".to_string()));
    let bad = get_with(&url, &[("Authorization", "Bearer hf_bad")]);
    assert_eq!(bad.status, 401);
    assert_eq!(
        bad.json()["error"],
        "Invalid credentials in Authorization header"
    );
}

#[test]
fn sort_search_and_author() {
    let hub = catalog();
    let u = hub.url();
    let v = get(&format!("{u}/api/models?sort=likes&limit=2")).json();
    assert_eq!(ids(&v), ["base/llama", "alice/llama-LoRA-chat"]);
    let v = get(&format!("{u}/api/models?sort=lastModified&limit=2")).json();
    assert_eq!(ids(&v), ["bob/lora-b", "alice/llama-LoRA-chat"]);
    let v = get(&format!("{u}/api/models?sort=createdAt&filter=peft")).json();
    assert_eq!(ids(&v), ["alice/llama-LoRA-chat", "bob/lora-b"]);
    // Case-insensitive substring of the id.
    let v = get(&format!("{u}/api/models?search=lora")).json();
    assert_eq!(ids(&v), ["alice/llama-LoRA-chat", "bob/lora-b"]);
    let v = get(&format!("{u}/api/models?author=carol")).json();
    assert_eq!(ids(&v), ["carol/finetune"]);
    assert_eq!(get(&format!("{u}/api/models?sort=bogus")).status, 400);
}

#[test]
fn default_items_full_and_card_data() {
    let hub = catalog();
    let u = hub.url();
    let plain = get(&format!("{u}/api/models?search=alice")).json();
    let item = &plain[0];
    assert_eq!(item["modelId"], "alice/llama-LoRA-chat");
    assert_eq!(item["library_name"], "peft");
    assert!(item.get("siblings").is_none() && item.get("cardData").is_none());
    assert!(item["_id"].as_str().unwrap().len() == 24);

    let full = get(&format!(
        "{u}/api/models?search=alice&full=true&cardData=true"
    ))
    .json();
    let item = &full[0];
    assert_eq!(item["author"], "alice");
    assert_eq!(item["sha"].as_str().unwrap().len(), 40);
    assert_eq!(item["lastModified"], "2024-03-02T00:00:00.000Z");
    assert_eq!(
        item["siblings"],
        json!([{"rfilename": "adapter_config.json"}, {"rfilename": "adapter_model.safetensors"}])
    );
    assert_eq!(item["cardData"]["base_model"], "base/llama");
    assert_eq!(item["disabled"], false);
}

#[test]
fn expand_projects_and_rejects_full() {
    let hub = catalog();
    let u = hub.url();
    let v = get(&format!(
        "{u}/api/models?search=alice&expand=baseModels&expand=downloads"
    ))
    .json();
    let item = v[0].as_object().unwrap();
    let mut keys: Vec<&str> = item.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["_id", "baseModels", "downloads", "id"]);
    assert_eq!(
        item["baseModels"],
        json!({"relation": "adapter", "models": [{"id": "base/llama"}]})
    );

    assert_eq!(
        get(&format!("{u}/api/models?expand=downloads&full=true")).status,
        400
    );
    assert_eq!(
        get(&format!("{u}/api/models?expand=downloads&cardData=true")).status,
        400
    );
    assert_eq!(get(&format!("{u}/api/models?expand=nonsense")).status, 400);
}

#[test]
fn pagination_follows_link_across_three_pages() {
    let hub = TestHub::start();
    for i in 0..8 {
        hub.add_repo(Repo::new(&format!("org/model-{i}")).meta(|m| {
            m.downloads = 100 - i;
            m.tags = vec!["x".into()];
        }));
    }
    hub.add_repo(Repo::new("org/unrelated"));
    hub.set_page_size(3);

    let mut url = format!(
        "{}/api/models?filter=x&sort=downloads&search=model",
        hub.url()
    );
    let mut pages = Vec::new();
    loop {
        let r = get(&url);
        assert_eq!(r.status, 200);
        pages.push(ids(&r.json()));
        match r.next_link() {
            Some(next) => {
                assert!(next.starts_with(&hub.url()), "absolute: {next}");
                assert!(next.contains("cursor="), "{next}");
                // The rest of the query rides along.
                assert!(next.contains("filter=x") && next.contains("sort=downloads"));
                url = next;
            }
            None => break,
        }
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 2]);
    let all: Vec<String> = pages.concat();
    let want: Vec<String> = (0..8).map(|i| format!("org/model-{i}")).collect();
    assert_eq!(all, want);

    // `limit` caps the total, across pages.
    let r = get(&format!("{}/api/models?filter=x&limit=4", hub.url()));
    assert_eq!(ids(&r.json()).len(), 3);
    let r2 = get(&r.next_link().unwrap());
    assert_eq!(ids(&r2.json()).len(), 1);
    assert!(r2.next_link().is_none());

    assert_eq!(
        get(&format!("{}/api/models?cursor=zz", hub.url())).status,
        400
    );
}
