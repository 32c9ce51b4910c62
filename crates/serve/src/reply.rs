//! What every answer to one request repeats (id, model, the provenance of its routing) and the
//! OpenAI objects made from it: the whole completion, a stream chunk, the usage.

use ramole_core::chat;
use ramole_core::engine::Finished;
use ramole_core::model::GenerateParams;
use ramole_core::vocab::{FinishReason, Provenance};
use serde_json::{Value, json};

/// What every answer to one request repeats.
pub(crate) struct Reply {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) provenance: Provenance,
    pub(crate) params: GenerateParams,
    pub(crate) dropped: usize,
}

pub(crate) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

impl Reply {
    pub(crate) fn provenance(&self, f: &Finished) -> Provenance {
        chat::finished_provenance(&self.provenance, &self.params, f, self.dropped)
    }

    pub(crate) fn usage(f: &Finished) -> Value {
        let g = &f.generation;
        json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
               "total_tokens": g.prompt_tokens + g.generated_tokens})
    }

    pub(crate) fn complete(&self, f: &Finished) -> Value {
        let g = &f.generation;
        json!({
            "id": self.id, "object": "chat.completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": finish_reason(g.finish_reason)}],
            "usage": Self::usage(f),
            "ramole": {"provenance": self.provenance(f)},
        })
    }

    pub(crate) fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    }
}
