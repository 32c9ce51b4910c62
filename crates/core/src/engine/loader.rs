//! The loader thread: reads adapter files and compiles a request's mixture off the worker
//! thread, so a request waiting for its adapters never stalls the running rows.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Weak};

use super::{Command, EngineError, MixRequest, RowMix, Shared};
use crate::adapter::LoraAdapter;
use crate::model::Model;
use crate::mole::{CompiledMix, Precision};
use crate::router::{RouterLora, RouterMix};
use crate::vocab::Plan;

/// A request's adapters to load and compile.
pub(super) struct LoadJob {
    pub(super) id: u64,
    pub(super) mix: MixRequest,
    /// The router of a `router` plan.
    pub(super) router: Option<Arc<RouterLora>>,
    /// Adapters already resident, by id.
    pub(super) resident: Vec<(String, Arc<LoraAdapter>)>,
}

/// A request's mixture and the adapters newly loaded for it, by id.
type Prepared = (RowMix, Vec<(String, Arc<LoraAdapter>)>);

pub(super) struct Loaded {
    pub(super) id: u64,
    pub(super) result: Result<Prepared, EngineError>,
}

/// Loads adapter files and compiles mixtures off the worker thread.
pub(super) struct Loader {
    model: Arc<Model>,
    precision: Precision,
    shared: Arc<Shared>,
    wake: SyncSender<Command>,
    /// Adapters this thread loaded that may still be alive, so two requests that ask for the same
    /// new adapter before the worker records it share one copy.
    recent: HashMap<String, Weak<LoraAdapter>>,
}

impl Loader {
    pub(super) fn new(
        model: Arc<Model>,
        precision: Precision,
        shared: Arc<Shared>,
        wake: SyncSender<Command>,
    ) -> Self {
        Self {
            model,
            precision,
            shared,
            wake,
            recent: HashMap::new(),
        }
    }

    pub(super) fn run(mut self, rx: Receiver<LoadJob>) {
        for job in rx {
            let result = self.load(&job);
            self.shared
                .loaded
                .lock()
                .expect("loaded lock")
                .push(Loaded { id: job.id, result });
            // Blocked in `recv` the worker's channel is empty, so this cannot be refused then;
            // when it is full, the worker is busy and looks at the results on its next step.
            let _ = self.wake.try_send(Command::Wake);
        }
    }

    fn load(&mut self, job: &LoadJob) -> Result<Prepared, EngineError> {
        self.recent.retain(|_, w| w.strong_count() > 0);
        let mut parts = Vec::with_capacity(job.mix.adapters.len());
        let mut fresh = Vec::new();
        for u in &job.mix.adapters {
            let known = job
                .resident
                .iter()
                .find(|(id, _)| *id == u.id)
                .map(|(_, a)| a.clone())
                .or_else(|| self.recent.get(&u.id).and_then(Weak::upgrade));
            let adapter = match known {
                Some(a) => a,
                None => {
                    let a = LoraAdapter::load(&u.dir, &self.model.decoder).map_err(|e| {
                        EngineError::Adapter {
                            id: u.id.clone(),
                            message: e.to_string(),
                        }
                    })?;
                    let a = Arc::new(a);
                    self.recent.insert(u.id.clone(), Arc::downgrade(&a));
                    fresh.push((u.id.clone(), a.clone()));
                    a
                }
            };
            parts.push((adapter, u.gate));
        }
        let mix = match (&job.mix.plan, &job.router) {
            (Plan::Router, Some(router)) => {
                // The gates are the router's: the request's own are ignored.
                let adapters: Vec<Arc<LoraAdapter>> = parts.into_iter().map(|(a, _)| a).collect();
                let routed = RouterMix::new(&adapters, Some(router))
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
                RowMix::Routed(Arc::new(routed))
            }
            (Plan::Router, None) => {
                return Err(EngineError::Invalid(
                    "plan router needs a RouterLoRA for this base; none is loaded".into(),
                ));
            }
            _ => RowMix::Fixed(Arc::new(CompiledMix::with_precision(
                job.mix.plan,
                &parts,
                self.precision,
            )?)),
        };
        Ok((mix, fresh))
    }
}
