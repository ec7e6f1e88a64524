//! The engine's NATS service endpoints (commands and queries, JSON bodies).

use std::sync::Arc;

use cim_events::pipeline::{cmd, command, qry, query};
use cim_runtime::{Endpoint, Endpoints};

use crate::engine::Engine;

pub(crate) fn endpoints(engine: Arc<Engine>) -> anyhow::Result<Vec<Endpoint>> {
    Ok(Endpoints::new(engine)
        .add(cmd::APPLY, command(cmd::APPLY)?, |e, m| async move { e.apply(m).await })
        .add(cmd::REMOVE, command(cmd::REMOVE)?, |e, m| async move { e.remove(m).await })
        .add(cmd::START, command(cmd::START)?, |e, m| async move { e.start(m).await })
        .add(cmd::CANCEL, command(cmd::CANCEL)?, |e, m| async move { e.cancel(m).await })
        .add(cmd::RETRY, command(cmd::RETRY)?, |e, m| async move { e.retry(m).await })
        .add(qry::LIST, query(qry::LIST)?, |e, m| async move { e.list(m).await })
        .add(qry::GET, query(qry::GET)?, |e, m| async move { e.get(m).await })
        .add(qry::RUNS, query(qry::RUNS)?, |e, m| async move { e.runs(m).await })
        .add(qry::RUN, query(qry::RUN)?, |e, m| async move { e.run(m).await })
        .build())
}
