//! Queries: units (now or at a version), history, listings and their pages, links, attribute
//! validation, unit types and the projection's status — retried, as they change nothing.

use bytes::Bytes;
use cim_events::{
    iu,
    proto::iu::{
        GetHistory, GetLinks, GetType, GetUnit, History, Links, ListUnits, ProjectionStatus, Unit, UnitList, UnitType,
    },
};
use prost::Message;

use crate::{IuClient, IuError, Retry};

impl IuClient {
    /// A unit now (reflecting this client's writes: see [`IuClient::min_sequence`]), at a
    /// version or at a time.
    pub async fn get_unit(&self, mut query: GetUnit) -> Result<Unit, IuError> {
        if query.min_sequence == 0 {
            query.min_sequence = self.min_sequence();
        }
        self.query(iu::qry::GET, &query).await
    }

    /// The current state of a unit.
    pub async fn unit(&self, unit_id: &str) -> Result<Unit, IuError> {
        self.get_unit(GetUnit { unit_id: unit_id.to_string(), ..Default::default() }).await
    }

    pub async fn history(&self, unit_id: &str) -> Result<History, IuError> {
        self.query(iu::qry::HISTORY, &GetHistory { unit_id: unit_id.to_string() }).await
    }

    /// One page of units.
    pub async fn list(&self, mut query: ListUnits) -> Result<UnitList, IuError> {
        if query.min_sequence == 0 {
            query.min_sequence = self.min_sequence();
        }
        self.query(iu::qry::LIST, &query).await
    }

    /// Pages through `query` (from its `page_token`).
    pub fn pages(&self, query: ListUnits) -> UnitPages<'_> {
        UnitPages { client: self, query, done: false }
    }

    /// Every unit matching `query`, all pages.
    pub async fn list_all(&self, query: ListUnits) -> Result<Vec<Unit>, IuError> {
        let mut pages = self.pages(query);
        let mut all = Vec::new();
        while let Some(mut page) = pages.next_page().await? {
            all.append(&mut page);
        }
        Ok(all)
    }

    pub async fn links(&self, unit_id: &str) -> Result<Links, IuError> {
        self.query(iu::qry::LINKS, &GetLinks { unit_id: unit_id.to_string(), min_sequence: self.min_sequence() }).await
    }

    /// Would `attributes` be accepted for `unit_type`? Writes nothing.
    pub async fn validate(
        &self,
        unit_type: &str,
        attributes: std::collections::HashMap<String, String>,
    ) -> Result<cim_events::proto::iu::Validation, IuError> {
        self.query(
            iu::qry::VALIDATE,
            &cim_events::proto::iu::ValidateAttributes { unit_type: unit_type.to_string(), attributes },
        )
        .await
    }

    pub async fn get_type(&self, name: &str) -> Result<UnitType, IuError> {
        self.query(iu::qry::TYPE, &GetType { name: name.to_string() }).await
    }

    /// The projection's progress (the request has an empty body).
    pub async fn status(&self) -> Result<ProjectionStatus, IuError> {
        self.call(iu::query(iu::qry::STATUS), Bytes::new(), self.timeout, Retry::Idempotent).await
    }

    async fn query<Q: Message, R: Message + Default>(&self, endpoint: &str, query: &Q) -> Result<R, IuError> {
        self.call(iu::query(endpoint), query.encode_to_vec().into(), self.timeout, Retry::Idempotent).await
    }
}

/// Pages of a unit listing; see [`IuClient::pages`].
#[derive(Debug)]
pub struct UnitPages<'a> {
    client: &'a IuClient,
    query: ListUnits,
    done: bool,
}

impl UnitPages<'_> {
    /// The next page, or `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Unit>>, IuError> {
        if self.done {
            return Ok(None);
        }
        let page = self.client.list(self.query.clone()).await?;
        if page.next_page_token.is_empty() || page.next_page_token == self.query.page_token {
            self.done = true;
        }
        self.query.page_token = page.next_page_token;
        Ok(Some(page.units))
    }
}
