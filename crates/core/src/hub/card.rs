//! Model cards (`README.md` with YAML front matter): the metadata (base_model, license,
//! datasets, tags), a short description, the example prompts a card shows, and — for an
//! adapter that ships neither samples nor examples — probe requests made from its description
//! and tags, so every installed adapter has sample inputs to embed.

use serde_json::Value;

use crate::catalog::{Sample, SampleOrigin};

/// Cards larger than this are not parsed (a card is text; real ones are a few KB).
pub const MAX_CARD_BYTES: u64 = 1 << 20;
/// Example prompts taken from a card.
const MAX_EXAMPLES: usize = 20;
/// Characters of an example prompt.
const MAX_EXAMPLE_CHARS: usize = 2000;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    /// The YAML front matter as JSON (`{}` when absent).
    pub meta: Value,
    /// The Markdown after the front matter.
    pub body: String,
}

impl ModelCard {
    /// Splits and parses a card. Malformed YAML is an error naming the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim_start_matches('\u{feff}');
        let Some(rest) = text
            .strip_prefix("---\n")
            .or_else(|| text.strip_prefix("---\r\n"))
        else {
            return Ok(Self {
                meta: Value::Object(Default::default()),
                body: text.to_string(),
            });
        };
        let (yaml, body) = match rest.find("\n---") {
            Some(i) => {
                let after = &rest[i + 4..];
                let body = after.split_once('\n').map(|(_, b)| b).unwrap_or("");
                (&rest[..i], body)
            }
            None => return Err("the YAML front matter is not closed by `---`".into()),
        };
        let meta: Value = if yaml.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_norway::from_str(yaml)
                .map_err(|e| format!("front matter is not valid YAML: {e}"))?
        };
        let meta = match meta {
            Value::Object(_) => meta,
            Value::Null => Value::Object(Default::default()),
            _ => return Err("front matter must be a YAML mapping".into()),
        };
        Ok(Self {
            meta,
            body: body.to_string(),
        })
    }

    fn strings(&self, key: &str) -> Vec<String> {
        match self.meta.get(key) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn base_models(&self) -> Vec<String> {
        self.strings("base_model")
    }

    pub fn license(&self) -> Option<String> {
        self.strings("license").into_iter().next()
    }

    pub fn datasets(&self) -> Vec<String> {
        self.strings("datasets")
    }

    pub fn tags(&self) -> Vec<String> {
        self.strings("tags")
    }

    /// The first paragraph of prose (no headings, code, tables, images or badges), at most
    /// 500 characters: the card's summary.
    pub fn description(&self) -> Option<String> {
        let mut para = String::new();
        let mut in_code = false;
        for line in self.body.lines() {
            let t = line.trim();
            if t.starts_with("```") || t.starts_with("~~~") {
                in_code = !in_code;
                continue;
            }
            if in_code {
                continue;
            }
            let skip = t.starts_with('#')
                || t.starts_with('|')
                || t.starts_with('!')
                || t.starts_with("[!")
                || t.starts_with('<')
                || t.starts_with("- **")
                || t.contains("More Information Needed");
            if t.is_empty() || skip {
                if para.split_whitespace().count() >= 4 {
                    break;
                }
                para.clear();
                continue;
            }
            if !para.is_empty() {
                para.push(' ');
            }
            para.push_str(t);
        }
        let para = strip_markdown(&para);
        (para.split_whitespace().count() >= 4).then(|| truncate_chars(&para, 500))
    }

    /// Example prompts the card shows: the inference widget's texts (`widget:` entries with
    /// `text`, or a user message of `messages`), then, in sections whose heading mentions
    /// examples, prompts or usage, quoted lines and plain-text code blocks. Deduplicated, at
    /// most 20.
    pub fn example_prompts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |s: &str| {
            let s = s.trim();
            if s.chars().count() >= 3 && !out.iter().any(|o| o == s) && out.len() < MAX_EXAMPLES {
                out.push(truncate_chars(s, MAX_EXAMPLE_CHARS));
            }
        };
        if let Some(Value::Array(widgets)) = self.meta.get("widget") {
            for w in widgets {
                if let Some(t) = w.get("text").and_then(|t| t.as_str()) {
                    push(t);
                } else if let Some(Value::Array(msgs)) = w.get("messages") {
                    for m in msgs {
                        if m.get("role").and_then(|r| r.as_str()) == Some("user")
                            && let Some(c) = m.get("content").and_then(|c| c.as_str())
                        {
                            push(c);
                        }
                    }
                }
            }
        }
        let mut in_section = false;
        let mut code: Option<(String, String)> = None; // (language, text)
        for line in self.body.lines() {
            let t = line.trim();
            if let Some((lang, text)) = code.as_mut() {
                if t.starts_with("```") || t.starts_with("~~~") {
                    let plain =
                        matches!(lang.as_str(), "" | "text" | "txt" | "prompt" | "plaintext");
                    if in_section && plain {
                        push(text);
                    }
                    code = None;
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
                continue;
            }
            if let Some(fence) = t.strip_prefix("```").or_else(|| t.strip_prefix("~~~")) {
                code = Some((fence.trim().to_ascii_lowercase(), String::new()));
                continue;
            }
            if let Some(h) = t.strip_prefix('#') {
                let h = h.trim_start_matches('#').to_ascii_lowercase();
                in_section = ["example", "prompt", "usage", "how to use", "try it"]
                    .iter()
                    .any(|w| h.contains(w));
                continue;
            }
            if in_section && let Some(q) = t.strip_prefix('>') {
                push(&strip_markdown(q.trim()));
            }
        }
        out
    }
}

/// Probe requests for an adapter that ships no samples and no example prompts: its card's
/// description, then requests made from its name, datasets and topical tags.
pub fn probe_texts(card: Option<&ModelCard>, repo: &str) -> Vec<String> {
    let mut out = Vec::new();
    let name_words = words(repo.rsplit('/').next().unwrap_or(repo));
    if let Some(card) = card {
        if let Some(d) = card.description() {
            out.push(d);
        }
        for ds in card.datasets().iter().take(5) {
            let w = words(ds.rsplit('/').next().unwrap_or(ds));
            if !w.is_empty() {
                out.push(format!("A request like those in the {w} dataset"));
            }
        }
        let generic = [
            "peft",
            "lora",
            "transformers",
            "safetensors",
            "text-generation",
            "generated_from_trainer",
            "trl",
            "sft",
            "unsloth",
            "llama",
            "qwen2",
            "mistral",
            "adapter",
            "base_model",
        ];
        let topical: Vec<String> = card
            .tags()
            .into_iter()
            .filter(|t| !t.contains(':') && !generic.iter().any(|g| t.eq_ignore_ascii_case(g)))
            .take(8)
            .collect();
        if !topical.is_empty() {
            out.push(format!("A request about {}", words(&topical.join(" "))));
        }
    }
    if !name_words.is_empty() {
        out.push(format!("A request about {name_words}"));
    }
    if out.is_empty() {
        out.push(format!("A request for the adapter {repo}"));
    }
    out
}

/// Sample inputs from a card: its example prompts (origin `card`), else probes (origin
/// `probe`).
pub fn card_samples(card: Option<&ModelCard>, repo: &str) -> Vec<Sample> {
    let examples = card.map(ModelCard::example_prompts).unwrap_or_default();
    if !examples.is_empty() {
        return examples
            .into_iter()
            .map(|text| Sample {
                text,
                origin: SampleOrigin::Card,
            })
            .collect();
    }
    probe_texts(card, repo)
        .into_iter()
        .map(|text| Sample {
            text,
            origin: SampleOrigin::Probe,
        })
        .collect()
}

fn words(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Drops link targets, emphasis and inline-code marks.
fn strip_markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' | '_' | '`' => {}
            ']' if chars.peek() == Some(&'(') => {
                for c in chars.by_ref() {
                    if c == ')' {
                        break;
                    }
                }
            }
            '[' => {}
            c => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn truncate_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\nlicense: apache-2.0\ndatasets:\n- org/french-poems\ntags:\n- lora\n- poetry\nwidget:\n- text: Write a poem about autumn\n- messages:\n  - role: user\n    content: Translate 'good night' into French\n---\n\n# My adapter\n\n![badge](x.svg)\n\nThis adapter writes **short poems** in French, trained with [PEFT](https://x).\n\n## Examples\n\n> Compose a haiku about the sea\n\n```\nDescribe a rainy morning in verse\n```\n\n```python\nprint('not a prompt')\n```\n\n## Training\n\n> not an example\n";

    #[test]
    fn card_metadata_description_and_examples() {
        let c = ModelCard::parse(CARD).unwrap();
        assert_eq!(c.base_models(), vec!["HuggingFaceTB/SmolLM2-135M-Instruct"]);
        assert_eq!(c.license().as_deref(), Some("apache-2.0"));
        assert_eq!(c.datasets(), vec!["org/french-poems"]);
        assert_eq!(
            c.description().as_deref(),
            Some("This adapter writes short poems in French, trained with PEFT.")
        );
        assert_eq!(
            c.example_prompts(),
            vec![
                "Write a poem about autumn",
                "Translate 'good night' into French",
                "Compose a haiku about the sea",
                "Describe a rainy morning in verse"
            ]
        );
        let s = card_samples(Some(&c), "org/poems");
        assert!(s.iter().all(|s| s.origin == SampleOrigin::Card));
    }

    #[test]
    fn probes_when_a_card_has_no_examples() {
        let c = ModelCard::parse("---\ntags: [lora, sql, databases]\ndatasets: [b-mc2/sql-create-context]\n---\nGenerates SQL queries from questions about a table.\n").unwrap();
        let s = card_samples(Some(&c), "someone/llama-sql-lora");
        assert!(s.iter().all(|s| s.origin == SampleOrigin::Probe));
        let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts[0],
            "Generates SQL queries from questions about a table."
        );
        assert!(texts.contains(&"A request like those in the sql create context dataset"));
        assert!(texts.contains(&"A request about sql databases"));
        assert!(texts.contains(&"A request about llama sql lora"));
        assert_eq!(card_samples(None, "x/y").len(), 1);
    }

    #[test]
    fn malformed_front_matter_is_an_error() {
        assert!(ModelCard::parse("---\nbase_model: [unclosed\n---\nbody").is_err());
        assert!(ModelCard::parse("---\nlicense: mit\nno end").is_err());
        assert!(ModelCard::parse("---\n- a list\n---\n").is_err());
        let plain = ModelCard::parse("just text").unwrap();
        assert_eq!(plain.body, "just text");
    }
}
