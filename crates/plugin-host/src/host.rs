//! The plugin host's state and its start: a catalog of plugin versions rebuilt from
//! `CIM_PLUGIN_EVENTS` (pushed/removed) and the modules in `cim_plugin_artifacts`, the tasks
//! that follow events and announcements, and the writing of plugin events.
//!
//! The rest of `impl Host` is split by concern over sibling modules: `catalog` (replaying
//! events into loaded versions, announcements of local and native plugins), `routing` (one
//! subscription per ready WebAssembly version, invocation by name or capability to local
//! WebAssembly or to native plugins), `commands` (push and remove with immutable versions and
//! the references check), `queries` (list, stats).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::DeliverPolicy, kv, object_store::ObjectStore};
use cim_events::{
    Envelope, Payload, Upcasters, plugin,
    proto::plugin::{PluginAnnounced, PluginInfo},
    resources,
};
use cim_runtime::{Ctx, NewEvent, PublishError, ServiceError};
use futures::StreamExt;
use tokio::sync::watch;

use crate::{
    PluginArgs,
    invoker::Invoker,
    sandbox::{Compiled, Sandbox},
};

/// How soon the plugin-event follower tries again to start over.
const FOLLOW_RETRY: Duration = Duration::from_millis(200);

/// The ordered consumer over the plugin events from stream sequence `from`.
fn plugin_events_from(from: u64) -> jetstream::consumer::pull::OrderedConfig {
    jetstream::consumer::pull::OrderedConfig {
        filter_subject: plugin::all_events(),
        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: from },
        ..Default::default()
    }
}

/// How long a push or remove waits for its own event to be applied.
const APPLY_WAIT: Duration = Duration::from_secs(30);

/// A plugin version this host knows from the event stream.
pub(crate) struct Entry {
    pub(crate) info: PluginInfo,
    pub(crate) compiled: Option<Arc<Compiled>>,
    pub(crate) server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// How often modules of removed versions are checked for deletion (the retention guard may
/// have held them back until their archive was verified).
const REMOVED_MODULE_SWEEP: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(crate) struct Catalog {
    /// Live versions by (name, version).
    pub(crate) versions: BTreeMap<(String, String), Entry>,
    /// Every version ever pushed and its digest: versions are immutable even after removal.
    pub(crate) ever: HashMap<(String, String), String>,
    /// Last event sequence per plugin name (optimistic concurrency).
    pub(crate) last_seq: HashMap<String, u64>,
    /// Native plugins seen announcing, with when.
    pub(crate) natives: HashMap<(String, String), (PluginAnnounced, Instant)>,
}

pub struct Host {
    pub(crate) ctx: Ctx,
    pub(crate) sandbox: Sandbox,
    pub(crate) invoker: Invoker,
    pub(crate) bucket: ObjectStore,
    pub(crate) refs: kv::Store,
    pub(crate) max_module: u64,
    pub(crate) catalog: RwLock<Catalog>,
    pub(crate) applied: watch::Sender<u64>,
    pub(crate) upcasters: Upcasters,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

pub(crate) enum Target {
    Local(Arc<Compiled>, PluginInfo),
    Native(PluginInfo),
}

impl Host {
    /// Replays the catalog, loads every plugin, pushes the built-ins, and starts serving.
    pub async fn start(ctx: Ctx, args: &PluginArgs) -> anyhow::Result<Arc<Host>> {
        let js = ctx.jetstream().clone();
        let bucket = js.get_object_store(plugin::ARTIFACTS_BUCKET).await?;
        let refs = js.get_key_value(resources::kv_bucket(crate::COMPONENT, plugin::KV_REFERENCES)?).await?;
        let host = Arc::new(Host {
            sandbox: Sandbox::new(args.policy())?,
            invoker: Invoker::new(args.parallelism(), args.plugin_queue as usize),
            bucket,
            refs,
            max_module: args.plugin_max_module,
            catalog: RwLock::new(Catalog::default()),
            applied: watch::channel(0).0,
            upcasters: Upcasters::default(),
            ctx: ctx.clone(),
        });

        // Replay before serving: a restarted host answers for every plugin it had.
        let stream = js.get_stream(resources::events_stream(crate::COMPONENT).name).await?;
        let consumer = stream.create_consumer(plugin_events_from(1)).await?;
        let mut pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await?;
        while pending > 0 {
            let Some(m) = messages.next().await else { anyhow::bail!("event stream ended during replay") };
            let m = m?;
            let info = m.info().map_err(|e| anyhow::anyhow!("event without metadata: {e}"))?;
            let (seq, left) = (info.stream_sequence, info.pending);
            host.apply(&m.message, seq).await;
            pending = left;
        }
        let h = host.clone();
        ctx.spawn("plugin-events", async move {
            let mut connections = h.ctx.connections();
            connections.borrow_and_update();
            loop {
                let start_over = tokio::select! {
                    m = messages.next() => match m {
                        Some(Ok(m)) => {
                            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                            h.apply(&m.message, seq).await;
                            false
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "reading plugin events");
                            false
                        }
                        None => true,
                    },
                    // The server may have restarted without the consumer: start over at once
                    // rather than after its missed heartbeats.
                    _ = connections.changed() => true,
                    _ = h.ctx.stopping() => break,
                };
                if !start_over {
                    continue;
                }
                loop {
                    let from = *h.applied.borrow() + 1;
                    let next = async { stream.create_consumer(plugin_events_from(from)).await?.messages().await };
                    match next.await {
                        Ok(m) => {
                            tracing::info!(from, "following the plugin events again");
                            messages = m;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot follow the plugin events; retrying");
                            if !h.ctx.pause(FOLLOW_RETRY).await {
                                return;
                            }
                        }
                    }
                }
            }
        });

        let h = host.clone();
        let mut announcements = ctx.client().subscribe(plugin::all_announcements()).await?;
        ctx.spawn("plugin-announcements", async move {
            loop {
                tokio::select! {
                    m = announcements.next() => match m {
                        Some(m) => h.observe(&m),
                        None => break,
                    },
                    _ = h.ctx.stopping() => break,
                }
            }
        });
        let h = host.clone();
        ctx.spawn("plugin-announce", async move {
            let every = h.announce_every();
            loop {
                h.announce_all().await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = h.ctx.stopping() => break,
                }
            }
        });

        if !args.no_builtins {
            host.push_builtins().await;
        }
        let h = host.clone();
        ctx.spawn("removed-modules", async move {
            loop {
                h.sweep_removed_modules().await;
                tokio::select! {
                    _ = tokio::time::sleep(REMOVED_MODULE_SWEEP) => {}
                    _ = h.ctx.stopping() => break,
                }
            }
        });
        Ok(host)
    }

    pub(crate) fn announce_every(&self) -> Duration {
        self.ctx.settings().heartbeat_interval.max(Duration::from_millis(100))
    }

    pub(crate) async fn publish<P: Payload>(
        &self,
        subject: String,
        name: &str,
        expected: u64,
        payload: &P,
    ) -> Result<u64, ServiceError> {
        let env = Envelope::root::<P>(self.ctx.source());
        let filter = plugin::history(name).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let ack = NewEvent::new(subject, &env, payload.encode_to_vec())
            .msg_id(&env.id().to_string())
            .expect(&filter, expected)
            .publish(self.ctx.jetstream())
            .await
            .map_err(|e| match e {
                PublishError::Conflict => ServiceError::conflict(format!("plugin {name} changed concurrently; retry")),
                e => e.into(),
            })?;
        Ok(ack.sequence)
    }

    pub(crate) async fn wait_applied(&self, seq: u64) -> Result<(), ServiceError> {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(APPLY_WAIT, rx.wait_for(|s| *s >= seq))
            .await
            .map_err(|_| ServiceError::unavailable("the event was recorded but not yet applied; retry to see it"))?
            .map_err(|_| ServiceError::unavailable("the host is stopping"))?;
        Ok(())
    }
}
