//! Every integration test, in one binary (one link instead of one per file).
//! Each file is a module; `cargo nextest run` (scripts/test.sh) runs every
//! test in its own process, so globals (the metrics registry) stay per test.
//! One file alone: `cargo nextest run --test it -E 'test(/^platform::/)'`
//! or `cargo test --test it platform::`.

mod admin;
mod architecture;
mod batch;
mod bench_smoke;
mod browser;
mod chaos;
mod cli;
mod common;
mod deploy;
mod fleet;
mod gateway_kinds;
mod gateways;
mod lease;
mod mock_gateway;
mod model;
mod money;
mod observability;
mod openapi;
mod pipeline;
mod platform;
mod priority;
mod rate_limit;
mod reliability;
mod sentinel;
mod settlement;
mod stripe;
mod webhooks_out;
