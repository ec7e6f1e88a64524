//! Invocation routing: one subscription per ready WebAssembly version on its invoke subject,
//! and `cim.cmd.plugin.invoke` resolved by name[@version] or capability to local WebAssembly
//! or forwarded to a native plugin; replies carry the micro-protocol error headers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use cim_events::{
    plugin::{self, RUNTIME_NATIVE, RUNTIME_WASM},
    proto::plugin::{InvokeError, InvokeReply, InvokeRequest, PluginInfo, Status},
};
use cim_runtime::{Reply, ServiceError};
use futures::StreamExt;
use prost::Message as _;

use crate::{
    host::{Host, Target},
    queries::compare_versions,
    sandbox::Compiled,
};

impl Host {
    /// Serves one ready version on its own invoke subject.
    pub(crate) async fn serve(
        self: &Arc<Self>,
        compiled: Arc<Compiled>,
        info: PluginInfo,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let group = plugin::queue_group(&info.name, &info.version)?;
        let mut sub = self.ctx.client().queue_subscribe(info.subject.clone(), group).await?;
        let host = self.clone();
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let (host, compiled, info) = (host.clone(), compiled.clone(), info.clone());
                tokio::spawn(async move {
                    let reply = match decode_request(&msg) {
                        Ok(req) => host.run_local(compiled, &info, req).await,
                        Err(r) => r,
                    };
                    if let Some(to) = msg.reply {
                        let (headers, body) = encode_reply(&reply);
                        if let Err(e) = host.ctx.client().publish_with_headers(to, headers, body).await {
                            tracing::warn!(error = %e, "could not send an invocation reply");
                        }
                    }
                });
            }
        }))
    }

    async fn run_local(&self, compiled: Arc<Compiled>, info: &PluginInfo, req: InvokeRequest) -> InvokeReply {
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(u64::from(req.timeout_ms)));
        let outcome = self.invoker.run(compiled, Bytes::from(req.input), req.metadata, timeout).await;
        InvokeReply {
            status: outcome.status as i32,
            output: outcome.output,
            metadata: outcome.metadata.into_iter().collect(),
            error: (outcome.status != Status::Ok)
                .then_some(InvokeError { status: outcome.status as i32, message: outcome.message }),
            plugin: info.name.clone(),
            version: info.version.clone(),
            digest: info.digest.clone(),
            runtime: RUNTIME_WASM.to_string(),
            duration_us: outcome.duration.as_micros() as u64,
            fuel_used: outcome.fuel_used,
        }
    }

    /// `cim.cmd.plugin.invoke`: resolve by name[@version] or capability, then run locally or
    /// forward to the native plugin.
    pub async fn route(&self, msg: Message) -> Result<Reply, ServiceError> {
        let req = match decode_request(&msg) {
            Ok(r) => r,
            Err(reply) => return Ok(reply_of(&reply)),
        };
        let reply = match self.resolve(&req) {
            Err(reply) => reply,
            Ok(Target::Local(compiled, info)) => self.run_local(compiled, &info, req).await,
            Ok(Target::Native(info)) => self.forward(&info, req).await,
        };
        Ok(reply_of(&reply))
    }

    // The error is the reply to send, as it is: boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    fn resolve(&self, req: &InvokeRequest) -> Result<Target, InvokeReply> {
        let c = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let wasm = c.versions.values().filter(|e| e.compiled.is_some()).map(|e| e.info.clone());
        let candidates: Vec<PluginInfo> = if !req.plugin.is_empty() {
            if plugin::validate_name(&req.plugin).is_err()
                || (!req.version.is_empty() && plugin::validate_version(&req.version).is_err())
            {
                return Err(failure(
                    Status::BadRequest,
                    format!("invalid plugin reference {:?}", plugin::reference(&req.plugin, &req.version)),
                ));
            }
            // A version that exists but failed to load is unavailable, not missing.
            if let Some(e) = c.versions.get(&(req.plugin.clone(), req.version.clone()))
                && e.compiled.is_none()
            {
                return Err(failure(
                    Status::Unavailable,
                    format!("{} is not loaded: {}", plugin::reference(&req.plugin, &req.version), e.info.state),
                ));
            }
            wasm.chain(Self::live_natives(&c))
                .filter(|p| p.name == req.plugin && (req.version.is_empty() || p.version == req.version))
                .collect()
        } else if !req.capability.is_empty() {
            wasm.chain(Self::live_natives(&c)).filter(|p| p.capabilities.contains(&req.capability)).collect()
        } else {
            return Err(failure(Status::BadRequest, "an invocation names a plugin or a capability".into()));
        };
        // Newest version first; at equal versions, local WebAssembly before a network hop.
        let best = candidates.into_iter().max_by(|a, b| {
            compare_versions(&a.version, &b.version)
                .then_with(|| (a.runtime == RUNTIME_WASM).cmp(&(b.runtime == RUNTIME_WASM)))
        });
        let Some(best) = best else {
            let what = if req.plugin.is_empty() {
                format!("no plugin has the capability {:?}", req.capability)
            } else if req.version.is_empty() {
                format!("no plugin {:?}", req.plugin)
            } else {
                format!("no plugin {}", plugin::reference(&req.plugin, &req.version))
            };
            return Err(failure(Status::NotFound, what));
        };
        if best.runtime == RUNTIME_NATIVE {
            return Ok(Target::Native(best));
        }
        match c.versions.get(&(best.name.clone(), best.version.clone())).and_then(|e| e.compiled.clone()) {
            Some(compiled) => Ok(Target::Local(compiled, best)),
            None => Err(failure(
                Status::Unavailable,
                format!("{} is not loaded", plugin::reference(&best.name, &best.version)),
            )),
        }
    }

    async fn forward(&self, info: &PluginInfo, req: InvokeRequest) -> InvokeReply {
        let timeout = if req.timeout_ms > 0 {
            Duration::from_millis(u64::from(req.timeout_ms))
        } else {
            self.sandbox.policy().max_timeout
        };
        let started = Instant::now();
        let request = self.ctx.client().request(info.subject.clone(), Bytes::from(req.encode_to_vec()));
        let mut reply = match tokio::time::timeout(timeout + Duration::from_millis(500), request).await {
            Err(_) => failure(
                Status::DeadlineExceeded,
                format!(
                    "native plugin {} did not answer within {timeout:?}",
                    plugin::reference(&info.name, &info.version)
                ),
            ),
            Ok(Err(e)) => failure(
                Status::Unavailable,
                format!("native plugin {} cannot be reached: {e}", plugin::reference(&info.name, &info.version)),
            ),
            Ok(Ok(m)) => match InvokeReply::decode(m.payload.clone()) {
                Ok(r) if Status::try_from(r.status).is_ok_and(|s| s != Status::Unspecified) => r,
                _ => failure(
                    Status::MalformedOutput,
                    format!(
                        "native plugin {} replied with something that is not an invoke reply",
                        plugin::reference(&info.name, &info.version)
                    ),
                ),
            },
        };
        if reply.plugin.is_empty() {
            reply.plugin = info.name.clone();
            reply.version = info.version.clone();
            reply.digest = info.digest.clone();
        }
        reply.runtime = RUNTIME_NATIVE.to_string();
        if reply.duration_us == 0 {
            reply.duration_us = started.elapsed().as_micros() as u64;
        }
        reply
    }
}

fn failure(status: Status, message: String) -> InvokeReply {
    InvokeReply {
        status: status as i32,
        error: Some(InvokeError { status: status as i32, message }),
        ..Default::default()
    }
}

// The error is the reply to send, as it is: boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn decode_request(msg: &Message) -> Result<InvokeRequest, InvokeReply> {
    InvokeRequest::decode(msg.payload.clone())
        .map_err(|e| failure(Status::BadRequest, format!("undecodable invoke request: {e}")))
}

/// The micro-protocol error code that goes with a status (so generic NATS tools see failures).
pub fn error_code(status: Status) -> Option<u16> {
    match status {
        Status::Ok => None,
        Status::BadRequest | Status::InvalidInput => Some(400),
        Status::NotFound => Some(404),
        Status::Unavailable => Some(503),
        Status::DeadlineExceeded => Some(504),
        _ => Some(500),
    }
}

fn error_headers(reply: &InvokeReply) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let status = Status::try_from(reply.status).unwrap_or(Status::Unspecified);
    if let Some(code) = error_code(status) {
        let message = reply.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
        headers.insert("Nats-Service-Error-Code", code.to_string().as_str());
        headers.insert("Nats-Service-Error", message.replace(['\r', '\n'], " ").as_str());
    }
    headers
}

fn encode_reply(reply: &InvokeReply) -> (HeaderMap, Bytes) {
    (error_headers(reply), Bytes::from(reply.encode_to_vec()))
}

fn reply_of(reply: &InvokeReply) -> Reply {
    let (headers, body) = encode_reply(reply);
    Reply { headers, body }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::digest;

    #[test]
    fn statuses_map_to_error_codes() {
        assert_eq!(error_code(Status::Ok), None);
        assert_eq!(error_code(Status::NotFound), Some(404));
        assert_eq!(error_code(Status::Unavailable), Some(503));
        assert_eq!(error_code(Status::Trapped), Some(500));
        assert_eq!(digest(b"").len(), "sha256:".len() + 64);
    }
}
