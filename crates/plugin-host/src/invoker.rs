//! Scheduling of WebAssembly invocations: at most `parallelism` run at once (each on its
//! request's worker thread, in `block_in_place`), at most `queue` wait for a slot, and anything beyond is refused at once as
//! saturated, so callers back off instead of piling up in the host.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use cim_events::proto::plugin::{StatsReply, Status};
use tokio::sync::Semaphore;

use crate::sandbox::{Compiled, Outcome};

#[derive(Debug)]
pub struct Invoker {
    parallelism: u32,
    queue: u32,
    permits: Arc<Semaphore>,
    admitted: AtomicU32,
    running: AtomicU32,
    peak: AtomicU32,
    invocations: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

impl Invoker {
    pub fn new(parallelism: usize, queue: usize) -> Invoker {
        Invoker {
            parallelism: parallelism as u32,
            queue: queue as u32,
            permits: Arc::new(Semaphore::new(parallelism)),
            admitted: AtomicU32::new(0),
            running: AtomicU32::new(0),
            peak: AtomicU32::new(0),
            invocations: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Runs one invocation when a slot is free, or refuses it when the queue is full.
    pub async fn run(
        &self,
        plugin: Arc<Compiled>,
        input: Bytes,
        metadata: HashMap<String, String>,
        timeout: Option<Duration>,
    ) -> Outcome {
        let admitted = self.admitted.fetch_add(1, Ordering::SeqCst);
        if admitted >= self.parallelism + self.queue {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Outcome {
                status: Status::Unavailable,
                output: Vec::new(),
                metadata: Default::default(),
                message: format!(
                    "plugin host saturated: {} running and {} queued; retry later",
                    self.parallelism, self.queue
                ),
                duration: Duration::ZERO,
                fuel_used: 0,
            };
        }
        let _leave = Leave(&self.admitted);
        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome { status: Status::Unavailable, message: "plugin host is stopping".into(), ..empty() };
        };
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(running, Ordering::SeqCst);
        let _done = Leave(&self.running);
        self.invocations.fetch_add(1, Ordering::Relaxed);
        // The call runs on this worker thread; `block_in_place` hands the worker's other tasks
        // to another thread meanwhile, which costs less than a hop to the blocking pool and
        // back for the typical sub-millisecond call (and the wall-clock deadline bounds it).
        let outcome = tokio::task::block_in_place(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plugin.invoke(input, metadata, timeout)))
        })
        .unwrap_or_else(|e| {
            let why = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Outcome { status: Status::Trapped, message: format!("plugin invocation panicked: {why}"), ..empty() }
        });
        if outcome.status != Status::Ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    pub fn stats(&self) -> StatsReply {
        let admitted = self.admitted.load(Ordering::SeqCst);
        let running = self.running.load(Ordering::SeqCst);
        StatsReply {
            parallelism: self.parallelism,
            queue: self.queue,
            running,
            queued: admitted.saturating_sub(running),
            peak_running: self.peak.load(Ordering::SeqCst),
            invocations: self.invocations.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

fn empty() -> Outcome {
    Outcome {
        status: Status::Unavailable,
        output: Vec::new(),
        metadata: Default::default(),
        message: String::new(),
        duration: Duration::ZERO,
        fuel_used: 0,
    }
}

/// Decrements a counter when dropped (also when the caller's future is cancelled).
struct Leave<'a>(&'a AtomicU32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
