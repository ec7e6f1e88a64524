//! Plumbing for running local processes and talking to them: find a usable `nats-server`
//! ([`nats_server`]), pick or reserve a free loopback port ([`port`]), and probe an HTTP endpoint with a
//! plain GET ([`http`]), and tie a child's life to its parent's ([`child`]). Used by `cimctl up` (which starts a whole leaf node) and by
//! `cim-testkit` (which re-exports it for tests); it holds no test code.

pub mod child;
pub mod http;
pub mod nats_server;
pub mod port;

pub use child::die_with_parent;
pub use http::{HttpResponse, http_get};
pub use nats_server::{
    MIN_NATS_SERVER, NATS_SERVER_INSTALL, find_on_path, nats_server_binary, nats_server_version, require_nats_server,
};
pub use port::{ReservedPort, free_port, reserve_port};
