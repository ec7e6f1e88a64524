//! Units over `cim-iu-client`: list, get, history, links, tags, new units and versions from a
//! streamed upload (never buffered beyond one chunk, refused beyond the limit), and ranged
//! download.

use std::{collections::HashMap, io, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use cim_events::proto::iu::{CreateUnit, GetUnit, Link, LinkUnit, ListUnits, NewVersion, TagUnit};
use cim_iu_client::{NoProgress, json::ToJson};
use futures::TryStreamExt;
use tokio::io::AsyncRead;

use super::{ApiResult, check_label, check_name, expected_version, json_body, json_response, string, strings, unit_id};
use crate::{AppState, error::ApiError};

pub(super) async fn list_units(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let num = |k: &str| -> Result<i64, ApiError> {
        q.get(k).map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("{k} {v:?} is not a number"))))
    };
    let query = ListUnits {
        unit_type: q.get("type").cloned().unwrap_or_default(),
        tag: q.get("tag").cloned().unwrap_or_default(),
        name_prefix: q.get("name_prefix").cloned().unwrap_or_default(),
        since_ms: num("since_ms")?,
        until_ms: num("until_ms")?,
        page_size: num("page_size")?.clamp(0, 1000) as u32,
        page_token: q.get("page_token").cloned().unwrap_or_default(),
        include_deleted: q.get("include_deleted").is_some_and(|v| v == "true"),
        min_sequence: num("min_sequence")?.max(0) as u64,
    };
    Ok(json_response(StatusCode::OK, s.iu.list(query).await?.to_json()))
}

pub(super) async fn get_unit(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let at_version = q
        .get("at_version")
        .map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("at_version {v:?} is not a number"))))?;
    // Read your writes: what this gateway wrote is asked for anyway; a caller that wrote
    // elsewhere names the sequence its command was answered with.
    let min_sequence = q.get("min_sequence").map_or(Ok(0), |v| {
        v.parse().map_err(|_| ApiError::BadRequest(format!("min_sequence {v:?} is not a number")))
    })?;
    let unit =
        s.iu.get_unit(GetUnit { unit_id: unit_id(&id)?.to_string(), at_version, min_sequence, ..Default::default() })
            .await?;
    Ok(json_response(StatusCode::OK, unit.to_json()))
}

pub(super) async fn history(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(StatusCode::OK, s.iu.history(unit_id(&id)?).await?.to_json()))
}

pub(super) async fn links(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    Ok(json_response(StatusCode::OK, s.iu.links(unit_id(&id)?).await?.to_json()))
}

pub(super) async fn tag(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let v = json_body(body, s.limits.max_json).await?;
    let tags = strings(&v, "tags")?;
    for t in &tags {
        check_label("tag", t)?;
    }
    let r = s.iu.tag(TagUnit { header: cim_iu_client::header(expected_version(&q)?), unit_id: id, tags }).await?;
    Ok(json_response(StatusCode::OK, r.to_json()))
}

pub(super) async fn link(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let v = json_body(body, s.limits.max_json).await?;
    let (kind, target) = (string(&v, "kind")?, string(&v, "target")?);
    check_label("link kind", &kind)?;
    unit_id(&target)?;
    let r =
        s.iu.link(LinkUnit {
            header: cim_iu_client::header(expected_version(&q)?),
            unit_id: id,
            link: Some(Link { kind, target }),
        })
        .await?;
    Ok(json_response(StatusCode::OK, r.to_json()))
}

/// Reads the request body as a stream, failing once more than `limit` bytes arrived.
struct Limited<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Limited<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            self.read += (buf.filled().len() - before) as u64;
            if self.read > self.limit {
                self.exceeded.store(true, std::sync::atomic::Ordering::SeqCst);
                return std::task::Poll::Ready(Err(io::Error::other("upload is larger than the limit")));
            }
        }
        r
    }
}

/// Streams the request body into the content bucket and commits it; nothing is buffered
/// beyond one chunk. Returns the CID.
async fn upload_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    let limit = s.limits.max_upload;
    let too_large = || ApiError::TooLarge(format!("upload is larger than the limit of {limit} bytes"));
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    let stream = body.into_data_stream().map_err(io::Error::other);
    let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader =
        Limited { inner: tokio_util::io::StreamReader::new(stream), read: 0, limit, exceeded: exceeded.clone() };
    match s.iu.put_content(reader, &mut NoProgress).await {
        Ok(c) => Ok(c.cid),
        Err(_) if exceeded.load(std::sync::atomic::Ordering::SeqCst) => Err(too_large()),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn create_unit(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let name = q.get("name").cloned().ok_or_else(|| ApiError::BadRequest("query parameter name is required".into()))?;
    check_name(&name)?;
    let media_type = match q.get("media_type") {
        Some(m) => m.clone(),
        None => headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| cim_iu_client::guess_media_type(std::path::Path::new(&name)).to_string()),
    };
    check_label("media type", &media_type)?;
    let tags: Vec<String> =
        q.get("tags").map(|t| t.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect()).unwrap_or_default();
    for t in &tags {
        check_label("tag", t)?;
    }
    let unit_type = q.get("type").cloned().unwrap_or_default();
    let cid = upload_body(&s, &headers, body).await?;
    let r =
        s.iu.create(CreateUnit {
            header: cim_iu_client::header(0),
            cid,
            name,
            media_type,
            unit_type,
            tags,
            ..Default::default()
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, r.to_json()))
}

pub(super) async fn new_version(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let id = unit_id(&id)?.to_string();
    let name = q.get("name").cloned().unwrap_or_default();
    if !name.is_empty() {
        check_name(&name)?;
    }
    let expected = expected_version(&q)?;
    let cid = upload_body(&s, &headers, body).await?;
    let r =
        s.iu.new_version(NewVersion {
            header: cim_iu_client::header(expected),
            unit_id: id,
            cid,
            name,
            media_type: q.get("media_type").cloned().unwrap_or_default(),
        })
        .await?;
    Ok(json_response(StatusCode::CREATED, r.to_json()))
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`; `end` exclusive.
pub fn parse_range(v: &str, size: u64) -> Result<(u64, u64), ApiError> {
    let bad = || ApiError::RangeNotSatisfiable(format!("range {v:?} is not satisfiable for {size} bytes"), size);
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(ApiError::RangeNotSatisfiable("multiple ranges are not supported".into(), size));
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| bad())?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().map_err(|_| bad())?, size),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a {
                return Err(bad());
            }
            (a, b.saturating_add(1).min(size))
        }
    };
    if start >= size || start >= end {
        return Err(bad());
    }
    Ok((start, end))
}

/// Streams a unit's content (`?version=` for an older one); honours `Range`.
pub(super) async fn download(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult {
    let at_version = q
        .get("version")
        .map_or(Ok(0), |v| v.parse().map_err(|_| ApiError::BadRequest(format!("version {v:?} is not a number"))))?;
    let unit = s.iu.get_unit(GetUnit { unit_id: unit_id(&id)?.to_string(), at_version, ..Default::default() }).await?;
    if unit.cid.is_empty() {
        return Err(ApiError::NotFound(format!("unit {id} has no content")));
    }
    let size = s.iu.content_size(&unit.cid).await?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => Some(parse_range(r, size)?),
        None => None,
    };
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let iu = s.iu.clone();
    let cid = unit.cid.clone();
    tokio::spawn(async move {
        let mut writer = writer;
        if let Err(e) = iu.get_content(&cid, range, &mut writer, &mut NoProgress).await {
            tracing::warn!(cid = %cid, error = %e, "download failed midway");
            // Dropping the writer early ends the body short of its length: the client sees an error.
        }
    });
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, 128 * 1024));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    let media = if unit.media_type.is_empty() { cim_iu_client::OCTET_STREAM } else { &unit.media_type };
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", unit.cid)) {
        h.insert(header::ETAG, v);
    }
    let disposition = format!("attachment; filename=\"{}\"", unit.name.replace(['"', '\\'], "_"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    match range {
        Some((a, b)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{}/{size}", b - 1)) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        None => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), (50, 100));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("items=0-1", 100).is_err());
        assert!(parse_range("bytes=0-1,3-4", 100).is_err());
        // The largest numbers a client can send are refused or clamped, never an overflow.
        assert_eq!(parse_range(&format!("bytes=0-{}", u64::MAX), 100).unwrap(), (0, 100));
        assert!(parse_range(&format!("bytes={}-", u64::MAX), 100).is_err());
        assert!(parse_range(&format!("bytes={0}-{0}", u64::MAX), 100).is_err());
        assert_eq!(parse_range(&format!("bytes=-{}", u64::MAX), 100).unwrap(), (0, 100));
        assert!(parse_range("bytes=99999999999999999999999-", 100).is_err());
    }
}
