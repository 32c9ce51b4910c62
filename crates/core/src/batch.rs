//! Pure packing of concurrent requests into one forward step (ramole-paper.md section 3): which
//! tokens each row feeds this step (decode rows first, prompts prefilled in chunks within a
//! token budget), where each row's tokens sit in the packed `[n_tokens, features]` activations,
//! which rows share a compiled mixture (the per-row gather groups), and the paper's union of
//! adapters with its mapping matrix `M[row, adapter] = gate`.
//!
//! Rows are packed back to back without padding: attention runs per row with a causal mask
//! offset by the row's cache length ([`causal_mask`]), which is what a padded batch with masks
//! computes, without the wasted positions. No I/O, no tensors, no imports from the rest of the
//! crate (the decoder builds on it): everything here is property-tested.

use std::collections::HashMap;

/// The tokens of one batch row inside the packed `[n_tokens, features]` activations:
/// rows `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub start: usize,
    pub len: usize,
}

/// Which adapters one row applies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RowAdapters {
    /// Identity of the row's compiled mixture (rows with equal ids share one); `None`: the base.
    pub mix: Option<usize>,
    /// `(adapter id, gate)` of each adapter the row applies as a gated sum.
    pub adapters: Vec<(usize, f32)>,
}

/// What one row of a step asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RowRequest {
    /// New tokens this row feeds (at least 1).
    pub tokens: usize,
    pub mix: RowAdapters,
}

/// Rows sharing one compiled mixture, in first-row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub mix: usize,
    pub rows: Vec<usize>,
}

/// Who applies which adapter: the per-row gather groups and the paper's union with its mapping
/// matrix. It does not depend on token counts, so it holds for every step until a row joins or
/// leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    /// The per-row gather: rows grouped by compiled mixture.
    pub groups: Vec<Group>,
    /// The union of all rows' adapters (distinct ids, first-seen order).
    pub union: Vec<usize>,
    /// The paper's mapping matrix, `[rows][union.len()]`: the gate of union adapter `j` in
    /// row `i`, 0 where the row does not use it.
    pub mapping: Vec<Vec<f32>>,
}

/// One step's rows packed.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Row `i` owns tokens `spans[i].start .. + len`, rows back to back in order.
    pub spans: Vec<RowSpan>,
    pub n_tokens: usize,
    pub mapping: Mapping,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error("a step needs at least one row")]
    Empty,
    #[error("row {row} feeds no tokens")]
    EmptyRow { row: usize },
    #[error("row {row}: gate {gate} of adapter {adapter} must be finite and non-negative")]
    Gate {
        row: usize,
        adapter: usize,
        gate: f32,
    },
    #[error("row {row} lists adapter {adapter} twice")]
    Duplicate { row: usize, adapter: usize },
}

impl Mapping {
    pub fn new(rows: &[RowAdapters]) -> Result<Self, BatchError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut group_of: HashMap<usize, usize> = HashMap::new();
        let mut union: Vec<usize> = Vec::new();
        let mut slot_of: HashMap<usize, usize> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            if let Some(m) = r.mix {
                let g = *group_of.entry(m).or_insert_with(|| {
                    groups.push(Group {
                        mix: m,
                        rows: Vec::new(),
                    });
                    groups.len() - 1
                });
                groups[g].rows.push(i);
            }
            for (k, &(a, gate)) in r.adapters.iter().enumerate() {
                if !(gate.is_finite() && gate >= 0.0) {
                    return Err(BatchError::Gate {
                        row: i,
                        adapter: a,
                        gate,
                    });
                }
                if r.adapters[..k].iter().any(|&(b, _)| b == a) {
                    return Err(BatchError::Duplicate { row: i, adapter: a });
                }
                slot_of.entry(a).or_insert_with(|| {
                    union.push(a);
                    union.len() - 1
                });
            }
        }
        let mapping = rows
            .iter()
            .map(|r| {
                let mut m = vec![0f32; union.len()];
                for &(a, gate) in &r.adapters {
                    m[slot_of[&a]] = gate;
                }
                m
            })
            .collect();
        Ok(Self {
            groups,
            union,
            mapping,
        })
    }
}

/// Packs `rows` in order.
pub fn pack(rows: &[RowRequest]) -> Result<Layout, BatchError> {
    if rows.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut spans = Vec::with_capacity(rows.len());
    let mut start = 0;
    for (i, r) in rows.iter().enumerate() {
        if r.tokens == 0 {
            return Err(BatchError::EmptyRow { row: i });
        }
        spans.push(RowSpan {
            start,
            len: r.tokens,
        });
        start += r.tokens;
    }
    let mixes: Vec<RowAdapters> = rows.iter().map(|r| r.mix.clone()).collect();
    Ok(Layout {
        spans,
        n_tokens: start,
        mapping: Mapping::new(&mixes)?,
    })
}

/// How many tokens each row feeds this step. `pending[i]` is row `i`'s prompt tokens not yet
/// prefilled (0: the row is decoding). Decoding rows always feed their one token (they are what
/// a user watches); prompts then take chunks of at most `chunk` tokens, in row order, while the
/// step stays within `budget` tokens, and the first prompt always gets at least one token so a
/// step never stalls. A row given 0 sits this step out.
pub fn step_tokens(pending: &[usize], budget: usize, chunk: usize) -> Vec<usize> {
    let chunk = chunk.max(1);
    let mut out: Vec<usize> = pending.iter().map(|&p| usize::from(p == 0)).collect();
    let mut used: usize = out.iter().sum();
    let mut first_prompt = true;
    for (i, &p) in pending.iter().enumerate() {
        if p == 0 {
            continue;
        }
        let room = budget.saturating_sub(used);
        let take = p
            .min(chunk)
            .min(if first_prompt { room.max(1) } else { room });
        first_prompt = false;
        out[i] = take;
        used += take;
    }
    out
}

/// The additive causal mask of one row, `[t, pos + t]` row-major: 0 where new token `i` (at
/// position `pos + i`) may attend to position `j`, `-inf` for future positions and, with a
/// sliding `window`, for positions `window` or more behind.
pub fn causal_mask(pos: usize, t: usize, window: Option<usize>) -> Vec<f32> {
    let total = pos + t;
    let mut mask = vec![0f32; t * total];
    for i in 0..t {
        let q = pos + i;
        for (j, m) in mask[i * total..(i + 1) * total].iter_mut().enumerate() {
            let future = j > q;
            let too_old = window.is_some_and(|w| q >= w && j <= q - w);
            if future || too_old {
                *m = f32::NEG_INFINITY;
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row() -> impl Strategy<Value = RowRequest> {
        (
            1usize..40,
            proptest::option::of(0usize..4),
            proptest::collection::btree_map(0usize..12, 0f32..2.0, 0..5),
        )
            .prop_map(|(tokens, mix, adapters)| RowRequest {
                tokens,
                mix: RowAdapters {
                    mix,
                    adapters: adapters.into_iter().collect(),
                },
            })
    }

    proptest! {
        #[test]
        fn every_row_is_packed_exactly_once(rows in proptest::collection::vec(row(), 1..12)) {
            let l = pack(&rows).unwrap();
            prop_assert_eq!(l.spans.len(), rows.len());
            let mut owner = vec![usize::MAX; l.n_tokens];
            for (i, s) in l.spans.iter().enumerate() {
                prop_assert_eq!(s.len, rows[i].tokens);
                for o in &mut owner[s.start..s.start + s.len] {
                    prop_assert_eq!(*o, usize::MAX, "token packed twice");
                    *o = i;
                }
            }
            prop_assert!(owner.iter().all(|&o| o != usize::MAX), "token left unpacked");
            prop_assert!(owner.windows(2).all(|w| w[0] <= w[1]), "rows out of order");
            // Groups partition exactly the rows that have a mixture, each row once.
            let mut seen = vec![0; rows.len()];
            for g in &l.mapping.groups {
                for &r in &g.rows {
                    prop_assert_eq!(rows[r].mix.mix, Some(g.mix));
                    seen[r] += 1;
                }
            }
            for (i, r) in rows.iter().enumerate() {
                prop_assert_eq!(seen[i], usize::from(r.mix.mix.is_some()));
            }
            // The mapping matrix holds each row's gates and nothing else.
            let mut distinct: Vec<usize> = rows.iter().flat_map(|r| r.mix.adapters.iter().map(|a| a.0)).collect();
            distinct.sort_unstable();
            distinct.dedup();
            let m = &l.mapping;
            let mut union = m.union.clone();
            union.sort_unstable();
            prop_assert_eq!(union, distinct);
            for (i, r) in rows.iter().enumerate() {
                let nonzero = m.mapping[i].iter().filter(|g| **g != 0.0).count();
                prop_assert_eq!(nonzero, r.mix.adapters.iter().filter(|a| a.1 != 0.0).count());
                for &(a, g) in &r.mix.adapters {
                    let j = m.union.iter().position(|&u| u == a).unwrap();
                    prop_assert_eq!(m.mapping[i][j], g);
                }
            }
        }

        #[test]
        fn steps_decode_every_decoding_row_and_respect_the_budget(
            pending in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..300], 1..10),
            budget in 1usize..200,
            chunk in 1usize..80,
        ) {
            let s = step_tokens(&pending, budget, chunk);
            let decoding = pending.iter().filter(|&&p| p == 0).count();
            for (i, (&p, &t)) in pending.iter().zip(&s).enumerate() {
                if p == 0 {
                    prop_assert_eq!(t, 1, "decoding row {} must feed one token", i);
                } else {
                    prop_assert!(t <= p.min(chunk));
                }
            }
            let total: usize = s.iter().sum();
            prop_assert!(total <= budget.max(decoding + 1));
            prop_assert!(total > 0, "a step must make progress");
        }
    }

    #[test]
    fn bad_rows_are_refused_with_the_row_named() {
        let ok = RowRequest {
            tokens: 1,
            mix: RowAdapters::default(),
        };
        assert_eq!(pack(&[]), Err(BatchError::Empty));
        let empty = RowRequest {
            tokens: 0,
            ..ok.clone()
        };
        assert_eq!(
            pack(&[ok.clone(), empty]),
            Err(BatchError::EmptyRow { row: 1 })
        );
        let nan = RowRequest {
            mix: RowAdapters {
                mix: None,
                adapters: vec![(3, f32::NAN)],
            },
            ..ok.clone()
        };
        assert!(matches!(
            pack(&[nan]),
            Err(BatchError::Gate {
                row: 0,
                adapter: 3,
                ..
            })
        ));
        let twice = RowRequest {
            mix: RowAdapters {
                mix: None,
                adapters: vec![(3, 0.5), (3, 0.5)],
            },
            ..ok
        };
        assert_eq!(
            pack(&[twice]),
            Err(BatchError::Duplicate { row: 0, adapter: 3 })
        );
    }

    #[test]
    fn prompts_are_chunked_behind_decoding_rows() {
        // Two decoding rows, a long prompt and a short one; budget 40, chunk 32.
        assert_eq!(step_tokens(&[0, 100, 0, 5], 40, 32), vec![1, 32, 1, 5]);
        // The budget is spent: the second prompt waits.
        assert_eq!(step_tokens(&[0, 100, 9], 20, 32), vec![1, 19, 0]);
        // Even with no budget left the first prompt advances.
        assert_eq!(step_tokens(&[0, 0, 7], 2, 32), vec![1, 1, 1]);
    }

    #[test]
    fn masks_are_causal_with_offsets_and_windows() {
        let inf = f32::NEG_INFINITY;
        // Two new tokens after 1 cached position.
        assert_eq!(causal_mask(1, 2, None), vec![0.0, 0.0, inf, 0.0, 0.0, 0.0]);
        // Window 2: position 3 sees 2 and 3 only.
        assert_eq!(causal_mask(3, 1, Some(2)), vec![inf, inf, 0.0, 0.0]);
    }
}
