//! The vocabulary every layer shares (DESIGN.md 3a): plans, how gates are made, how retrieval
//! scores, the checked `k`, message roles, why a reply ended, and the provenance stored with
//! every reply. The CLI's flags, the server's JSON, the catalog's columns and the UI use these
//! names verbatim; the UI's TypeScript for them is generated from these types
//! (`ramole-desktop`'s `bindings`), so there is no second copy to drift.
//!
//! Nothing here does I/O or touches tensors: any module may import it, and it imports none.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ts_rs::TS;

/// The most adapters one message may mix.
pub const MAX_K: usize = 16;

/// A word that is not in the vocabulary, or a value outside its limits; the message names the
/// value and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct VocabError(String);

impl VocabError {
    /// An error with this message (words of other modules: export formats, sort orders).
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

type Result<T, E = VocabError> = std::result::Result<T, E>;

/// Which adapters serve a request and how (DESIGN.md 3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    /// The base model only.
    None,
    /// The single top-1 retrieved adapter (or the one given) at full strength.
    Selection,
    /// k adapters, their outputs mixed with gates (exact; ranks may differ).
    Mixture,
    /// k adapters, their factors averaged with gates (equal ranks only).
    Fusion,
    /// k adapters gated per token and layer by a trained RouterLoRA.
    Router,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::None => "none",
            Plan::Selection => "selection",
            Plan::Mixture => "mixture",
            Plan::Fusion => "fusion",
            Plan::Router => "router",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Plan {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Plan::None,
            "selection" => Plan::Selection,
            "mixture" => Plan::Mixture,
            "fusion" => Plan::Fusion,
            "router" => Plan::Router,
            other => {
                return Err(VocabError(format!(
                    "unknown plan {other:?} (none, selection, mixture, fusion, router)"
                )));
            }
        })
    }
}

/// A plan as a user asks for it: `auto` or one of the plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, TS)]
#[ts(type = "\"auto\" | Plan")]
pub enum PlanChoice {
    /// `router` when a trained router exists for the active base, else `mixture`.
    #[default]
    Auto,
    Plan(Plan),
}

impl PlanChoice {
    /// Every choice, in the order menus list them.
    pub const ALL: [PlanChoice; 6] = [
        PlanChoice::Auto,
        PlanChoice::Plan(Plan::Selection),
        PlanChoice::Plan(Plan::Mixture),
        PlanChoice::Plan(Plan::Fusion),
        PlanChoice::Plan(Plan::Router),
        PlanChoice::Plan(Plan::None),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PlanChoice::Auto => "auto",
            PlanChoice::Plan(p) => p.as_str(),
        }
    }

    /// One line saying what the choice does (the UI's tooltips, the CLI's help).
    pub fn hint(self) -> &'static str {
        match self {
            PlanChoice::Auto => {
                "router when a trained router exists for the active base, else mixture"
            }
            PlanChoice::Plan(Plan::Selection) => "the top-1 retrieved adapter",
            PlanChoice::Plan(Plan::Mixture) => {
                "k retrieved adapters, their outputs mixed with gates"
            }
            PlanChoice::Plan(Plan::Fusion) => {
                "k retrieved adapters, their weights averaged with gates (equal ranks only)"
            }
            PlanChoice::Plan(Plan::Router) => {
                "RouterLoRA: per-token, per-layer gates over k retrieved adapters; needs a trained router for the active base"
            }
            PlanChoice::Plan(Plan::None) => "the base model only",
        }
    }

    /// The plan it names, `None` for `auto`.
    pub fn plan(self) -> Option<Plan> {
        match self {
            PlanChoice::Auto => None,
            PlanChoice::Plan(p) => Some(p),
        }
    }
}

impl fmt::Display for PlanChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PlanChoice {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(PlanChoice::Auto);
        }
        s.parse().map(PlanChoice::Plan).map_err(|_| {
            VocabError(format!(
                "unknown plan {s:?} (auto, selection, mixture, fusion, router, none)"
            ))
        })
    }
}

/// How retrieval scores become gates (DESIGN.md 3a): finite, non-negative, summing to 1.
#[derive(Debug, Clone, Copy, PartialEq, Default, TS)]
#[ts(type = "string")]
pub enum Gating {
    /// `1/k` each (the paper).
    #[default]
    Uniform,
    /// `softmax(score / temperature)`.
    Softmax { temperature: f32 },
}

impl Gating {
    /// Gates for adapters retrieved with `scores` (best first).
    pub fn gates(self, scores: &[f32]) -> Result<Vec<f32>> {
        match self {
            Gating::Uniform => Ok(vec![1.0 / scores.len().max(1) as f32; scores.len()]),
            Gating::Softmax { temperature } => {
                check_temperature(temperature, &temperature.to_string())?;
                if let Some(s) = scores.iter().find(|s| !s.is_finite()) {
                    return Err(VocabError(format!("score {s} is not finite")));
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores
                    .iter()
                    .map(|s| ((s - max) / temperature).exp())
                    .collect();
                let sum: f32 = e.iter().sum();
                Ok(e.iter().map(|v| v / sum).collect())
            }
        }
    }
}

fn check_temperature(t: f32, written: &str) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(VocabError(format!(
            "softmax temperature {written} must be a positive number"
        )))
    }
}

impl fmt::Display for Gating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gating::Uniform => f.write_str("uniform"),
            Gating::Softmax { temperature } => write!(f, "softmax:{temperature}"),
        }
    }
}

impl FromStr for Gating {
    type Err = VocabError;
    /// `uniform`, `softmax` (temperature 0.1) or `softmax:<temperature>`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            VocabError(format!(
                "unknown gating {s:?} (uniform, softmax, softmax:<temperature>)"
            ))
        };
        match s.split_once(':') {
            None if s == "uniform" => Ok(Gating::Uniform),
            None if s == "softmax" => Ok(Gating::Softmax { temperature: 0.1 }),
            Some(("softmax", t)) => {
                let temperature: f32 = t.parse().map_err(|_| bad())?;
                check_temperature(temperature, t)?;
                Ok(Gating::Softmax { temperature })
            }
            _ => Err(bad()),
        }
    }
}

/// How a query is scored against an adapter's profile (DESIGN.md 3a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// Cosine against the L2-normalised mean of the sample embeddings (our default).
    #[default]
    Cosine,
    /// Inner product with the raw mean (the paper's released code).
    Ip,
}

impl Scoring {
    pub fn as_str(self) -> &'static str {
        match self {
            Scoring::Cosine => "cosine",
            Scoring::Ip => "ip",
        }
    }
}

impl fmt::Display for Scoring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scoring {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" | "cos" => Ok(Scoring::Cosine),
            "ip" => Ok(Scoring::Ip),
            other => Err(VocabError(format!(
                "unknown scoring {other:?} (cosine, ip)"
            ))),
        }
    }
}

/// How many adapters retrieval serves one message: the one place that knows `1..=MAX_K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, TS)]
#[serde(try_from = "usize", into = "usize")]
#[ts(type = "number")]
pub struct TopK(usize);

impl TopK {
    /// The paper's k, and the settings' default.
    pub const DEFAULT: TopK = TopK(3);
    /// One adapter (plan `selection`).
    pub const ONE: TopK = TopK(1);
    /// The largest k, [`MAX_K`].
    pub const MAX: TopK = TopK(MAX_K);

    /// `k`, when it is within `1..=MAX_K`.
    pub fn new(k: usize) -> Result<Self> {
        if (1..=MAX_K).contains(&k) {
            Ok(TopK(k))
        } else {
            Err(VocabError(format!(
                "k = {k} must be within 1..={MAX_K} (the limit of adapters one message mixes)"
            )))
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

impl Default for TopK {
    fn default() -> Self {
        TopK::DEFAULT
    }
}

impl TryFrom<usize> for TopK {
    type Error = VocabError;
    fn try_from(k: usize) -> Result<Self> {
        TopK::new(k)
    }
}

impl From<TopK> for usize {
    fn from(k: TopK) -> usize {
        k.0
    }
}

impl fmt::Display for TopK {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TopK {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        let k: usize = s
            .trim()
            .parse()
            .map_err(|_| VocabError(format!("k {s:?} is not a whole number within 1..={MAX_K}")))?;
        TopK::new(k)
    }
}

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(VocabError(format!(
                "role {other:?} must be system, user or assistant"
            ))),
        }
    }
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The request was cancelled (or its receiver went away).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl FromStr for FinishReason {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "eos" => Ok(FinishReason::Eos),
            "stop" => Ok(FinishReason::Stop),
            "length" => Ok(FinishReason::Length),
            "cancelled" => Ok(FinishReason::Cancelled),
            other => Err(VocabError(format!(
                "finish reason {other:?} is not eos, stop, length or cancelled"
            ))),
        }
    }
}

/// How the gates of a reply were made: by retrieval's [`Gating`], by hand, or by the plan.
#[derive(Debug, Clone, Copy, PartialEq, TS)]
#[ts(type = "string")]
pub enum ReplyGating {
    /// Retrieval's gates (`uniform` or `softmax:<temperature>`).
    Retrieved(Gating),
    /// Pinned or named by hand (`given`).
    Given,
    /// Plan `selection`: one adapter at full strength (`selection`).
    Selection,
    /// Plan `router`: the router's per-token gates, their means stored (`router`).
    Router,
}

impl fmt::Display for ReplyGating {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyGating::Retrieved(g) => g.fmt(f),
            ReplyGating::Given => f.write_str("given"),
            ReplyGating::Selection => f.write_str("selection"),
            ReplyGating::Router => f.write_str("router"),
        }
    }
}

impl FromStr for ReplyGating {
    type Err = VocabError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "given" => Ok(ReplyGating::Given),
            "selection" => Ok(ReplyGating::Selection),
            "router" => Ok(ReplyGating::Router),
            other => other.parse().map(ReplyGating::Retrieved).map_err(|_| {
                VocabError(format!(
                    "gating {other:?} is not uniform, softmax:<temperature>, given, selection or router"
                ))
            }),
        }
    }
}

/// Serialises a type as its `Display` text and reads it back with `FromStr` (the words that
/// carry a value: `softmax:0.1`, and `auto` beside the plans).
macro_rules! serde_as_text {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_text!(PlanChoice, Gating, ReplyGating);

/// One adapter that served a reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct ServedAdapter {
    pub id: String,
    pub name: String,
    /// Retrieval score; `None` when the adapter was given by hand.
    pub score: Option<f32>,
    pub gate: f32,
}

/// The sampling settings, seed, token counts and finish reason of a reply: enough to replay it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct GenerationRecord {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: FinishReason,
    /// Messages dropped from the front of the history to fit the context.
    pub dropped_messages: usize,
}

/// The router's gates per layer and token column (the provenance of plan `router`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct LayerGates {
    /// The gate columns' adapter ids, in order (the same ids as the provenance's adapters).
    pub adapters: Vec<String>,
    /// Number of layers (= `gates.len()`).
    pub layers: usize,
    /// Column labels (at most 32): the first is always the literal `<prompt>` (the mean over all
    /// prompt tokens), then the reply's tokens as text; a label may cover several tokens.
    pub tokens: Vec<String>,
    /// `gates[layer][token column][adapter]`: mean gate over the layer's LoRA sites; sums to ~1
    /// (rounded to 3 decimals in f64, so the JSON holds 0.41, not an f32's 0.4099999964237213).
    pub gates: Vec<Vec<Vec<f64>>>,
}

impl LayerGates {
    /// Every dimension agrees with the others and every gate is a finite number in `[0, 1]`.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(VocabError(format!("layer gates: {m}")));
        if self.gates.len() != self.layers {
            return bad(format!(
                "{} layers of gates, {} declared",
                self.gates.len(),
                self.layers
            ));
        }
        for (l, layer) in self.gates.iter().enumerate() {
            if layer.len() != self.tokens.len() {
                return bad(format!(
                    "layer {l} has {} token columns, {} labels",
                    layer.len(),
                    self.tokens.len()
                ));
            }
            for col in layer {
                if col.len() != self.adapters.len() {
                    return bad(format!(
                        "layer {l} has a column of {} gates for {} adapters",
                        col.len(),
                        self.adapters.len()
                    ));
                }
                if let Some(g) = col
                    .iter()
                    .find(|g| !(g.is_finite() && (0.0..=1.0).contains(*g)))
                {
                    return bad(format!("gate {g} in layer {l} is not within [0, 1]"));
                }
            }
        }
        Ok(())
    }
}

/// Everything needed to explain and replay a reply: stored with it, returned by the server,
/// shown under it by the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct Provenance {
    /// The plan that ran (`auto` is stored as what it resolved to).
    pub plan: Plan,
    /// Adapters asked of retrieval (0 for plan `none`).
    pub k: usize,
    /// The text retrieval embedded (the latest user message).
    pub query: String,
    pub base_model: String,
    /// The sentence encoder that embedded the query (retrieval only).
    pub embedder: Option<String>,
    pub scoring: Option<Scoring>,
    /// How the gates were made: `uniform`, `softmax:<tau>`, `given`, `selection` or `router`.
    pub gating: Option<ReplyGating>,
    pub adapters: Vec<ServedAdapter>,
    /// `None` until the reply is done (the routing event precedes generation).
    pub generation: Option<GenerationRecord>,
    /// Plan `router` only: the router's gates per layer and token column.
    pub layer_gates: Option<LayerGates>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_text_and_json() {
        for c in PlanChoice::ALL {
            assert_eq!(c.as_str().parse::<PlanChoice>().unwrap(), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(serde_json::from_str::<PlanChoice>(&json).unwrap(), c);
            assert!(!c.hint().is_empty());
        }
        for g in [Gating::Uniform, Gating::Softmax { temperature: 0.25 }] {
            assert_eq!(g.to_string().parse::<Gating>().unwrap(), g);
            let r = ReplyGating::Retrieved(g);
            assert_eq!(r.to_string().parse::<ReplyGating>().unwrap(), r);
        }
        for r in [
            ReplyGating::Given,
            ReplyGating::Selection,
            ReplyGating::Router,
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.to_string());
            assert_eq!(r.to_string().parse::<ReplyGating>().unwrap(), r);
        }
        assert_eq!(
            "softmax".parse::<Gating>().unwrap(),
            Gating::Softmax { temperature: 0.1 }
        );
        for role in [Role::System, Role::User, Role::Assistant] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
    }

    #[test]
    fn unknown_words_and_bad_values_are_named() {
        let e = "blend".parse::<PlanChoice>().unwrap_err().to_string();
        assert!(
            e.contains("unknown plan \"blend\"") && e.contains("auto"),
            "{e}"
        );
        let e = "softmax:-1".parse::<Gating>().unwrap_err().to_string();
        assert!(e.contains("-1") && e.contains("positive"), "{e}");
        assert!("softmax:x".parse::<Gating>().is_err());
        assert!(
            "cosinus"
                .parse::<Scoring>()
                .unwrap_err()
                .to_string()
                .contains("cosinus")
        );
        assert!(
            "robot"
                .parse::<Role>()
                .unwrap_err()
                .to_string()
                .contains("robot")
        );
        assert!("weighted".parse::<ReplyGating>().is_err());
    }

    #[test]
    fn top_k_knows_its_limits() {
        assert_eq!(TopK::new(1).unwrap().get(), 1);
        assert_eq!(TopK::new(MAX_K).unwrap(), TopK::MAX);
        for bad in [0, MAX_K + 1, 1000] {
            let e = TopK::new(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("k = {bad} must be within 1..={MAX_K}")),
                "{e}"
            );
        }
        assert_eq!(serde_json::from_str::<TopK>("4").unwrap().get(), 4);
        assert!(serde_json::from_str::<TopK>("0").is_err());
        assert_eq!(serde_json::to_string(&TopK::DEFAULT).unwrap(), "3");
        assert!(
            "x".parse::<TopK>()
                .unwrap_err()
                .to_string()
                .contains("\"x\"")
        );
    }

    #[test]
    fn gates_from_scores_are_a_distribution() {
        let softmax = |scores: &[f32], temperature| Gating::Softmax { temperature }.gates(scores);
        let g = softmax(&[0.9, 0.5, 0.1], 0.1).unwrap();
        assert!((g.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(g.windows(2).all(|w| w[0] > w[1]));
        assert!(g.iter().all(|&x| x.is_finite() && x >= 0.0));
        assert_eq!(Gating::Uniform.gates(&[0.0; 4]).unwrap(), vec![0.25; 4]);
        assert!(softmax(&[1.0], 0.0).is_err());
        assert!(softmax(&[f32::NAN], 1.0).is_err());
        assert_eq!(Gating::Uniform.gates(&[0.9, 0.1]).unwrap(), vec![0.5, 0.5]);
        let g = Gating::Softmax { temperature: 0.1 }
            .gates(&[0.9, 0.8, 0.1])
            .unwrap();
        assert!((g.iter().sum::<f32>() - 1.0).abs() < 1e-6 && g[0] > g[1] && g[1] > g[2]);
        assert!(
            Gating::Softmax { temperature: 0.1 }
                .gates(&[f32::NAN])
                .is_err()
        );
        assert!(Gating::Uniform.gates(&[]).unwrap().is_empty());
    }

    #[test]
    fn layer_gates_are_checked() {
        let mut lg = LayerGates {
            adapters: vec!["a".into(), "b".into()],
            layers: 1,
            tokens: vec!["<prompt>".into()],
            gates: vec![vec![vec![0.25, 0.75]]],
        };
        lg.check().unwrap();
        lg.gates[0][0][1] = 1.5;
        assert!(lg.check().unwrap_err().to_string().contains("1.5"));
        lg.layers = 2;
        assert!(lg.check().unwrap_err().to_string().contains("declared"));
    }

    proptest::proptest! {
        #[test]
        fn retrieval_gates_are_a_distribution(
            scores in proptest::collection::vec(-1f32..1.0, 1..16),
            tau in 0.001f32..10.0,
            softmax in proptest::bool::ANY,
        ) {
            let gating = if softmax { Gating::Softmax { temperature: tau } } else { Gating::Uniform };
            let g = gating.gates(&scores).unwrap();
            proptest::prop_assert_eq!(g.len(), scores.len());
            proptest::prop_assert!(g.iter().all(|x| x.is_finite() && *x >= 0.0), "{:?}", g);
            proptest::prop_assert!((g.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{:?}", g);
        }
    }
}
