//! The generation loop of one request: prefill the prompt, then sample token by token until an
//! end-of-generation token, a stop string or the token limit, streaming the decoded text so that
//! no UTF-8 character and no part of a stop string is ever printed early.

use std::time::Instant;

use serde::Serialize;

use super::decoder::{LogitsAt, RowInput};
use super::linear::SiteDelta;
use super::loader::Model;
use super::sample::{Sampler, Sampling};
use super::{ModelError, Result};
use crate::vocab::FinishReason;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops before the first occurrence of any of these; they are not printed.
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks that need a fixed length).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: Sampling::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Turns a growing list of generated ids into text that is safe to show: it holds back an
/// incomplete UTF-8 character and any tail that could be the start of a stop string.
pub struct TextStream {
    stop: Vec<String>,
    emitted: usize,
    text: String,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        Self {
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            emitted: 0,
            text: String::new(),
        }
    }

    /// Takes the full decoded text so far. Returns the newly printable piece and whether a stop
    /// string was reached (then the piece ends right before it).
    pub fn update(&mut self, decoded: String) -> (String, bool) {
        self.text = decoded;
        // The decoder writes U+FFFD for bytes of a character that is not complete yet.
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text[..complete].find(s.as_str()))
            .min()
        {
            let piece = self.take(at);
            self.text.truncate(at);
            return (piece, true);
        }
        let held = self
            .stop
            .iter()
            .map(|s| longest_prefix_suffix(&self.text[..complete], s))
            .max()
            .unwrap_or(0);
        (self.take(complete - held), false)
    }

    /// Everything still held back (at the end of generation without a stop string).
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let mut upto = upto.max(self.emitted);
        while !self.text.is_char_boundary(upto) {
            upto -= 1;
        }
        let piece = self
            .text
            .get(self.emitted..upto)
            .unwrap_or_default()
            .to_string();
        self.emitted = upto.max(self.emitted);
        piece
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// Checks a request before any work: a non-empty prompt that leaves room in the context, a
/// token limit of at least 1 and valid sampling settings.
pub fn check_request(model: &Model, prompt: &[u32], params: &GenerateParams) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    let ctx = model.decoder.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ModelError::Input(format!(
            "the prompt has {} tokens; the context length is {ctx}",
            prompt.len()
        )));
    }
    if params.max_tokens == 0 {
        return Err(ModelError::Input("max_tokens must be at least 1".into()));
    }
    let vocab = model.decoder.config().vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary of {vocab} tokens"
        )));
    }
    params.sampling.validate()
}

/// What a row does after its logits: feed the sampled token, or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Feed(u32),
    Finish(FinishReason),
}

/// The sampling side of one request: sampler, generated ids and the text stream. The single
/// request loop ([`generate`]) and the engine's batch rows both drive it, so a row behaves
/// exactly like the request alone.
pub struct Decoding {
    sampler: Sampler,
    stream: TextStream,
    generated: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
    ctx: usize,
}

impl Decoding {
    pub fn new(model: &Model, params: &GenerateParams) -> Result<Self> {
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone())?,
            stream: TextStream::new(&params.stop),
            generated: Vec::new(),
            max_tokens: params.max_tokens,
            ignore_eos: params.ignore_eos,
            ctx: model.decoder.config().max_position_embeddings,
        })
    }

    /// Samples from `logits` (the last position; `cached` positions are in the row's cache),
    /// streams the printable text through `on_text` and says what comes next.
    pub fn advance(
        &mut self,
        model: &Model,
        logits: &[f32],
        cached: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Next> {
        if self.generated.len() >= self.max_tokens {
            return Ok(self.finish(FinishReason::Length, on_text));
        }
        let next = self.sampler.sample(logits);
        if model.tokenizer.is_eos(next) && !self.ignore_eos {
            return Ok(self.finish(FinishReason::Eos, on_text));
        }
        self.generated.push(next);
        let (piece, stopped) = self.stream.update(model.tokenizer.decode(&self.generated)?);
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stopped {
            return Ok(Next::Finish(FinishReason::Stop));
        }
        if self.generated.len() >= self.max_tokens || cached + 1 >= self.ctx {
            return Ok(self.finish(FinishReason::Length, on_text));
        }
        Ok(Next::Feed(next))
    }

    /// Ends without a stop string: releases the held-back text.
    pub fn finish(&mut self, reason: FinishReason, on_text: &mut dyn FnMut(&str)) -> Next {
        let rest = self.stream.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        Next::Finish(reason)
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// The result, with `timings` measured by the caller.
    pub fn into_generation(
        self,
        prompt_tokens: usize,
        finish_reason: FinishReason,
        timings: Timings,
    ) -> Generation {
        Generation {
            text: self.stream.text().to_string(),
            prompt_tokens,
            generated_tokens: self.generated.len(),
            token_ids: self.generated,
            finish_reason,
            timings,
        }
    }
}

impl Timings {
    /// Rates from the prefill and decode wall times.
    pub fn new(prompt_tokens: usize, prefill_s: f64, decode_steps: usize, decode_s: f64) -> Self {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        Self {
            prefill_s,
            decode_s,
            prefill_tok_s: rate(prompt_tokens, prefill_s),
            decode_tok_s: rate(decode_steps, decode_s),
        }
    }
}

/// Generates a continuation of `prompt` (token ids, already templated), calling `on_text` with
/// each printable piece. One request alone: the reference the engine's batch rows are held to.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &GenerateParams,
    delta: &dyn SiteDelta,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    check_request(model, prompt, params)?;
    let mut decoding = Decoding::new(model, params)?;
    let mut cache = model.decoder.new_cache();
    let t0 = Instant::now();
    let logits = model.decoder.forward(
        &[RowInput { tokens: prompt }],
        &mut [&mut cache],
        LogitsAt::Last,
        delta,
    )?;
    let mut logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut decode_steps = 0usize;
    let finish = loop {
        match decoding.advance(model, &logits, cache.len(), on_text)? {
            Next::Finish(reason) => break reason,
            Next::Feed(next) => {
                let out = model.decoder.forward(
                    &[RowInput { tokens: &[next] }],
                    &mut [&mut cache],
                    LogitsAt::Last,
                    delta,
                )?;
                logits = out.squeeze(0)?.to_vec1()?;
                decode_steps += 1;
            }
        }
    };
    let timings = Timings::new(
        prompt.len(),
        prefill_s,
        decode_steps,
        t1.elapsed().as_secs_f64(),
    );
    Ok(decoding.into_generation(prompt.len(), finish, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_utf8_is_held_back() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.update("caf".into()), ("caf".into(), false));
        assert_eq!(s.update("caf\u{FFFD}".into()), (String::new(), false));
        assert_eq!(s.update("café!".into()), ("é!".into(), false));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn stop_string_prefix_is_held_and_stop_is_cut() {
        let stop = vec!["<END>".to_string()];
        let mut s = TextStream::new(&stop);
        assert_eq!(s.update("Hello <E".into()), ("Hello ".into(), false));
        assert_eq!(s.update("Hello <EN".into()), (String::new(), false));
        assert_eq!(s.update("Hello <END> more".into()), (String::new(), true));
        assert_eq!(s.text(), "Hello ");
    }

    #[test]
    fn a_false_stop_prefix_is_released() {
        let stop = vec!["\n\n".to_string()];
        let mut s = TextStream::new(&stop);
        assert_eq!(s.update("a\n".into()), ("a".into(), false));
        assert_eq!(s.update("a\nb".into()), ("\nb".into(), false));
    }
}
