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
        let started = tokio::time::Instant::now();
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::gateway::{Lookup, LookupError, TransferRecord};

    /// A gateway that answers from a script and notes when (tokio time) each call came.
    #[derive(Debug)]
    struct Scripted {
        answers: Mutex<Vec<Outcome>>,
        at: Mutex<Vec<tokio::time::Instant>>,
    }

    #[async_trait]
    impl Lookup for Scripted {
        async fn lookup(&self, _: &str) -> Result<Vec<TransferRecord>, LookupError> {
            Ok(vec![])
        }
    }

    #[async_trait]
    impl Gateway for Scripted {
        async fn transfer(&self, _: &TransferRequest) -> Outcome {
            self.at.lock().unwrap().push(tokio::time::Instant::now());
            self.answers.lock().unwrap().remove(0)
        }
    }

    fn transient(retry_after: Option<Duration>) -> Outcome {
        Outcome::Transient {
            kind: crate::gateway::TransientKind::Http(503),
            message: String::new(),
            retry_after,
        }
    }

    fn request() -> TransferRequest {
        TransferRequest {
            amount_minor: 100,
            currency: "USD".into(),
            destination: "acct_1".into(),
            reference: "payout_1".into(),
            metadata: Default::default(),
            idempotency_key: "payout_1".into(),
            key_index: 0,
            first_attempt: true,
        }
    }

    const POLICY: BackoffPolicy = BackoffPolicy {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(10),
        tries: 4,
    };

    /// Paused tokio time: the waits are virtual, so the schedule is checked
    /// exactly and the test takes no wall time.
    #[tokio::test(start_paused = true)]
    async fn retries_wait_within_the_jittered_exponential_schedule_and_honour_retry_after() {
        let gw = Scripted {
            answers: Mutex::new(vec![
                transient(None),
                transient(Some(Duration::from_secs(7))),
                transient(None),
                Outcome::Paid {
                    transfer_id: "tr_1".into(),
                },
            ]),
            at: Mutex::new(vec![]),
        };
        let start = tokio::time::Instant::now();
        let (outcome, calls, _) = call_with_backoff(&gw, &request(), POLICY, &|_, _| {}).await;
        assert!(matches!(outcome, Outcome::Paid { .. }), "{outcome:?}");
        assert_eq!(calls, 4);
        let at: Vec<Duration> = gw.at.lock().unwrap().iter().map(|t| *t - start).collect();
        assert_eq!(at[0], Duration::ZERO, "the first call goes at once");
        let waits: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // Full jitter: each wait is at most base * 2^n ...
        assert!(waits[0] <= Duration::from_millis(200), "{waits:?}");
        // ... and a Retry-After is a floor.
        assert!(waits[1] >= Duration::from_secs(7), "{waits:?}");
        assert!(waits[2] <= Duration::from_millis(800), "{waits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_tries_run_out_and_a_platform_problem_is_not_retried() {
        let gw = Scripted {
            answers: Mutex::new((0..4).map(|_| transient(None)).collect()),
            at: Mutex::new(vec![]),
        };
        let (outcome, calls, _) = call_with_backoff(&gw, &request(), POLICY, &|_, _| {}).await;
        assert!(outcome.is_retryable());
        assert_eq!(calls, 4, "tries counts every call, the first included");

        let gw = Scripted {
            answers: Mutex::new(vec![Outcome::Transient {
                kind: crate::gateway::TransientKind::Unauthorized,
                message: String::new(),
                retry_after: None,
            }]),
            at: Mutex::new(vec![]),
        };
        let (_, calls, _) = call_with_backoff(&gw, &request(), POLICY, &|_, _| {}).await;
        assert_eq!(
            calls, 1,
            "a refused key pauses the fleet; it is not retried here"
        );
    }
}
