//! The PostgreSQL connector, both ways:
//! - projection: events matching a filter become rows of a table (`stream`, `seq` primary key,
//!   so a redelivered event is written once), read from a durable consumer and acked only
//!   after the row is committed;
//! - change capture: a trigger on each watched table writes every row change to the
//!   connector's outbox table; the hub moves outbox rows into `TableChanged` events in order
//!   (publish, then delete, in one transaction; `Nats-Msg-Id` drops a repeat).
//!
//! Table names are plain identifiers (checked), never quoted user input.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
};
use cim_events::{Envelope, hub, proto::hub::TableChanged};
use cim_runtime::{Ctx, NewEvent};
use futures::StreamExt;
use prost::Message;

use crate::config::{Deliver, Postgres};

async fn connect(pg: &Postgres) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls).await?;
    let name = pg.name.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(connector = %name, error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Retries `f` until it succeeds or the service stops; a connector outlives database restarts.
async fn wait_retry(ctx: &Ctx, pg: &Postgres, what: &str, e: impl std::fmt::Display) -> bool {
    tracing::warn!(connector = %pg.name, error = %e, "{what} failed; retrying");
    ctx.pause(Duration::from_secs(1)).await
}

/// Events → table rows, until the service stops.
pub async fn project(ctx: Ctx, js: jetstream::Context, pg: Postgres) {
    let Some(p) = pg.project.clone() else { return };
    let opened = ctx
        .retry_until_stopped(&format!("the projection consumer of {}", pg.name), || async {
            let config = pull::Config {
                durable_name: Some(hub::projection_consumer(&pg.name)?),
                filter_subject: p.filter.clone(),
                deliver_policy: match p.deliver {
                    Deliver::New => DeliverPolicy::New,
                    Deliver::All => DeliverPolicy::All,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 256,
                ..Default::default()
            };
            cim_runtime::consumer::durable(&js, &p.stream, config).await
        })
        .await;
    let Some(consumer) = opened else { return };
    'connect: loop {
        let db = match connect(&pg).await {
            Ok(db) => db,
            Err(e) => {
                if !wait_retry(&ctx, &pg, "connecting", e).await {
                    return;
                }
                continue;
            }
        };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {t} (stream text NOT NULL, seq bigint NOT NULL, subject text NOT NULL, \
             type text NOT NULL, event_id text NOT NULL, time text NOT NULL, payload bytea NOT NULL, PRIMARY KEY (stream, seq))",
            t = p.table
        );
        if let Err(e) = db.batch_execute(&create).await {
            if !wait_retry(&ctx, &pg, "creating the projection table", e).await {
                return;
            }
            continue;
        }
        let insert = format!(
            "INSERT INTO {} (stream, seq, subject, type, event_id, time, payload) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            p.table
        );
        loop {
            if ctx.is_stopping() {
                return;
            }
            let batch = tokio::select! {
                _ = ctx.stopping() => return,
                b = consumer.fetch().max_messages(100).expires(Duration::from_secs(1)).messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    if !wait_retry(&ctx, &pg, "fetching events", e).await {
                        return;
                    }
                    continue;
                }
            };
            while let Some(Ok(m)) = batch.next().await {
                let seq = m.info().map(|i| i.stream_sequence as i64).unwrap_or(0);
                let env = m.headers.as_ref().and_then(|h| Envelope::from_headers(h).ok());
                let (kind, id, time) = match &env {
                    Some(e) => (e.kind.clone(), e.id().to_string(), e.time.unix_timestamp().to_string()),
                    None => (String::new(), String::new(), String::new()),
                };
                let r = db
                    .execute(&insert, &[&p.stream, &seq, &m.subject.as_str(), &kind, &id, &time, &m.payload.as_ref()])
                    .await;
                match r {
                    Ok(_) => {
                        let _ = m.double_ack().await;
                    }
                    Err(e) => {
                        // Not written: give it back, and the rest of the batch with it (all
                        // redelivered at once after the delay, not after the ack wait).
                        let _ = m.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        while let Some(Ok(rest)) = batch.next().await {
                            let _ = rest.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                        if !wait_retry(&ctx, &pg, "writing an event row", e).await {
                            return;
                        }
                        continue 'connect;
                    }
                }
            }
        }
    }
}

/// Installs the outbox table, the capture function and one trigger per watched table.
async fn install(db: &tokio_postgres::Client, pg: &Postgres) -> Result<(), tokio_postgres::Error> {
    let outbox = pg.outbox_table();
    let f = format!("{outbox}_capture");
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {outbox} (id bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, row_json text NOT NULL, at timestamptz NOT NULL DEFAULT now());
         CREATE OR REPLACE FUNCTION {f}() RETURNS trigger AS $$
         BEGIN
           INSERT INTO {outbox} (tbl, op, row_json) VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD)::text ELSE to_jsonb(NEW)::text END);
           RETURN NULL;
         END $$ LANGUAGE plpgsql;"
    );
    for t in &pg.watch {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {outbox}_{t} ON {t};
             CREATE TRIGGER {outbox}_{t} AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}();"
        ));
    }
    db.batch_execute(&sql).await
}

/// Outbox rows → `TableChanged` events, in order, until the service stops.
pub async fn capture(ctx: Ctx, js: jetstream::Context, ce_source: String, pg: Postgres) {
    if pg.watch.is_empty() {
        return;
    }
    let outbox = pg.outbox_table();
    let Ok(subject) = hub::table_changed(&pg.name) else { return };
    loop {
        let mut db = match connect(&pg).await {
            Ok(db) => db,
            Err(e) => {
                if !wait_retry(&ctx, &pg, "connecting", e).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = install(&db, &pg).await {
            if !wait_retry(&ctx, &pg, "installing the change capture", e).await {
                return;
            }
            continue;
        }
        loop {
            match move_batch(&mut db, &js, &ce_source, &pg, &outbox, &subject).await {
                Ok(0) => {
                    if !ctx.pause(pg.poll).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !wait_retry(&ctx, &pg, "moving outbox rows", e).await {
                        return;
                    }
                    break;
                }
            }
            if ctx.is_stopping() {
                return;
            }
        }
    }
}

/// One transaction: lock up to 100 outbox rows (other instances skip them), publish each as an
/// event and wait for the acks, delete them, commit. A crash before the commit leaves the rows
/// for the next try, and their repeats are dropped by `Nats-Msg-Id`.
async fn move_batch(
    db: &mut tokio_postgres::Client,
    js: &jetstream::Context,
    ce_source: &str,
    pg: &Postgres,
    outbox: &str,
    subject: &str,
) -> anyhow::Result<usize> {
    let tx = db.transaction().await?;
    let rows = tx
        .query(&format!("SELECT id, tbl, op, row_json FROM {outbox} ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED"), &[])
        .await?;
    let mut moved: Vec<i64> = Vec::with_capacity(rows.len());
    for row in &rows {
        let change = TableChanged {
            connector: pg.name.clone(),
            table: row.get(1),
            op: row.get(2),
            row_json: row.get(3),
            outbox_id: row.get(0),
        };
        let env = Envelope::root::<TableChanged>(ce_source.to_string());
        NewEvent::new(subject.to_string(), &env, change.encode_to_vec())
            .msg_id(&hub::table_changed_msg_id(&pg.name, change.outbox_id))
            .publish(js)
            .await?;
        moved.push(change.outbox_id);
    }
    // Exactly the rows published: not `id <= last`, which would also delete rows this
    // transaction never saw (committed out of id order after the SELECT, or locked by another
    // instance and skipped) without publishing them.
    if !moved.is_empty() {
        tx.execute(&format!("DELETE FROM {outbox} WHERE id = ANY($1)"), &[&moved]).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}
