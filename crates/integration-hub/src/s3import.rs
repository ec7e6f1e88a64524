//! The S3 import connector: new objects of a bucket become information units. The objects
//! already imported are the connector's `S3ObjectImported` events (replayed at start); every
//! poll lists the bucket and imports what is new, oldest key first. An import is idempotent
//! (the unit's request id and the event's `Nats-Msg-Id` derive from the key), so a crash
//! between unit and event repeats nothing.
//!
//! The bucket is read with the archive's S3 client (`cim_archive::s3`, aws-sdk-s3, path-style
//! addressing): ListObjectsV2 (every page) and GetObject, retried with backoff.

use std::{collections::HashSet, time::Duration};

use async_nats::{HeaderMap, jetstream};
use cim_archive::{Credentials, S3Client, Target};
use cim_events::{Envelope, envelope::H_MSG_ID, hub, proto::hub::S3ObjectImported};
use cim_iu_client::IuClient;
use cim_runtime::Ctx;
use futures::StreamExt;
use prost::Message;

use crate::config::S3Import;

/// The client of the connector's bucket (the whole bucket: `prefix` filters the listing).
fn client(s3: &S3Import) -> Result<S3Client, cim_archive::S3Error> {
    S3Client::new(Target {
        name: s3.name.clone(),
        endpoint: s3.endpoint.clone(),
        region: s3.region.clone(),
        bucket: s3.bucket.clone(),
        prefix: String::new(),
        path_style: true,
        credentials: Credentials::new(s3.access_key.clone(), s3.secret_key.clone()),
        signing_key_file: None,
    })
}

pub async fn run(ctx: Ctx, js: jetstream::Context, iu: IuClient, ce_source: String, s3: S3Import) {
    let bucket = match client(&s3) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(connector = %s3.name, error = %e, "cannot build the s3 client");
            return;
        }
    };
    let mut done = loop {
        match imported(&js, &s3.name).await {
            Ok(d) => break d,
            Err(e) => {
                tracing::warn!(connector = %s3.name, error = %e, "cannot replay imported objects; retrying");
                if !ctx.pause(Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    };
    loop {
        match bucket.list(&s3.prefix, None).await {
            Ok(keys) => {
                let new: Vec<String> = keys.into_iter().filter(|k| !done.contains(k)).collect();
                for key in new {
                    if ctx.is_stopping() {
                        return;
                    }
                    match import(&bucket, &js, &iu, &ce_source, &s3, &key).await {
                        Ok(()) => {
                            done.insert(key);
                        }
                        Err(e) => {
                            tracing::warn!(connector = %s3.name, key = %key, error = %e, "object not imported; retried at the next poll");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(connector = %s3.name, error = %e, "cannot list the bucket; retrying"),
        }
        if !ctx.pause(s3.poll).await {
            return;
        }
    }
}

/// Keys already imported, from the connector's events.
async fn imported(js: &jetstream::Context, name: &str) -> anyhow::Result<HashSet<String>> {
    let stream = js.get_stream(cim_events::resources::events_stream(crate::COMPONENT).name).await?;
    let filter = hub::s3_imported(name)?;
    let mut total = 0;
    let mut info = stream.info_with_subjects(&filter).await?;
    while let Some(s) = info.next().await {
        total += s?.1;
    }
    let mut out = HashSet::new();
    if total == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig { filter_subject: filter, ..Default::default() })
        .await?;
    let mut messages = consumer.messages().await?.take(total);
    while let Some(m) = messages.next().await {
        if let Ok(e) = S3ObjectImported::decode(m?.payload.clone()) {
            out.insert(e.key);
        }
    }
    Ok(out)
}

async fn import(
    bucket: &S3Client,
    js: &jetstream::Context,
    iu: &IuClient,
    ce_source: &str,
    s3: &S3Import,
    key: &str,
) -> anyhow::Result<()> {
    let body = bucket.get(key).await?.ok_or_else(|| anyhow::anyhow!("get {key}: no such object"))?;
    let stored = iu.put_bytes(&body).await?;
    let id = hub::s3_import_id(&s3.name, key);
    let mut attributes = std::collections::HashMap::new();
    attributes.insert("hub_s3_bucket".to_string(), s3.bucket.clone());
    attributes.insert("hub_s3_key".to_string(), key.to_string());
    let name = key.rsplit('/').next().unwrap_or(key).to_string();
    let created = iu
        .create(cim_events::proto::iu::CreateUnit {
            header: cim_iu_client::header_with_id(id.clone(), 0),
            cid: stored.cid.clone(),
            media_type: cim_iu_client::guess_media_type(&name).to_string(),
            name,
            unit_type: String::new(),
            tags: s3.tags.clone(),
            attributes,
            links: Vec::new(),
        })
        .await?;
    let event = S3ObjectImported {
        connector: s3.name.clone(),
        bucket: s3.bucket.clone(),
        key: key.to_string(),
        size: body.len() as u64,
        unit_id: created.unit_id.clone(),
        cid: stored.cid,
    };
    let mut headers = HeaderMap::new();
    Envelope::root::<S3ObjectImported>(ce_source.to_string()).write_headers(&mut headers);
    headers.insert(H_MSG_ID, id.as_str());
    js.publish_with_headers(hub::s3_imported(&s3.name)?, headers, event.encode_to_vec().into()).await?.await?;
    tracing::info!(connector = %s3.name, key = %key, unit = %created.unit_id, "object imported");
    Ok(())
}
