//! Concurrency slots: a pipeline with `concurrency: n` has keys `0..n` in
//! `cim_pipeline_slots`; a run holds one (a lease renewed every third of its TTL) while it
//! works, across all engine instances.

use async_nats::jetstream::kv;
use bytes::Bytes;
use cim_events::pipeline as pl;
use tokio::sync::watch;

use crate::{definition::Definition, engine::Engine};

impl Engine {
    /// A slot of the pipeline's concurrency limit, held while the run works.
    pub(crate) async fn acquire_slot(&self, def: &Definition, run_id: &str) -> Result<Lease, String> {
        if def.concurrency == 0 {
            return Ok(Lease::Unlimited);
        }
        for n in 0..def.concurrency {
            let key = pl::slot_key(&def.name, n).map_err(|e| e.to_string())?;
            let revision = match self.slots.create(&key, Bytes::from(run_id.to_string())).await {
                Ok(r) => r,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // Ours from before (this run, redelivered)? Take it over.
                    match self.slots.entry(&key).await {
                        Ok(Some(entry))
                            if entry.value.as_ref() == run_id.as_bytes() && entry.operation == kv::Operation::Put =>
                        {
                            match self.slots.update(&key, Bytes::from(run_id.to_string()), entry.revision).await {
                                Ok(r) => r,
                                Err(_) => continue,
                            }
                        }
                        _ => continue,
                    }
                }
                Err(e) => return Err(format!("concurrency slot {key}: {e}")),
            };
            let (stop, mut stopped) = watch::channel(false);
            let slots = self.slots.clone();
            let value = run_id.to_string();
            let renew_key = key.clone();
            let renewer = tokio::spawn(async move {
                let mut revision = revision;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(pl::SLOT_TTL / 3) => {}
                        _ = stopped.changed() => break,
                    }
                    match slots.update(&renew_key, Bytes::from(value.clone()), revision).await {
                        Ok(r) => revision = r,
                        Err(e) => {
                            tracing::warn!(slot = %renew_key, error = %e, "lost a concurrency slot");
                            return;
                        }
                    }
                }
                let _ = slots.delete_expect_revision(&renew_key, Some(revision)).await;
            });
            return Ok(Lease::Held { _slot: Slot { stop, renewer: Some(renewer) } });
        }
        Ok(Lease::AllTaken)
    }
}

/// What a run got when it asked for a concurrency slot.
pub(crate) enum Lease {
    /// The pipeline has no concurrency limit: there is nothing to hold.
    Unlimited,
    /// A slot, renewed while the lease lives and released when it is dropped.
    Held { _slot: Slot },
    /// Every slot is taken by other runs: try again later.
    AllTaken,
}

/// A held concurrency slot: renewed until dropped, then released.
pub(crate) struct Slot {
    stop: watch::Sender<bool>,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // The renewer deletes the slot itself once told to stop.
        drop(self.renewer.take());
    }
}
