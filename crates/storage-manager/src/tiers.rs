//! Leaf → cluster: on the cluster, one R3 mirror per leaf and archived stream
//! (`<STREAM>_FROM_<LEAF>`, named by cim-events) that JetStream keeps in step across the
//! leaf node connection. A mirror keeps the leaf's sequence numbers, so after an uplink
//! outage it catches up from where it stopped: no gap, no duplicate. This module creates
//! the mirrors (configured by `cim_events::resources::leaf_mirror_config`) and watches their
//! lag.

use std::{collections::HashMap, time::Duration};

use async_nats::jetstream;
use cim_events::{Tier, resources};
use tokio::sync::watch;

/// Creates (or keeps) every mirror of every leaf; an existing stream of that name that is not
/// the same mirror is an error naming it.
pub async fn ensure_mirrors(
    js: &jetstream::Context,
    leaves: &[String],
    streams: &[String],
    tier: Tier,
) -> anyhow::Result<()> {
    for leaf in leaves {
        for s in streams {
            let cfg = resources::leaf_mirror_config(s, leaf, tier)?;
            match js.get_stream(&cfg.name).await {
                Ok(mut existing) => {
                    let info = existing.info().await?;
                    let same = info.config.mirror.as_ref().is_some_and(|m| {
                        m.name == *s
                            && m.external.as_ref().is_some_and(|e| e.api_prefix == resources::domain_api_prefix(leaf))
                    });
                    if !same {
                        anyhow::bail!("stream {} exists but is not the mirror of {s} on leaf {leaf}", cfg.name);
                    }
                }
                Err(_) => {
                    js.create_stream(cfg.clone())
                        .await
                        .map_err(|e| anyhow::anyhow!("creating mirror {}: {e}", cfg.name))?;
                    tracing::info!(mirror = %cfg.name, leaf = %leaf, stream = %s, "leaf mirror created");
                }
            }
        }
    }
    Ok(())
}

/// What a mirror's watcher last said about it: said again only when it changes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MirrorState {
    InStep,
    /// Messages the leaf has and the mirror not yet, or no contact although the leaf has the
    /// stream.
    Behind,
    /// The leaf has no such stream (yet): nothing to mirror, nothing wrong.
    NoSource,
    /// The leaf does not answer (its uplink is down).
    LeafAway,
}

/// How long a leaf may take to say whether it has a stream.
const LEAF_ASK: Duration = Duration::from_secs(2);

/// Watches each mirror's lag and whether its leaf is reachable, every `every`, until `stop`,
/// and logs each mirror's state when it changes: behind (a warning), its leaf away (a
/// warning), the leaf without that stream (once, informational), in step again.
pub async fn watch_mirrors(
    js: jetstream::Context,
    leaves: Vec<String>,
    streams: Vec<String>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut said: HashMap<String, MirrorState> = HashMap::new();
    loop {
        for leaf in &leaves {
            let leaf_js = jetstream::with_prefix(js.client(), &resources::domain_api_prefix(leaf));
            for s in &streams {
                let Ok(name) = resources::leaf_mirror(s, leaf) else { continue };
                let Ok(mut st) = js.get_stream(&name).await else { continue };
                let Ok(info) = st.info().await else { continue };
                let Some(m) = &info.mirror else { continue };
                let state = if m.lag > 0 {
                    MirrorState::Behind
                } else if m.active.is_none_or(|a| a > Duration::from_secs(30)) {
                    match tokio::time::timeout(LEAF_ASK, leaf_js.get_stream(s)).await {
                        Ok(Ok(_)) => MirrorState::Behind,
                        Ok(Err(e)) if cim_runtime::provision::stream_not_found(&e) => MirrorState::NoSource,
                        _ => MirrorState::LeafAway,
                    }
                } else {
                    MirrorState::InStep
                };
                let before = said.insert(name.clone(), state);
                if before == Some(state) {
                    continue;
                }
                match state {
                    MirrorState::Behind => {
                        tracing::warn!(mirror = %name, leaf = %leaf, lag = m.lag, last_contact_ago = ?m.active, "leaf mirror is behind")
                    }
                    MirrorState::LeafAway => {
                        tracing::warn!(mirror = %name, leaf = %leaf, "leaf does not answer; its mirror waits for the uplink")
                    }
                    MirrorState::NoSource => {
                        tracing::info!(mirror = %name, leaf = %leaf, stream = %s, "the leaf has no such stream (yet); its mirror waits for it")
                    }
                    MirrorState::InStep if before.is_some() => {
                        tracing::info!(mirror = %name, leaf = %leaf, "leaf mirror in step again")
                    }
                    MirrorState::InStep => tracing::debug!(mirror = %name, leaf = %leaf, "leaf mirror in step"),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
