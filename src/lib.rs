//! The payout fleet library: everything that matters lives here; the binaries
//! in `src/bin/` and `workers/` are thin shells around it.
//!
//! The one rule (DESIGN.md): nobody is paid twice, nobody is forgotten.
//! Postgres is the truth, the idempotency key is per payout, every write is
//! fenced by the attempt number of its claim.

pub mod admin;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod cli_admin;
pub mod cli_money;
pub mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod earnings_api;
pub mod gateway;
pub mod lease;
pub mod metrics;
pub mod producer;
pub mod queue;
pub mod reconcile;
pub mod server;
pub mod settlement;
pub mod sync;
pub mod telemetry;
pub mod webhooks;
pub mod worker;
