//! Test and benchmark tooling, behind the `testkit` feature (on by default for
//! development; the production image builds with `--no-default-features`):
//! the contract mock gateway, the Stripe stand-in built from Stripe's
//! documentation, the chaos harness, the benchmark and the demo. Nothing in
//! the product modules may import from here (`tests/it/architecture.rs`).

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod mock_gateway;
pub mod receiver;
pub mod stripe_standin;
