//! The S3 import connector: new objects of a bucket become information units. The objects
//! already imported are the connector's `S3ObjectImported` events (replayed at start); every
//! poll lists the bucket and imports what is new, oldest key first. An import is idempotent
//! (the unit's request id and the event's `Nats-Msg-Id` derive from the key), so a crash
//! between unit and event repeats nothing.
//!
//! The S3 client is minimal: path-style ListObjectsV2 and GetObject signed with AWS SigV4
//! (enough for MinIO, Wasabi, AWS and s3s-fs).

use std::{collections::HashSet, time::Duration};

use async_nats::{HeaderMap, jetstream};
use cim_events::{Envelope, envelope::H_MSG_ID, hub, proto::hub::S3ObjectImported};
use cim_iu_client::IuClient;
use cim_runtime::Ctx;
use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::config::S3Import;

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

pub async fn run(ctx: Ctx, js: jetstream::Context, iu: IuClient, ce_source: String, s3: S3Import) {
    let http = match reqwest::Client::builder().no_proxy().build() {
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
        match list(&http, &s3).await {
            Ok(keys) => {
                let new: Vec<String> = keys.into_iter().filter(|k| !done.contains(k)).collect();
                for key in new {
                    if ctx.is_stopping() {
                        return;
                    }
                    match import(&http, &js, &iu, &ce_source, &s3, &key).await {
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
    http: &reqwest::Client,
    js: &jetstream::Context,
    iu: &IuClient,
    ce_source: &str,
    s3: &S3Import,
    key: &str,
) -> anyhow::Result<()> {
    let resp = send(http, s3, Some(key), &[]).await?;
    anyhow::ensure!(resp.status().is_success(), "get {key}: http status {}", resp.status());
    let body = resp.bytes().await?;
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

/// Every key under the prefix, in key order.
async fn list(http: &reqwest::Client, s3: &S3Import) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut query = vec![("list-type", "2".to_string()), ("prefix", s3.prefix.clone())];
        if let Some(t) = &token {
            query.push(("continuation-token", t.clone()));
        }
        let resp = send(http, s3, None, &query).await?;
        let status = resp.status();
        let body = resp.text().await?;
        anyhow::ensure!(status.is_success(), "list: http status {status}: {}", body.lines().next().unwrap_or(""));
        keys.extend(xml_values(&body, "Key"));
        let truncated = xml_values(&body, "IsTruncated").first().is_some_and(|v| v == "true");
        token = xml_values(&body, "NextContinuationToken").into_iter().next();
        if !truncated || token.is_none() {
            return Ok(keys);
        }
    }
}

async fn send(
    http: &reqwest::Client,
    s3: &S3Import,
    key: Option<&str>,
    query: &[(&str, String)],
) -> anyhow::Result<reqwest::Response> {
    let mut url = reqwest::Url::parse(&s3.endpoint)?;
    let key_path = key.map(|k| format!("/{}", uri_encode(k, false))).unwrap_or_default();
    url.set_path(&format!("/{}{key_path}", uri_encode(&s3.bucket, false)));
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let mut q: Vec<(String, String)> = query.iter().map(|(k, v)| (uri_encode(k, true), uri_encode(v, true))).collect();
    q.sort();
    let canonical_query = q.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let date_time = amz_date(now);
    let date = &date_time[..8];
    let signed_headers = "host;x-amz-content-sha256;x-amz-date";
    let canonical = format!(
        "GET\n{}\n{canonical_query}\nhost:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{date_time}\n\n{signed_headers}\n{EMPTY_SHA256}",
        url.path()
    );
    let scope = format!("{date}/{}/s3/aws4_request", s3.region);
    let to_sign = format!("AWS4-HMAC-SHA256\n{date_time}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
    let mac = |k: &[u8], d: &[u8]| hub::hmac_sha256(k, &[d]);
    let k = mac(format!("AWS4{}", s3.secret_key).as_bytes(), date.as_bytes());
    let k = mac(&k, s3.region.as_bytes());
    let k = mac(&k, b"s3");
    let k = mac(&k, b"aws4_request");
    let signature = hex(&mac(&k, to_sign.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        s3.access_key
    );
    url.set_query(if canonical_query.is_empty() { None } else { Some(&canonical_query) });
    Ok(http
        .get(url)
        .header("x-amz-date", date_time.clone())
        .header("x-amz-content-sha256", EMPTY_SHA256)
        .header("authorization", authorization)
        .timeout(Duration::from_secs(60))
        .send()
        .await?)
}

/// `YYYYMMDDTHHMMSSZ` of a Unix time (civil-from-days, proleptic Gregorian).
fn amz_date(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(
            after[..end]
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        );
        rest = &after[end + close.len()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates() {
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(1_369_353_600), "20130524T000000Z");
        assert_eq!(amz_date(1_709_251_199), "20240229T235959Z");
    }
}
