//! The gRPC API for programs (tonic), generated from `proto/cim/gateway/v1/gateway.proto`, with
//! server reflection and the standard health service. Same tokens, roles and rate limits as
//! the HTTP API; the token travels as `authorization: Bearer <token>` metadata.

use std::{pin::Pin, sync::Arc};

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use cim_events::{
    Component,
    gateway::{self, role},
    proto::iu::{
        CommandHeader, CommandResult, GetHistory, GetLinks, GetUnit, History, LinkUnit, Links, ListUnits, TagUnit,
        Unit, UnitList,
    },
    resources, subject,
};
use cim_iu_client::NoProgress;
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{AppState, api, auth, error::ApiError};

/// Generated messages, server and client.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("cim.gateway.v1");

    /// The encoded descriptor set (for server reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gateway_descriptor");
}

use proto::{
    DownloadChunk, DownloadRequest, Event, EventsRequest, UploadRequest, WhoAmIReply, WhoAmIRequest,
    gateway_server::{Gateway, GatewayServer},
    upload_request::Part,
};

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let m = e.to_string();
        match e {
            ApiError::BadRequest(_) | ApiError::RangeNotSatisfiable(..) => Status::invalid_argument(m),
            ApiError::Unauthorized(_) => Status::unauthenticated(m),
            ApiError::Forbidden(_) => Status::permission_denied(m),
            ApiError::NotFound(_) => Status::not_found(m),
            ApiError::Conflict(_) => Status::aborted(m),
            ApiError::TooLarge(_) | ApiError::TooManyRequests(..) => Status::resource_exhausted(m),
            ApiError::Unavailable(_) | ApiError::BadGateway(_) => Status::unavailable(m),
            ApiError::Timeout(_) => Status::deadline_exceeded(m),
            ApiError::Internal(_) => Status::internal(m),
        }
    }
}

fn iu_status(e: cim_iu_client::IuError) -> Status {
    ApiError::from(e).into()
}

/// The gRPC service.
#[derive(Clone)]
pub struct GatewayService {
    state: Arc<AppState>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl GatewayService {
    pub fn new(state: Arc<AppState>) -> GatewayService {
        GatewayService { state }
    }

    /// Authenticates the call and checks its role and rate limit.
    async fn caller(&self, md: &tonic::metadata::MetadataMap, needed: &str) -> Result<auth::Caller, Status> {
        let presented =
            md.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).ok_or_else(
                || Status::unauthenticated("missing api token: send `authorization: Bearer <token>` metadata"),
            )?;
        let caller = auth::verify(&self.state.tokens, presented.trim()).await?;
        if gateway::role_rank(&caller.role).unwrap_or(0) < gateway::role_rank(needed).unwrap_or(u8::MAX) {
            return Err(Status::permission_denied(format!(
                "token {} has role {}; this call needs {needed}",
                caller.id, caller.role
            )));
        }
        if let Err(wait) = self.state.limiter.check(&caller.id) {
            return Err(Status::resource_exhausted(format!(
                "rate limit of token {} exceeded; retry in {wait}s",
                caller.id
            )));
        }
        Ok(caller)
    }
}

/// Namespaces the request id a caller chose ([`auth::Caller::own_request_id`]).
fn own_request_id(caller: &auth::Caller, header: &mut Option<CommandHeader>) -> Result<(), Status> {
    let Some(h) = header.as_mut() else { return Ok(()) };
    if h.request_id.is_empty() {
        return Ok(());
    }
    let id = caller.own_request_id(&h.request_id);
    cim_events::iu::request_key(&id).map_err(|e| Status::invalid_argument(format!("request_id: {e}")))?;
    h.request_id = id;
    Ok(())
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIReply>, Status> {
        let c = self.caller(req.metadata(), role::READER).await?;
        Ok(Response::new(WhoAmIReply { id: c.id, name: c.name, role: c.role }))
    }

    async fn list_units(&self, req: Request<ListUnits>) -> Result<Response<UnitList>, Status> {
        self.caller(req.metadata(), role::READER).await?;
        Ok(Response::new(self.state.iu.list(req.into_inner()).await.map_err(iu_status)?))
    }

    async fn get_unit(&self, req: Request<GetUnit>) -> Result<Response<Unit>, Status> {
        self.caller(req.metadata(), role::READER).await?;
        Ok(Response::new(self.state.iu.get_unit(req.into_inner()).await.map_err(iu_status)?))
    }

    async fn history(&self, req: Request<GetHistory>) -> Result<Response<History>, Status> {
        self.caller(req.metadata(), role::READER).await?;
        Ok(Response::new(self.state.iu.history(&req.into_inner().unit_id).await.map_err(iu_status)?))
    }

    async fn links(&self, req: Request<GetLinks>) -> Result<Response<Links>, Status> {
        self.caller(req.metadata(), role::READER).await?;
        Ok(Response::new(self.state.iu.links(&req.into_inner().unit_id).await.map_err(iu_status)?))
    }

    async fn upload(&self, req: Request<Streaming<UploadRequest>>) -> Result<Response<CommandResult>, Status> {
        let caller = self.caller(req.metadata(), role::WRITER).await?;
        let mut parts = req.into_inner();
        let mut unit = match parts.message().await? {
            Some(UploadRequest { part: Some(Part::Unit(u)) }) => u,
            _ => return Err(Status::invalid_argument("the first message of an upload must carry the unit")),
        };
        own_request_id(&caller, &mut unit.header)?;
        api::check_name(&unit.name)?;
        let limit = self.state.limits.max_upload;
        let mut read = 0u64;
        let data = parts.map(move |m| match m {
            Ok(UploadRequest { part: Some(Part::Data(d)) }) => {
                read += d.len() as u64;
                if read > limit {
                    return Err(std::io::Error::other(format!("upload is larger than the limit of {limit} bytes")));
                }
                Ok(bytes::Bytes::from(d))
            }
            Ok(_) => Err(std::io::Error::other("only the first message of an upload may carry the unit")),
            Err(s) => Err(std::io::Error::other(s.message().to_string())),
        });
        let reader = tokio_util::io::StreamReader::new(data);
        let committed = self.state.iu.put_content(reader, &mut NoProgress).await.map_err(iu_status)?;
        unit.cid = committed.cid;
        if unit.media_type.is_empty() {
            unit.media_type = cim_iu_client::guess_media_type(std::path::Path::new(&unit.name)).to_string();
        }
        Ok(Response::new(self.state.iu.create(unit).await.map_err(iu_status)?))
    }

    type DownloadStream = BoxStream<DownloadChunk>;

    async fn download(&self, req: Request<DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        self.caller(req.metadata(), role::READER).await?;
        let r = req.into_inner();
        let unit = self
            .state
            .iu
            .get_unit(GetUnit { unit_id: r.unit_id.clone(), at_version: r.version, ..Default::default() })
            .await
            .map_err(iu_status)?;
        if unit.cid.is_empty() {
            return Err(Status::not_found(format!("unit {} has no content", r.unit_id)));
        }
        let size = self.state.iu.content_size(&unit.cid).await.map_err(iu_status)?;
        let end = if r.length == 0 { size } else { r.offset.saturating_add(r.length).min(size) };
        if r.offset > size || r.offset > end {
            return Err(Status::out_of_range(format!("offset {} is beyond the {size} bytes of the content", r.offset)));
        }
        let (reader, mut writer) = tokio::io::duplex(256 * 1024);
        let (iu, cid) = (self.state.iu.clone(), unit.cid.clone());
        let range = Some((r.offset, end));
        let (err_tx, err_rx) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            if let Err(e) = iu.get_content(&cid, range, &mut writer, &mut NoProgress).await {
                let _ = err_tx.send(iu_status(e));
            }
        });
        let chunks = tokio_util::io::ReaderStream::with_capacity(reader, 128 * 1024)
            .map_ok(|b| DownloadChunk { data: b.to_vec() })
            .map_err(|e| Status::internal(e.to_string()));
        // A failure midway (e.g. corruption) ends the stream with its status.
        let tail = futures::stream::once(async move { err_rx.await.ok() }).filter_map(|s| async move { s.map(Err) });
        Ok(Response::new(Box::pin(chunks.chain(tail))))
    }

    async fn tag(&self, req: Request<TagUnit>) -> Result<Response<CommandResult>, Status> {
        let caller = self.caller(req.metadata(), role::WRITER).await?;
        let mut tag = req.into_inner();
        own_request_id(&caller, &mut tag.header)?;
        Ok(Response::new(self.state.iu.tag(tag).await.map_err(iu_status)?))
    }

    async fn link(&self, req: Request<LinkUnit>) -> Result<Response<CommandResult>, Status> {
        let caller = self.caller(req.metadata(), role::WRITER).await?;
        let mut link = req.into_inner();
        own_request_id(&caller, &mut link.header)?;
        Ok(Response::new(self.state.iu.link(link).await.map_err(iu_status)?))
    }

    type EventsStream = BoxStream<Event>;

    async fn events(&self, req: Request<EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        let caller = self.caller(req.metadata(), role::READER).await?;
        let r = req.into_inner();
        let token = if r.component.is_empty() { "iu" } else { &r.component };
        let component = Component::parse(token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let payloads = caller.sees_payloads_of(component);
        // Held by the stream until it ends or its client leaves.
        let slot = self.state.streams.take(&caller.id).map_err(|max| {
            Status::resource_exhausted(format!(
                "token {} already holds {max} open event streams; close one first",
                caller.id
            ))
        })?;
        let all = subject::events_of(component);
        let filter = if r.filter.is_empty() { all.clone() } else { r.filter.clone() };
        let prefix = all.trim_end_matches('>');
        if !filter.starts_with(prefix) || filter.len() <= prefix.len() {
            return Err(Status::invalid_argument(format!("filter {filter:?} must be a subject under {all}")));
        }
        let name = resources::events_stream(component).name;
        let stream = self
            .state
            .js
            .get_stream(&name)
            .await
            .map_err(|e| Status::unavailable(format!("events stream {name}: {e}")))?;
        let deliver_policy = match r.after {
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq
                    .checked_add(1)
                    .ok_or_else(|| Status::out_of_range(format!("after {seq} is beyond any event")))?,
            },
            None => DeliverPolicy::New,
        };
        let consumer = stream
            .create_consumer(OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
            .await
            .map_err(|e| Status::unavailable(format!("consumer on {name}: {e}")))?;
        let messages = consumer.messages().await.map_err(|e| Status::unavailable(format!("reading {name}: {e}")))?;
        let mut stopping = self.state.stopping.clone();
        let stop = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let events = messages.take_until(stop).map(move |m| {
            let _held = &slot;
            let m = m.map_err(|e| Status::unavailable(e.to_string()))?;
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let h =
                |k: &str| m.headers.as_ref().and_then(|h| h.get(k)).map(|v| v.as_str().to_string()).unwrap_or_default();
            Ok(Event {
                seq,
                subject: m.subject.to_string(),
                r#type: h("ce-type"),
                id: h("ce-id"),
                time: h("ce-time"),
                payload: if payloads { m.payload.to_vec() } else { Vec::new() },
            })
        });
        Ok(Response::new(Box::pin(events)))
    }
}

/// Serves gRPC (the gateway, reflection, health) on `listener` until `ctx` stops.
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener, ctx: cim_runtime::Ctx) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GatewayServer<GatewayService>>().await;
    // Reflection in both versions: v1, and v1alpha for older clients (Python's
    // grpc_reflection, older grpcurl) that speak only that.
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = match (builder().build_v1(), builder().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => (v1, v1alpha),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "grpc reflection cannot start");
            return;
        }
    };
    let shutdown = async move {
        ctx.stopping().await;
        reporter.set_not_serving::<GatewayServer<GatewayService>>().await;
    };
    let result = tonic::transport::Server::builder()
        .add_service(GatewayServer::new(GatewayService::new(state)))
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(health)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "grpc server failed");
    }
}
