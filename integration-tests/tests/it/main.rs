//! The one integration-test binary: every module runs against real processes.

mod auth;
mod cli;
mod common;
mod harness;
mod iu;
mod otlp;
mod services;
mod up;
