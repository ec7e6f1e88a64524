//! The in-memory index of unit states for listing, filtering and incoming links: a projection
//! of the KV projection, rebuilt from it at start and kept current by a KV watch.

use std::{collections::BTreeMap, ops::Bound, sync::RwLock};

use cim_events::proto::iu::{ListUnits, Unit, UnitList};

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Default)]
pub struct Index {
    units: RwLock<BTreeMap<String, Unit>>,
    /// The projector's checkpoint as this index last saw it: every event up to it is in the
    /// KV projection and in this index (the checkpoint is written after its batch's states,
    /// and the watch delivers in write order).
    applied: tokio::sync::watch::Sender<u64>,
}

impl Index {
    /// The stream sequence up to which the projection (and this index) is complete.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn set_applied(&self, sequence: u64) {
        self.applied.send_replace(sequence);
    }

    /// Waits until the index is complete up to `sequence`; false when it is not within `wait`.
    pub async fn applied_through(&self, sequence: u64, wait: std::time::Duration) -> bool {
        let mut rx = self.applied.subscribe();
        matches!(tokio::time::timeout(wait, rx.wait_for(|a| *a >= sequence)).await, Ok(Ok(_)))
    }

    pub fn put(&self, unit: Unit) {
        let mut m = self.units.write().unwrap_or_else(|e| e.into_inner());
        match m.get(&unit.unit_id) {
            Some(cur) if cur.version >= unit.version => {}
            _ => {
                m.insert(unit.unit_id.clone(), unit);
            }
        }
    }

    /// One unit's state as the index holds it.
    pub fn get(&self, unit_id: &str) -> Option<Unit> {
        self.units.read().unwrap_or_else(|e| e.into_inner()).get(unit_id).cloned()
    }

    pub fn remove(&self, unit_id: &str) {
        self.units.write().unwrap_or_else(|e| e.into_inner()).remove(unit_id);
    }

    pub fn clear(&self) {
        self.set_applied(0);
        self.units.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.units.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Every unit (for collection rules).
    pub fn snapshot(&self) -> Vec<Unit> {
        self.units.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Links pointing at `unit_id` from live units: (kind, source unit).
    pub fn incoming(&self, unit_id: &str) -> Vec<(String, String)> {
        let m = self.units.read().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|u| !u.deleted)
            .flat_map(|u| u.links.iter().filter(|l| l.target == unit_id).map(|l| (l.kind.clone(), u.unit_id.clone())))
            .collect()
    }

    /// One page of units matching the filter, in creation order (unit ids are UUIDv7). The
    /// page token is the last unit id of the previous page.
    pub fn list(&self, q: &ListUnits) -> Result<UnitList, String> {
        let size = match q.page_size as usize {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => return Err(format!("page_size {n} is above {MAX_PAGE}")),
            n => n,
        };
        if !q.page_token.is_empty() {
            cim_events::token::validate_token("page token", &q.page_token).map_err(|e| e.to_string())?;
        }
        if q.since_ms != 0 && q.until_ms != 0 && q.since_ms > q.until_ms {
            return Err("since is after until".to_string());
        }
        let m = self.units.read().unwrap_or_else(|e| e.into_inner());
        let start = if q.page_token.is_empty() { Bound::Unbounded } else { Bound::Excluded(q.page_token.clone()) };
        let mut units = Vec::new();
        let mut more = false;
        for (_, u) in m.range((start, Bound::Unbounded)) {
            if !matches(u, q) {
                continue;
            }
            if units.len() == size {
                more = true;
                break;
            }
            units.push(u.clone());
        }
        let next_page_token =
            if more { units.last().map(|u| u.unit_id.clone()).unwrap_or_default() } else { String::new() };
        Ok(UnitList { units, next_page_token })
    }
}

fn matches(u: &Unit, q: &ListUnits) -> bool {
    (q.include_deleted || !u.deleted)
        && (q.unit_type.is_empty() || u.unit_type == q.unit_type)
        && (q.tag.is_empty() || u.tags.contains(&q.tag))
        && (q.name_prefix.is_empty() || u.name.starts_with(&q.name_prefix))
        && (q.since_ms == 0 || u.created_ms >= q.since_ms)
        && (q.until_ms == 0 || u.created_ms <= q.until_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_events::proto::iu::Link;

    fn unit(id: &str, name: &str, tags: &[&str], created: i64) -> Unit {
        Unit {
            unit_id: id.into(),
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            created_ms: created,
            version: 1,
            ..Default::default()
        }
    }

    #[test]
    fn filters_and_pages() {
        let ix = Index::default();
        for i in 0..25 {
            ix.put(unit(
                &format!("u{i:03}"),
                if i % 2 == 0 { "even" } else { "odd" },
                if i % 5 == 0 { &["five"] } else { &[] },
                i,
            ));
        }
        let q = ListUnits { name_prefix: "ev".into(), page_size: 5, ..Default::default() };
        let p1 = ix.list(&q).unwrap();
        assert_eq!(p1.units.len(), 5);
        let p2 = ix.list(&ListUnits { page_token: p1.next_page_token.clone(), ..q.clone() }).unwrap();
        let p3 = ix.list(&ListUnits { page_token: p2.next_page_token.clone(), ..q.clone() }).unwrap();
        assert_eq!(p3.units.len(), 3);
        assert!(p3.next_page_token.is_empty());
        assert_eq!(ix.list(&ListUnits { tag: "five".into(), ..Default::default() }).unwrap().units.len(), 5);
        assert_eq!(ix.list(&ListUnits { since_ms: 20, until_ms: 22, ..Default::default() }).unwrap().units.len(), 3);
        assert!(ix.list(&ListUnits { page_size: 5000, ..Default::default() }).is_err());
        assert!(ix.list(&ListUnits { page_token: "a b".into(), ..Default::default() }).is_err());
    }

    #[test]
    fn older_states_never_replace_newer_and_links_come_in() {
        let ix = Index::default();
        let mut a = unit("a", "a", &[], 0);
        a.version = 5;
        a.links = vec![Link { kind: "cites".into(), target: "b".into() }];
        ix.put(a.clone());
        let mut old = a.clone();
        old.version = 3;
        old.links.clear();
        ix.put(old);
        assert_eq!(ix.incoming("b"), vec![("cites".to_string(), "a".to_string())]);
        let mut deleted = a;
        deleted.version = 6;
        deleted.deleted = true;
        ix.put(deleted);
        assert!(ix.incoming("b").is_empty());
        assert!(ix.list(&ListUnits::default()).unwrap().units.is_empty());
        assert_eq!(ix.list(&ListUnits { include_deleted: true, ..Default::default() }).unwrap().units.len(), 1);
    }
}
