//! The prefix cache: KV caches that finished requests leave behind, so the next request that
//! starts with the same tokens under the same adapter configuration (a chat's next turn, a
//! server client resending its conversation) prefills only what is new. An entry is reused
//! only under an equal [`PrefixKey`] — base (one engine, one model), plan, adapters (id and
//! folder) and gates — never across configurations: the cached keys and values were computed
//! with that configuration's LoRA terms. Entries live within a byte budget, least recently used
//! first out.
//!
//! Reuse is exact: every token's numbers depend only on its position and the tokens before it
//! (the decoder's per-row kernels, `mole::MixDelta`'s per-token LoRA terms, attention one query
//! at a time), so greedy output with the cache equals output without it. `router` plans are not
//! cached: their gate trace (provenance) covers every prompt token.

use std::path::PathBuf;

use super::MixRequest;
use crate::model::SeqCache;
use crate::vocab::Plan;

/// The adapter configuration a cached prefix was computed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PrefixKey {
    plan: Plan,
    /// (id, folder, gate bits) in the request's order.
    adapters: Vec<(String, PathBuf, u32)>,
}

impl PrefixKey {
    /// `None` for configurations that are not cached (`router`).
    pub(super) fn of(mix: &MixRequest) -> Option<Self> {
        match mix.plan {
            Plan::Router => None,
            // A plan without adapters is the base model, whatever its name.
            _ if mix.adapters.is_empty() => Some(Self {
                plan: Plan::None,
                adapters: Vec::new(),
            }),
            plan => Some(Self {
                plan,
                adapters: mix
                    .adapters
                    .iter()
                    .map(|a| (a.id.clone(), a.dir.clone(), a.gate.to_bits()))
                    .collect(),
            }),
        }
    }
}

struct Entry {
    key: PrefixKey,
    /// The tokens whose keys and values `cache` holds, position by position.
    tokens: Vec<u32>,
    cache: SeqCache,
    used: u64,
}

/// Finished requests' caches within `budget` bytes.
pub(super) struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    clock: u64,
}

/// A reused prefix: the cache truncated to the `len` tokens it shares with the prompt.
pub(super) struct Hit {
    pub cache: SeqCache,
    pub len: usize,
}

impl PrefixCache {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Vec::new(),
            clock: 0,
        }
    }

    /// Takes the entry under `key` sharing the longest prefix with `prompt`, truncated to that
    /// prefix, leaving at least the prompt's last token to feed (its logits start the reply).
    /// The entry leaves the cache: a cache is written in place, so one row owns it at a time.
    pub(super) fn take(&mut self, key: &PrefixKey, prompt: &[u32]) -> Option<Hit> {
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| &e.key == key)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(prompt.len() - 1)))
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        let mut cache = self.entries.swap_remove(best).cache;
        cache.truncate(len);
        Some(Hit { cache, len })
    }

    /// Keeps `cache` (holding `tokens`) for later requests under `key`, then drops the least
    /// recently used entries beyond the budget. An entry whose tokens extend another's under the
    /// same key replaces it (the longer one serves every prompt the shorter one would).
    pub(super) fn put(&mut self, key: PrefixKey, tokens: Vec<u32>, mut cache: SeqCache) {
        // Tokens fed but no longer in the reply (a trimmed stop string) are not kept.
        cache.truncate(tokens.len());
        if self.budget == 0 || tokens.is_empty() || cache.len() != tokens.len() {
            return;
        }
        self.entries
            .retain(|e| !(e.key == key && tokens.starts_with(&e.tokens)));
        self.clock += 1;
        self.entries.push(Entry {
            key,
            tokens,
            cache,
            used: self.clock,
        });
        while self.bytes() > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("over budget means non-empty");
            self.entries.swap_remove(oldest);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.bytes()).sum()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::AdapterUse;

    fn key(plan: Plan, gates: &[f32]) -> PrefixKey {
        PrefixKey::of(&MixRequest {
            plan,
            adapters: gates
                .iter()
                .enumerate()
                .map(|(i, &gate)| AdapterUse {
                    id: format!("a{i}"),
                    dir: PathBuf::from(format!("/adapters/a{i}")),
                    gate,
                })
                .collect(),
        })
        .unwrap()
    }

    /// A cache holding `n` positions (one layer is enough to count them).
    fn cache_of(n: usize) -> SeqCache {
        let mut c = SeqCache::new(1);
        let kv = candle_core::Tensor::zeros(
            (1, n, 4),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        c.append(0, &kv, &kv).unwrap();
        c
    }

    #[test]
    fn a_prefix_is_reused_only_under_the_same_configuration() {
        let mut p = PrefixCache::new(1 << 20);
        let k = key(Plan::Mixture, &[0.5, 0.5]);
        p.put(k.clone(), vec![1, 2, 3, 4, 5], cache_of(5));
        // Other gates, another plan, the router: no reuse.
        assert!(
            p.take(&key(Plan::Mixture, &[0.4, 0.6]), &[1, 2, 3, 4, 5, 6])
                .is_none()
        );
        assert!(
            p.take(&key(Plan::Fusion, &[0.5, 0.5]), &[1, 2, 3, 4, 5, 6])
                .is_none()
        );
        assert!(
            PrefixKey::of(&MixRequest {
                plan: Plan::Router,
                adapters: vec![]
            })
            .is_none()
        );
        // A prompt that diverges after 3 tokens reuses 3; the entry leaves the cache.
        let hit = p.take(&k, &[1, 2, 3, 9, 9]).unwrap();
        assert_eq!((hit.len, hit.cache.len()), (3, 3));
        assert_eq!(p.len(), 0);
        // The whole prompt cached: its last token is still fed.
        p.put(k.clone(), vec![1, 2, 3], cache_of(3));
        assert_eq!(p.take(&k, &[1, 2, 3]).unwrap().len, 2);
        // Nothing in common.
        p.put(k.clone(), vec![1, 2, 3], cache_of(3));
        assert!(p.take(&k, &[7, 2, 3]).is_none());
    }

    #[test]
    fn the_budget_drops_the_least_recently_used_and_longer_entries_replace_their_prefixes() {
        let one = cache_of(64).bytes();
        let mut p = PrefixCache::new(2 * one);
        let k = key(Plan::None, &[]);
        p.put(k.clone(), vec![1; 64], cache_of(64));
        p.put(k.clone(), vec![2; 64], cache_of(64));
        assert_eq!(p.len(), 2);
        p.put(k.clone(), vec![3; 64], cache_of(64));
        assert_eq!(p.len(), 2);
        assert!(p.bytes() <= 2 * one);
        assert!(p.take(&k, &[1; 65]).is_none(), "the oldest went first");
        assert!(p.take(&k, &[2; 65]).is_some());
        let mut longer = vec![3; 64];
        longer.push(4);
        p.put(k.clone(), longer, cache_of(65));
        assert_eq!(p.len(), 1, "the longer entry replaced its prefix");
        // A zero budget keeps nothing.
        let mut off = PrefixCache::new(0);
        off.put(k.clone(), vec![1; 64], cache_of(64));
        assert_eq!(off.len(), 0);
    }
}
