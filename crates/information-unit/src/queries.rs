//! Queries: a unit (now, at a version or at a time), its history, the list index, its links,
//! attribute validation against a type, and unit types.

use std::collections::BTreeMap;

use async_nats::Message;
use cim_events::{
    iu,
    proto::iu::{
        GetHistory, GetLinks, GetType, GetUnit, History, HistoryEntry, IncomingLink, Links, ListUnits, UnitList,
    },
};
use cim_runtime::{Reply, ServiceError};

use crate::{
    app::{App, decode},
    domain::{self, UnitEvent},
    events::Until,
};

impl App {
    pub async fn get(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetUnit = decode(&msg)?;
        cim_events::token::validate_token("unit id", &q.unit_id)
            .map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let state = match (q.at_version, q.at_time_ms) {
            (0, 0) => self.load_unit_since(&q.unit_id, q.min_sequence).await?,
            (0, t) => self.replay_unit(&q.unit_id, Until::Time(t)).await?,
            (v, _) => self.replay_unit(&q.unit_id, Until::Version(v)).await?,
        };
        let unit = state
            .ok_or_else(|| ServiceError::not_found(format!("unit {} does not exist (at that point)", q.unit_id)))?;
        Ok(Reply::proto(&unit))
    }

    pub async fn history(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetHistory = decode(&msg)?;
        let filter = iu::unit_history(&q.unit_id).map_err(|e| ServiceError::bad_request(e.to_string()))?;
        let events = self.read_events(&filter, Until::Now).await?;
        if events.is_empty() {
            return Err(ServiceError::not_found(format!("unit {} does not exist", q.unit_id)));
        }
        let entries = events
            .into_iter()
            .zip(1..)
            .map(|(e, version)| {
                let summary =
                    UnitEvent::decode(&e.type_name, &e.payload).map(|ev| ev.summary()).unwrap_or_else(|err| err);
                HistoryEntry {
                    version,
                    sequence: e.meta.sequence,
                    event_type: e.type_name,
                    provenance: Some(e.meta.provenance),
                    summary,
                }
            })
            .collect();
        Ok(Reply::proto(&History { entries }))
    }

    pub async fn list(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: ListUnits = decode(&msg)?;
        self.projected_through(q.min_sequence).await?;
        let page: UnitList = self.index.list(&q).map_err(ServiceError::bad_request)?;
        Ok(Reply::proto(&page))
    }

    pub async fn links(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetLinks = decode(&msg)?;
        let unit = self
            .load_unit_since(&q.unit_id, q.min_sequence)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit {} does not exist", q.unit_id)))?;
        self.projected_through(q.min_sequence).await?;
        let incoming =
            self.index.incoming(&q.unit_id).into_iter().map(|(kind, source)| IncomingLink { kind, source }).collect();
        Ok(Reply::proto(&Links { outgoing: unit.links, incoming }))
    }

    /// `cim.qry.iu.validate`: checks attributes against a unit type without writing anything.
    pub async fn validate(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: cim_events::proto::iu::ValidateAttributes = decode(&msg)?;
        let attrs: BTreeMap<String, String> = q.attributes.into_iter().collect();
        let mut problems = Vec::new();
        if let Err(e) = domain::validate_attributes(&attrs) {
            problems.push(e.to_string());
        }
        match self.check_type(&q.unit_type, &attrs).await {
            Ok(()) => {}
            Err(e) if e.code == 400 => problems.push(e.message),
            Err(e) => return Err(e),
        }
        Ok(Reply::proto(&cim_events::proto::iu::Validation { valid: problems.is_empty(), problems }))
    }

    pub async fn get_type(&self, msg: Message) -> Result<Reply, ServiceError> {
        let q: GetType = decode(&msg)?;
        let (_, t) = self
            .load_type(&q.name)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("unit type {} is not registered", q.name)))?;
        Ok(Reply::proto(&t))
    }
}
