//! The one integration-test binary: every module runs against real processes.

mod archive_exact;
mod archive_signals;
mod auth;
mod chaos;
mod cli;
mod common;
mod exactly_once;
mod fixture;
mod gateway;
mod hub;
mod iu;
mod nix;
mod otlp;
mod pipelines;
mod plugins;
mod registry;
mod security;
mod services;
mod storage;
mod up;
