//! The one integration-test binary: every module runs against real processes.

mod auth;
mod cli;
mod common;
mod harness;
mod iu;
mod nix;
mod otlp;
mod registry;
mod plugins;
mod services;
mod up;
