//! Short retries inside one attempt: exponential backoff with full jitter,
//! capped, honouring Retry-After (built on `backon`). Long retries (minutes to
//! hours) are not here: they are `retrying` rows in Postgres.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use rand::Rng;

use super::{Gateway, Outcome, TransferRequest};
use crate::config::GatewaySettings;

/// The in-attempt retry policy.
#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    /// First delay (before jitter).
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
    /// Calls in all, the first included.
    pub tries: usize,
}

impl BackoffPolicy {
    /// From settings.
    pub fn from_settings(s: &GatewaySettings) -> Self {
        BackoffPolicy {
            base: Duration::from_millis(s.backoff_base_ms),
            cap: Duration::from_millis(s.backoff_cap_ms),
            tries: s.backoff_tries,
        }
    }
}

/// Calls the gateway until it gives a non-retryable answer or the tries run
/// out; returns the last outcome, how many calls were made and the key index
/// the payout must store (each call uses the index the previous one left:
/// after a saved refusal the next call is a new request under the next key).
/// A platform problem ([`Outcome::pauses_fleet`]) is not retried here: the
/// fleet pauses; nor is a call the worker's lease check refused
/// ([`Outcome::is_lease_refusal`]). `on_call` sees each call's outcome and latency (for metrics).
pub async fn call_with_backoff(
    gateway: &dyn Gateway,
    req: &TransferRequest,
    policy: BackoffPolicy,
    on_call: &(dyn Fn(&Outcome, Duration) + Send + Sync),
) -> (Outcome, usize, u32) {
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let key_index = std::sync::atomic::AtomicU32::new(req.key_index);
    let builder = ExponentialBuilder::default()
        .with_min_delay(policy.base)
        .with_max_delay(policy.cap)
        .with_factor(2.0)
        .with_max_times(policy.tries.saturating_sub(1));
    let result = (|| async {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let mut this = req.clone();
        this.key_index = key_index.load(std::sync::atomic::Ordering::Relaxed);
        let keyed = gateway.transfer_keyed(&this).await;
        key_index.store(keyed.key_index, std::sync::atomic::Ordering::Relaxed);
        let outcome = keyed.outcome;
        on_call(&outcome, started.elapsed());
        // A refused start (the lease is short) ends the attempt: no more calls.
        if outcome.is_retryable() && !outcome.pauses_fleet() && !outcome.is_lease_refusal() {
            Err(outcome)
        } else {
            Ok(outcome)
        }
    })
    .retry(builder)
    .sleep(tokio::time::sleep)
    .adjust(|outcome: &Outcome, delay: Option<Duration>| {
        let delay = delay?;
        // Full jitter: uniform in [0, delay]; a Retry-After is a floor.
        let jittered = Duration::from_nanos(rand::rng().random_range(0..=delay.as_nanos() as u64));
        match outcome {
            Outcome::Transient {
                retry_after: Some(ra),
                ..
            } => Some((*ra).max(jittered)),
            _ => Some(jittered),
        }
    })
    .await;
    let n = calls.load(std::sync::atomic::Ordering::Relaxed);
    let k = key_index.load(std::sync::atomic::Ordering::Relaxed);
    match result {
        Ok(o) | Err(o) => (o, n, k),
    }
}
