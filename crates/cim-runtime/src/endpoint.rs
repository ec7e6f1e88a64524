//! What a service serves: request/reply endpoints, their replies and error replies, and one way
//! to register them over a shared state (`Endpoints`), so a handler is a plain method call.

use std::{future::Future, pin::Pin, sync::Arc};

use async_nats::{HeaderMap, Message};
use bytes::Bytes;

use crate::service::Ctx;

/// An error reply: a code (HTTP-like: 400 bad request, 404, 409 conflict, 500, 503) and a
/// one-line description. Sent with the micro protocol's `Nats-Service-Error(-Code)` headers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct ServiceError {
    pub code: u16,
    pub message: String,
}

impl ServiceError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ServiceError { code: 400, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ServiceError { code: 404, message: message.into() }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        ServiceError { code: 409, message: message.into() }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ServiceError { code: 503, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ServiceError { code: 500, message: message.into() }
    }
}

/// A successful reply.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn proto<M: prost::Message>(m: &M) -> Reply {
        Reply { headers: HeaderMap::new(), body: Bytes::from(m.encode_to_vec()) }
    }

    /// A JSON body (the JSON contracts of the pipeline engine and the hub).
    pub fn json<T: serde::Serialize + ?Sized>(v: &T) -> Reply {
        Reply { headers: HeaderMap::new(), body: serde_json::to_vec(v).unwrap_or_default().into() }
    }
}

/// Decodes a JSON request body; a body that does not fit is a 400 naming what is wrong.
pub fn json_request<T: serde::de::DeserializeOwned>(msg: &Message) -> Result<T, ServiceError> {
    serde_json::from_slice(&msg.payload)
        .map_err(|e| ServiceError::bad_request(format!("request is not valid JSON for this endpoint: {e}")))
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type HandlerFn = Arc<dyn Fn(Ctx, Message) -> BoxFuture<Result<Reply, ServiceError>> + Send + Sync>;

/// A request/reply endpoint a service serves.
pub struct Endpoint {
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) handler: HandlerFn,
}

impl Endpoint {
    /// `name` labels metrics and the micro protocol's stats; `subject` comes from `cim-events`.
    pub fn new<F, Fut>(name: &str, subject: String, handler: F) -> Endpoint
    where
        F: Fn(Ctx, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, ServiceError>> + Send + 'static,
    {
        Endpoint { name: name.to_string(), subject, handler: Arc::new(move |c, m| Box::pin(handler(c, m))) }
    }
}

/// A service's endpoints over one shared state `S` (its `App`, `Engine`, `Host`, …): each
/// handler gets the state and the request, e.g.
/// `.add(cmd::TAG, iu::command(cmd::TAG)?, |app, m| async move { app.tag(m, true).await })`.
pub struct Endpoints<S> {
    state: Arc<S>,
    list: Vec<Endpoint>,
}

impl<S: Send + Sync + 'static> Endpoints<S> {
    pub fn new(state: Arc<S>) -> Self {
        Endpoints { state, list: Vec::new() }
    }

    /// Serves `subject` (built by `cim-events`) under `name` with `handler(state, request)`.
    pub fn add<F, Fut>(mut self, name: &str, subject: String, handler: F) -> Self
    where
        F: Fn(Arc<S>, Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Reply, ServiceError>> + Send + 'static,
    {
        let state = self.state.clone();
        self.list.push(Endpoint::new(name, subject, move |_ctx, m| handler(state.clone(), m)));
        self
    }

    pub fn build(self) -> Vec<Endpoint> {
        self.list
    }
}
