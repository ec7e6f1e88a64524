//! The retention guard: an archived stream must not let JetStream drop messages on its own
//! (age, count or size limits, discard-old), since they could leave before their archive is
//! verified. A stream configured so is refused with the reason.

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy};

/// Why `config` would let messages leave JetStream unarchived; empty when it is safe.
pub fn violations(config: &Config) -> Vec<String> {
    let mut v = Vec::new();
    let name = &config.name;
    if !config.max_age.is_zero() {
        v.push(format!(
            "stream {name} has max_age {:?}: messages would expire before their archive is verified",
            config.max_age
        ));
    }
    if config.max_messages > 0 {
        v.push(format!("stream {name} has max_msgs {}: old messages would be dropped unarchived", config.max_messages));
    }
    if config.max_bytes > 0 && config.discard == DiscardPolicy::Old {
        v.push(format!(
            "stream {name} has max_bytes {} with discard old: old messages would be dropped unarchived",
            config.max_bytes
        ));
    }
    if config.retention != RetentionPolicy::Limits {
        v.push(format!(
            "stream {name} has {:?} retention: consumed messages would be removed unarchived",
            config.retention
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_events::{Component, Tier, resources};

    #[test]
    fn contract_streams_pass_and_limits_are_refused() {
        for c in Component::ALL {
            for s in resources::streams(c) {
                assert!(violations(&s.config(Tier::Cluster)).is_empty(), "{}", s.name);
            }
        }
        let mut cfg = resources::events_stream(Component::Registry).config(Tier::Leaf);
        cfg.max_age = std::time::Duration::from_secs(3600);
        cfg.max_messages = 10;
        let v = violations(&cfg);
        assert_eq!(v.len(), 2);
        assert!(v[0].contains("max_age 3600s"), "{v:?}");
    }
}
