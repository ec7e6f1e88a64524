//! Leaf → cluster: on the cluster, one R3 mirror per leaf and archived stream
//! (`<STREAM>_FROM_<LEAF>`, named by cim-events) that JetStream keeps in step across the
//! leaf node connection. A mirror keeps the leaf's sequence numbers, so after an uplink
//! outage it catches up from where it stopped: no gap, no duplicate. This module creates
//! the mirrors (configured by `cim_events::resources::leaf_mirror_config`) and watches their
//! lag.

use std::time::Duration;

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

/// Logs each mirror's lag and whether its leaf is reachable, every `every`, until `stop`.
pub async fn watch_mirrors(
    js: jetstream::Context,
    leaves: Vec<String>,
    streams: Vec<String>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for leaf in &leaves {
            for s in &streams {
                let Ok(name) = resources::leaf_mirror(s, leaf) else { continue };
                let Ok(mut st) = js.get_stream(&name).await else { continue };
                let Ok(info) = st.info().await else { continue };
                if let Some(m) = &info.mirror {
                    if m.lag > 0 || m.active.is_none_or(|a| a > Duration::from_secs(30)) {
                        tracing::warn!(mirror = %name, leaf = %leaf, lag = m.lag, last_contact_ago = ?m.active, "leaf mirror is behind");
                    } else {
                        tracing::debug!(mirror = %name, leaf = %leaf, "leaf mirror in step");
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
