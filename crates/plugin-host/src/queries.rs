//! Queries: the list of plugin versions (local and native, filtered by name or capability,
//! ordered by version) and the invoker's statistics.

use async_nats::Message;
use cim_events::proto::plugin::{ListPlugins, ListReply, PluginInfo, StatsReply};
use cim_runtime::{Reply, ServiceError};
use prost::Message as _;

use crate::host::Host;

impl Host {
    pub fn stats(&self) -> StatsReply {
        self.invoker.stats()
    }

    pub async fn list(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q = ListPlugins::decode(msg.payload)
            .map_err(|e| ServiceError::bad_request(format!("undecodable list request: {e}")))?;
        let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let mut plugins: Vec<PluginInfo> =
            c.versions.values().map(|e| e.info.clone()).chain(Self::live_natives(&c)).collect();
        plugins.retain(|p| {
            (q.name.is_empty() || p.name == q.name)
                && (q.capability.is_empty() || p.capabilities.contains(&q.capability))
        });
        plugins.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| compare_versions(&a.version, &b.version))
                .then_with(|| a.runtime.cmp(&b.runtime))
        });
        Ok(Reply::proto(&ListReply { plugins }))
    }
}

/// Orders versions: numeric parts numerically, a pre-release (`-...`) before its release.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |v: &str| {
        let (core, pre) = match v.split_once('-') {
            Some((c, p)) => (c.to_string(), Some(p.to_string())),
            None => (v.split('+').next().unwrap_or(v).to_string(), None),
        };
        (core, pre)
    };
    let (ca, pa) = split(a);
    let (cb, pb) = split(b);
    let part = |x: &str, y: &str| match (x.parse::<u64>(), y.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => x.cmp(y),
    };
    let (mut ia, mut ib) = (ca.split('.'), cb.split('.'));
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => break,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(x), Some(y)) => {
                let o = part(x, y);
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
    match (pa, pb) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (Some(x), Some(y)) => x.cmp(&y),
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering::*;

    use super::*;

    #[test]
    fn versions_order_like_semver() {
        assert_eq!(compare_versions("1.10.0", "1.9.0"), Greater);
        assert_eq!(compare_versions("1.0.0", "1.0.0-rc.1"), Greater);
        assert_eq!(compare_versions("2", "1.9"), Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Less);
        assert_eq!(compare_versions("1.2.3", "1.2.3"), Equal);
    }
}
