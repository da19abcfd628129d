//! The payout fleet library: everything that matters lives here; the binaries
//! in `src/bin/` and `workers/` are thin shells around it.
//!
//! The one rule (DESIGN.md): nobody is paid twice, nobody is forgotten.
//! Postgres is the truth, the idempotency key is per payout, every write is
//! fenced by the attempt number of its claim.

// No unwrap in the product: `expect` with the reason it cannot fail, or a
// proper error. Unit tests may unwrap (clippy.toml `allow-unwrap-in-tests`).
#![warn(clippy::unwrap_used)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod domain;
pub mod gateway;
pub mod lease;
pub mod metrics;
pub mod producer;
pub mod queue;
pub mod server;
pub mod services;
pub mod telemetry;
#[cfg(feature = "testkit")]
#[allow(clippy::disallowed_methods)] // tooling measures and stamps with the wall clock
pub mod testkit;
pub mod worker;
