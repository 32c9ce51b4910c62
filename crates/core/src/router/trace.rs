//! A router reply's gates as it runs ([`GateTrace`]: per layer and adapter, the prompt's sums
//! and each reply token's means) and the summary its provenance keeps (`vocab::LayerGates`).

use super::RowGates;
use crate::vocab::LayerGates;

/// Columns of a [`LayerGates`] summary: the prompt and up to this many minus one reply columns.
pub const MAX_GATE_COLUMNS: usize = 32;

/// A reply's router gates as it runs: per layer and adapter, summed over the prompt, and the
/// means of every reply token fed back through the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateTrace {
    pub adapters: usize,
    pub layers: usize,
    /// Sums over the prompt's tokens and each layer's sites.
    pub prompt: RowGates,
    /// Each fed reply token: its text and `[layer][adapter]` mean gates.
    pub tokens: Vec<(String, Vec<Vec<f32>>)>,
}

impl GateTrace {
    pub fn new(layers: usize, adapters: usize) -> Self {
        Self {
            adapters,
            layers,
            prompt: RowGates {
                sums: vec![0.0; layers * adapters],
                counts: vec![0; layers * adapters],
            },
            tokens: Vec::new(),
        }
    }

    /// Adds a prompt chunk's gates.
    pub fn add_prompt(&mut self, g: &RowGates) {
        for (s, v) in self.prompt.sums.iter_mut().zip(&g.sums) {
            *s += v;
        }
        for (c, v) in self.prompt.counts.iter_mut().zip(&g.counts) {
            *c += v;
        }
    }

    /// Adds the gates of one fed reply token.
    pub fn push_token(&mut self, text: String, g: &RowGates) {
        if g.sums.is_empty() {
            return;
        }
        self.tokens.push((text, g.means(self.adapters)));
    }

    /// Each adapter's mean gate over layers and reply tokens (over the prompt when no reply
    /// token was fed): what the gate bars show for a router reply.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.adapters.max(1);
        let mut acc = vec![0f64; self.adapters];
        let mut count = 0usize;
        if self.tokens.is_empty() {
            for layer in self.prompt.means(n) {
                acc.iter_mut()
                    .zip(&layer)
                    .for_each(|(a, g)| *a += *g as f64);
                count += 1;
            }
        } else {
            for (_, layers) in &self.tokens {
                for layer in layers {
                    acc.iter_mut().zip(layer).for_each(|(a, g)| *a += *g as f64);
                    count += 1;
                }
            }
        }
        acc.iter()
            .map(|a| (a / count.max(1) as f64) as f32)
            .collect()
    }

    /// The summary a reply's provenance keeps: the prompt column and at most
    /// [`MAX_GATE_COLUMNS`]` - 1` reply columns (consecutive tokens share a column when there are
    /// more), gates rounded to 3 decimals. `ids` name the adapters in order.
    pub fn summary(&self, ids: &[String]) -> LayerGates {
        // In f64, so the JSON holds 0.41, not the f32's 0.4099999964237213.
        let round = |v: f32| (v as f64 * 1000.0).round() / 1000.0;
        let mut tokens = vec!["<prompt>".to_string()];
        // gates[layer][column][adapter]
        let mut gates: Vec<Vec<Vec<f64>>> = self
            .prompt
            .means(self.adapters)
            .into_iter()
            .map(|l| vec![l.into_iter().map(round).collect()])
            .collect();
        let per = self.tokens.len().div_ceil(MAX_GATE_COLUMNS - 1).max(1);
        for chunk in self.tokens.chunks(per) {
            tokens.push(chunk.iter().map(|(t, _)| t.as_str()).collect());
            for (layer, column) in gates.iter_mut().enumerate() {
                let mean: Vec<f32> = (0..self.adapters)
                    .map(|a| {
                        chunk.iter().map(|(_, g)| g[layer][a]).sum::<f32>() / chunk.len() as f32
                    })
                    .collect();
                column.push(mean.into_iter().map(round).collect());
            }
        }
        LayerGates {
            adapters: ids.to_vec(),
            layers: self.layers,
            tokens,
            gates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(layers: usize, per_layer: &[f64]) -> RowGates {
        RowGates {
            sums: (0..layers)
                .flat_map(|_| per_layer.iter().copied())
                .collect(),
            counts: vec![1; layers * per_layer.len()],
        }
    }

    #[test]
    fn a_long_reply_is_summarised_in_at_most_32_columns() {
        let mut t = GateTrace::new(2, 2);
        t.add_prompt(&gates(2, &[0.5, 0.5]));
        t.add_prompt(&gates(2, &[0.7, 0.3]));
        for i in 0..70 {
            let a = if i < 35 { 0.9 } else { 0.1 };
            t.push_token(format!("t{i} "), &gates(2, &[a, 1.0 - a]));
        }
        let s = t.summary(&["x".into(), "y".into()]);
        assert_eq!(s.tokens.len(), 1 + 70usize.div_ceil(3));
        assert!(s.tokens.len() <= MAX_GATE_COLUMNS);
        assert_eq!(s.tokens[0], "<prompt>");
        assert_eq!(s.tokens[1], "t0 t1 t2 ");
        // The prompt column is the mean over its chunks; reply columns the mean of their tokens.
        assert_eq!(s.gates[0][0], [0.6, 0.4]);
        assert_eq!(s.gates[1][1], [0.9, 0.1]);
        // Tokens 33..35 straddle the change: (0.9 + 0.9 + 0.1) / 3.
        assert_eq!(s.gates[0][12], [0.633, 0.367]);
        assert_eq!(t.mean(), [0.5, 0.5]);
        // Rounded in f64: the JSON holds 0.633, not an f32's long tail.
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("0.633") && !json.contains("0.63299"),
            "{json}"
        );
    }
}
