//! The engine's NATS service endpoints (commands and queries, JSON bodies) and their shared
//! request parsing and reply encoding.

use std::sync::Arc;

use async_nats::HeaderMap;
use cim_events::pipeline as pl;
use cim_runtime::{Endpoint, Reply, ServiceError};

use crate::engine::Engine;

pub(crate) fn json_reply<T: serde::Serialize>(v: &T) -> Reply {
    Reply { headers: HeaderMap::new(), body: serde_json::to_vec(v).unwrap_or_default().into() }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(msg: &async_nats::Message) -> Result<T, ServiceError> {
    serde_json::from_slice(&msg.payload)
        .map_err(|e| ServiceError::bad_request(format!("request is not valid JSON for this endpoint: {e}")))
}

pub(crate) fn endpoints(engine: Arc<Engine>) -> anyhow::Result<Vec<Endpoint>> {
    macro_rules! ep {
        ($name:expr, $subject:expr, $method:ident) => {{
            let e = engine.clone();
            Endpoint::new($name, $subject, move |_ctx, msg| {
                let e = e.clone();
                async move { e.$method(msg).await }
            })
        }};
    }
    Ok(vec![
        ep!(pl::cmd::APPLY, pl::command(pl::cmd::APPLY)?, apply),
        ep!(pl::cmd::REMOVE, pl::command(pl::cmd::REMOVE)?, remove),
        ep!(pl::cmd::START, pl::command(pl::cmd::START)?, start),
        ep!(pl::cmd::CANCEL, pl::command(pl::cmd::CANCEL)?, cancel),
        ep!(pl::cmd::RETRY, pl::command(pl::cmd::RETRY)?, retry),
        ep!(pl::qry::LIST, pl::query(pl::qry::LIST)?, list),
        ep!(pl::qry::GET, pl::query(pl::qry::GET)?, get),
        ep!(pl::qry::RUNS, pl::query(pl::qry::RUNS)?, runs),
        ep!(pl::qry::RUN, pl::query(pl::qry::RUN)?, run),
    ])
}
