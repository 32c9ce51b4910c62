//! What the worker keeps between requests: resident adapters (an LRU within a byte budget) and
//! the live mixtures requests may share.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::{MixRequest, RowMix};
use crate::adapter::LoraAdapter;
use crate::mole::CompiledMix;
use crate::router::{RouterLora, RouterMix};
use crate::vocab::Plan;

/// Resident adapters, least recently used first out, within a byte budget; adapters a row still
/// uses are never dropped.
#[derive(Default)]
pub(super) struct AdapterCache {
    entries: HashMap<String, (Arc<LoraAdapter>, u64)>,
    clock: u64,
}

impl AdapterCache {
    pub(super) fn get(&mut self, id: &str) -> Option<Arc<LoraAdapter>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(id).map(|(a, used)| {
            *used = clock;
            a.clone()
        })
    }

    pub(super) fn insert(&mut self, id: String, a: Arc<LoraAdapter>) {
        self.clock += 1;
        self.entries.entry(id).or_insert((a, self.clock));
    }

    pub(super) fn bytes(&self) -> usize {
        self.entries.values().map(|(a, _)| a.bytes()).sum()
    }

    /// Drops unused adapters, oldest first, until the cache fits `budget`. Returns how many went.
    pub(super) fn evict(&mut self, budget: usize) -> u64 {
        let mut evicted = 0;
        while self.bytes() > budget {
            let victim = self
                .entries
                .iter()
                .filter(|(_, (a, _))| Arc::strong_count(a) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| id.clone());
            match victim {
                Some(id) => {
                    self.entries.remove(&id);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }
}

/// Identity of a compiled mixture: requests with equal keys share one (and one gather group).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct MixKey {
    plan: Plan,
    adapters: Vec<(String, u32)>,
    /// The router a `router` mix was compiled with (its address; 0 for other plans).
    router: usize,
}

impl MixKey {
    pub(super) fn of(mix: &MixRequest, router: Option<&Arc<RouterLora>>) -> Self {
        Self {
            plan: mix.plan,
            router: match (mix.plan, router) {
                (Plan::Router, Some(r)) => Arc::as_ptr(r) as usize,
                _ => 0,
            },
            adapters: mix
                .adapters
                .iter()
                .map(|a| (a.id.clone(), a.gate.to_bits()))
                .collect(),
        }
    }
}

/// A live mixture, held weakly: requests with equal [`MixKey`]s share it while any row uses it.
pub(super) enum WeakMix {
    Fixed(Weak<CompiledMix>),
    Routed(Weak<RouterMix>),
}

impl WeakMix {
    pub(super) fn of(mix: &RowMix) -> Self {
        match mix {
            RowMix::Fixed(m) => WeakMix::Fixed(Arc::downgrade(m)),
            RowMix::Routed(m) => WeakMix::Routed(Arc::downgrade(m)),
        }
    }

    pub(super) fn upgrade(&self) -> Option<RowMix> {
        match self {
            WeakMix::Fixed(w) => w.upgrade().map(RowMix::Fixed),
            WeakMix::Routed(w) => w.upgrade().map(RowMix::Routed),
        }
    }

    pub(super) fn is_alive(&self) -> bool {
        match self {
            WeakMix::Fixed(w) => w.strong_count() > 0,
            WeakMix::Routed(w) => w.strong_count() > 0,
        }
    }
}
