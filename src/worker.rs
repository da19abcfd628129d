//! The worker. [`Worker::process`] handles one job — lock, claim, call the
//! gateway with backoff, record the outcome with a fenced write, release —
//! and returns what happened; the apalis worker and the tests both call it.
//! [`run`] is the process: an apalis worker on the Redis queue, restarted
//! under a fresh name whenever apalis-redis gives up on an error; the
//! renewal of every lease it holds (`crate::lease`); and its liveness beat
//! in Redis (`crate::queue::beat`), which the producer watches.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use apalis::prelude::*;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::SharedClock,
    config::{Settings, WorkerSettings},
    db::{
        batch::{Batcher, FinishExtras},
        payouts::{self, Finish},
    },
    domain::PayoutId,
    gateway::{
        AmountError, Gateway, Outcome, RejectReason, TransferRequest,
        backoff::{BackoffPolicy, call_with_backoff},
        guard::{GatewayGuard, GuardSettings},
    },
    lease::{LeaseGated, Leases},
    metrics,
    queue::{PayoutJob, Queue, beat::Beats, lock::Locks},
    server,
};

/// What one job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Recorded with this status.
    Recorded(crate::domain::PayoutStatus),
    /// Acknowledged without an attempt.
    Skipped(SkipReason),
    /// The gateway was called but the fenced write was refused: another worker
    /// took the payout over. Nothing recorded by us.
    StaleFence,
    /// Postgres failed; the lease sweep will bring the payout back.
    InfraError(String),
    /// No gateway call was started (or no further one): the lease this
    /// worker could vouch for had less than the call margin left (renewals
    /// failing, or the payout taken over). The payout was given back to the
    /// queue if Postgres let us; otherwise its lease runs out.
    LeaseRefused,
}

/// Why a job was acknowledged without an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Another worker holds the payout's lock.
    Locked,
    /// The payout is in a status no worker may claim (final, pending, held by a live lease).
    NotClaimable,
    /// No such payout.
    NotFound,
    /// The job payload was not a payout job.
    Malformed,
}

impl SkipReason {
    fn label(&self) -> &'static str {
        match self {
            SkipReason::Locked => "locked",
            SkipReason::NotClaimable => "not_claimable",
            SkipReason::NotFound => "not_found",
            SkipReason::Malformed => "malformed",
        }
    }
}

/// Everything a worker needs to handle a job.
#[derive(Debug)]
pub struct Worker {
    /// The source of truth.
    pub pool: PgPool,
    /// Claims and final writes, grouped into shared statements.
    pub batcher: Batcher,
    /// The gateway.
    pub gateway: Arc<dyn Gateway>,
    /// Rate limit, fleet pause and circuit breaker in front of it.
    pub guard: Arc<GatewayGuard>,
    /// Per-payout locks.
    pub locks: Locks,
    /// The leases this process holds, renewed together; gates every call.
    pub leases: Leases,
    /// Time.
    pub clock: SharedClock,
    /// Leases, attempts, schedule.
    pub settings: WorkerSettings,
    /// In-attempt retries.
    pub backoff: BackoffPolicy,
    /// `worker:<host>-<pid>-<n>`: written as lease owner and event actor.
    pub actor: String,
}

/// The failure code of a payout whose attempts ran out.
pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
/// The failure code of a payout whose amount cannot be sent (no such
/// currency, or not representable in the gateway's minor units).
pub const INVALID_AMOUNT: &str = "invalid_amount";

/// Why a payout failed for good: its `dead_letters` class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Refused for good (by the gateway, or the amount cannot be sent).
    Permanent,
    /// Its attempts ran out ([`ATTEMPTS_EXHAUSTED`]).
    Exhausted,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Permanent => "permanent",
            Failure::Exhausted => "exhausted",
        }
    }
}

/// What the worker records for an attempt, and for a failure why it is
/// final (set exactly when `finish` is [`Finish::Failed`]).
#[derive(Debug)]
struct Decision {
    finish: Finish,
    failure: Option<Failure>,
}

impl Decision {
    fn record(finish: Finish) -> Self {
        Decision {
            finish,
            failure: None,
        }
    }

    fn fail(failure: Failure, code: String, message: String) -> Self {
        Decision {
            finish: Finish::Failed { code, message },
            failure: Some(failure),
        }
    }
}

/// Why the worker could not record an outcome (the lease sweep brings the
/// payout back).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    /// Every try of the fenced write failed.
    #[error("recording the outcome kept failing")]
    KeptFailing,
    /// After a failed try, reading back whether it committed failed.
    #[error(transparent)]
    ReadBack(#[from] sqlx::Error),
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Worker {
    /// Handles one job payload (as delivered by apalis).
    pub async fn handle(&self, payload: &serde_json::Value) -> Step {
        match serde_json::from_value::<PayoutJob>(payload.clone()) {
            Ok(job) => self.process(job.payout_id).await,
            Err(e) => {
                // Log the parse error and, for bytes that were not JSON, their
                // lossy head; never the whole payload.
                let raw = payload
                    .get(crate::queue::UNDECODABLE)
                    .and_then(|v| v.as_str());
                tracing::warn!(error = %format_args!("{e:#}"), not_json = ?raw, "malformed job acknowledged and dropped; no payout touched");
                metrics::JOBS_SKIPPED
                    .with_label_values(&["malformed"])
                    .inc();
                Step::Skipped(SkipReason::Malformed)
            }
        }
    }

    /// Handles the job for payout `id`.
    #[tracing::instrument(name = "payout", skip(self), fields(payout_id = id.get(), attempt = tracing::field::Empty, worker = %self.actor))]
    pub async fn process(&self, id: PayoutId) -> Step {
        PROCESSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::IN_FLIGHT.inc();
        let step = self.process_inner(id).await;
        metrics::IN_FLIGHT.dec();
        if let Step::Skipped(reason) = &step {
            metrics::JOBS_SKIPPED
                .with_label_values(&[reason.label()])
                .inc();
        }
        step
    }

    async fn process_inner(&self, id: PayoutId) -> Step {
        let lock = match self.locks.try_acquire(id.get()).await {
            Ok(Some(guard)) => Some(guard),
            Ok(None) => return Step::Skipped(SkipReason::Locked),
            Err(e) => {
                // The lock is an optimisation; the claim below is the guarantee.
                metrics::INFRA_ERRORS
                    .with_label_values(&["redis_lock"])
                    .inc();
                tracing::warn!(error = %format_args!("{e:#}"), "lock unavailable; relying on the fenced claim");
                None
            }
        };
        let step = self.attempt(id).await;
        if let Some(guard) = lock {
            if let Err(e) = guard.release().await {
                tracing::debug!(error = %format_args!("{e:#}"), "lock release failed; it expires by itself");
            }
        }
        step
    }

    async fn attempt(&self, id: PayoutId) -> Step {
        // An open circuit or a fleet pause holds the job here, before the
        // claim, so no attempt is burned.
        self.guard.wait_closed().await;
        self.guard.wait_unpaused().await;
        let now = self.clock.now();
        let lease_until = now + chrono_dur(Duration::from_secs(self.settings.lease_secs));
        let claimed = match self.batcher.claim(id, &self.actor, now, lease_until).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return match payouts::get(&self.pool, id).await {
                    Ok(Some(_)) => Step::Skipped(SkipReason::NotClaimable),
                    Ok(None) => Step::Skipped(SkipReason::NotFound),
                    Err(e) => self.infra("postgres_claim", e),
                };
            }
            Err(e) => return self.infra("postgres_claim", e),
        };
        metrics::ATTEMPTS.inc();
        let token = claimed.token();
        let payout = &claimed.payout;
        tracing::Span::current().record("attempt", token);
        // Renewed with every other lease of this process until dropped.
        let lease = self.leases.hold(id, token, lease_until);

        // Minor units as the gateway counts them (Stripe differs from ISO for
        // ISK, HUF, TWD and three-decimal currencies): refused here, clearly,
        // rather than sent wrong. The amount itself was decoded by the claim.
        let money = claimed
            .money
            .clone()
            .map_err(AmountError::from)
            .and_then(|m| self.gateway.minor_units(&m).map(|minor| (m, minor)));
        let mut extras = FinishExtras {
            key_index: claimed.key_index,
            refund_attempt: false,
        };
        let decision = match money {
            Err(e) => Decision::fail(Failure::Permanent, INVALID_AMOUNT.into(), e.to_string()),
            Ok((money, amount_minor)) => {
                let req = TransferRequest {
                    amount_minor,
                    currency: money.currency().code().to_string(),
                    destination: claimed.gateway_account.clone(),
                    reference: crate::domain::transfer::idempotency_key(payout.id),
                    metadata: crate::gateway::transfer_metadata(
                        payout.id,
                        claimed.external_ref.as_deref(),
                    ),
                    idempotency_key: payout.idempotency_key(),
                    key_index: claimed.key_index.max(0) as u32,
                    first_attempt: payout.attempt == 1,
                };
                let on_call = |o: &Outcome, took: Duration| {
                    if o.is_guard_refusal() || o.is_lease_refusal() {
                        // Nothing was sent (counted in gateway_throttled_total,
                        // payout_lease_refused_calls_total).
                        return;
                    }
                    metrics::GATEWAY_REQUESTS
                        .with_label_values(&[o.class()])
                        .inc();
                    metrics::GATEWAY_SECONDS
                        .with_label_values(&[o.class()])
                        .observe(took.as_secs_f64());
                };
                // The lease check sits under the guard: right before a request
                // leaves, after any rate-limit wait.
                let gated = LeaseGated::new(self.gateway.as_ref(), &lease);
                let guarded = self.guard.wrap(&gated);
                let (outcome, calls, key_index) =
                    call_with_backoff(&guarded, &req, self.backoff, &on_call).await;
                tracing::debug!(calls, ?outcome, key_index, "gateway answered");
                if outcome.is_lease_refusal() {
                    return self.give_back(id, token, key_index, calls <= 1).await;
                }
                extras.key_index = i32::try_from(key_index).unwrap_or(i32::MAX);
                extras.refund_attempt = outcome.pauses_fleet();
                let unknown = matches!(outcome, Outcome::Unknown { .. });
                let decision =
                    self.decide(payout.attempt - payout.retry_base, claimed.holds, outcome);
                match decision {
                    // The last attempt ended without an answer (a timeout, a
                    // reset): the money may have moved. Ask before failing.
                    Decision {
                        finish: Finish::Failed { code, message },
                        failure: Some(failure),
                    } if unknown => {
                        self.verify_before_failing(&req.reference, failure, code, message)
                            .await
                    }
                    other => other,
                }
            }
        };
        let Decision { finish, failure } = decision;

        let reason = match &finish {
            Finish::Paid { .. } => "gateway paid".to_string(),
            Finish::InTransit { .. } => "gateway accepted; in transit".to_string(),
            Finish::Retrying { code, .. } => format!("transient: {code}"),
            Finish::Failed { code, .. } => format!("failed: {code}"),
            Finish::Held { code, .. } => format!("held: {code}"),
        };
        let recorded = self.record(id, token, &finish, extras, &reason).await;
        match recorded {
            Ok(true) => {
                let status = finish.status();
                let finished_at = self.clock.now();
                metrics::PAYOUTS_FINISHED
                    .with_label_values(&[status.as_str()])
                    .inc();
                metrics::PROCESSING_SECONDS.observe(secs_between(now, finished_at));
                match &finish {
                    Finish::Paid { .. } => {
                        metrics::DUE_TO_PAID_SECONDS
                            .observe(secs_between(payout.due_at, finished_at));
                        if let Ok(money) = &claimed.money {
                            metrics::count_paid_money(money);
                        }
                    }
                    Finish::Failed { code, .. } => {
                        let class = failure.unwrap_or(Failure::Permanent).label();
                        metrics::DEAD_LETTERS.with_label_values(&[class]).inc();
                        tracing::warn!(code, "payout failed");
                    }
                    _ => {}
                }
                Step::Recorded(status)
            }
            Ok(false) => {
                metrics::STALE_FENCE.inc();
                tracing::warn!(
                    token,
                    "outcome refused by the fence: another worker took this payout over"
                );
                Step::StaleFence
            }
            Err(e) => self.infra("postgres_record", e),
        }
    }

    /// What to record for a gateway outcome, given the attempts used so far
    /// and how often the payout was held before.
    fn decide(&self, used: i32, holds: i32, outcome: Outcome) -> Decision {
        match outcome {
            Outcome::Paid { transfer_id } => Decision::record(Finish::Paid { transfer_id }),
            Outcome::InTransit { transfer_id } => {
                Decision::record(Finish::InTransit { transfer_id })
            }
            // Not the payee's failure: the account cannot receive money yet.
            // Held (no budget spent) until `account.updated` or the poll sees
            // it ready; held too often, it fails with its code.
            Outcome::Rejected {
                reason: reason @ RejectReason::NotOnboarded,
                message,
            } => {
                let max = self.settings.max_holds.max(1);
                let code = reason.code().to_string();
                if holds >= max {
                    Decision::fail(
                        Failure::Permanent,
                        code,
                        format!("held {holds} times, still not onboarded; last: {message}"),
                    )
                } else {
                    Decision::record(Finish::Held { code, message })
                }
            }
            // A platform problem (credentials, platform balance): the fleet
            // is paused; the payout waits it out without spending its budget.
            Outcome::Transient { kind, message, .. } if kind.is_platform_problem() => {
                Decision::record(Finish::Retrying {
                    next_attempt_at: self.clock.now() + chrono_dur(self.guard.platform_pause()),
                    code: kind.code().into_owned(),
                    message,
                })
            }
            Outcome::Rejected { reason, message } => {
                Decision::fail(Failure::Permanent, reason.code().to_string(), message)
            }
            Outcome::Transient { kind, message, .. } => {
                self.retry_or_fail(used, kind.code().into_owned(), message)
            }
            Outcome::Unknown { message } => self.retry_or_fail(used, "unknown".into(), message),
        }
    }

    /// Before recording `attempts_exhausted` after an unanswered last call:
    /// looks the payout up by its reference. A transfer the gateway holds
    /// (paid or pending) is recorded as such, never failed; a failed look-up
    /// keeps the failure but says it is unverified (reconciliation's
    /// `paid_at_gateway_not_in_db` catches the rest).
    async fn verify_before_failing(
        &self,
        reference: &str,
        failure: Failure,
        code: String,
        message: String,
    ) -> Decision {
        match self.gateway.lookup(reference).await {
            Ok(found) => {
                // Read the records as the in-transit poll does (sync::verdict).
                let verdicts: Vec<_> = found
                    .iter()
                    .map(|t| (t, crate::domain::transfer::verdict(&t.status)))
                    .collect();
                let moved = verdicts
                    .iter()
                    .find(|(_, v)| *v == Some(crate::domain::PayoutStatus::Paid))
                    .map(|(t, _)| Finish::Paid {
                        transfer_id: t.id.clone(),
                    })
                    .or_else(|| {
                        verdicts
                            .iter()
                            .find(|(_, v)| *v != Some(crate::domain::PayoutStatus::Failed))
                            .map(|(t, _)| Finish::InTransit {
                                transfer_id: t.id.clone(),
                            })
                    });
                match moved {
                    Some(f) => {
                        tracing::warn!(reference, outcome = ?f, "last attempt went unanswered but the gateway holds the transfer; recorded as such");
                        Decision::record(f)
                    }
                    None => Decision::fail(failure, code, message),
                }
            }
            Err(e) => Decision::fail(failure, code, format!("{message}; unverified: {e}")),
        }
    }

    fn retry_or_fail(&self, used: i32, code: String, message: String) -> Decision {
        if used >= self.settings.max_attempts {
            Decision::fail(
                Failure::Exhausted,
                ATTEMPTS_EXHAUSTED.into(),
                format!("{used} attempts; last: {code}: {message}"),
            )
        } else {
            let next = self.clock.now() + chrono_dur(self.settings.retry_delay(used));
            Decision::record(Finish::Retrying {
                next_attempt_at: next,
                code,
                message,
            })
        }
    }

    /// The fenced write, retried briefly: after the gateway answered, the answer
    /// is worth a few tries to keep (if they all fail, the lease expires and the
    /// next attempt learns the same answer from the gateway by the same key).
    async fn record(
        &self,
        id: PayoutId,
        token: i32,
        finish: &Finish,
        extras: FinishExtras,
        reason: &str,
    ) -> Result<bool, RecordError> {
        let mut delay = Duration::from_millis(50);
        let mut failed_before = false;
        for _ in 0..6 {
            let now = self.clock.now();
            match self
                .batcher
                .finish_with(id, token, finish, extras, &self.actor, reason, now)
                .await
            {
                Ok(true) => return Ok(true),
                Ok(false) if failed_before => {
                    // An earlier try may have committed and lost only its answer.
                    let row = payouts::get(&self.pool, id).await?;
                    return Ok(
                        row.is_some_and(|p| p.attempt == token && p.status == finish.status())
                    );
                }
                Ok(false) => return Ok(false),
                Err(e) => {
                    tracing::warn!(error = %format_args!("{e:#}"), "recording the outcome failed; retrying");
                    failed_before = true;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        Err(RecordError::KeptFailing)
    }

    /// The lease was too short to start a gateway call: gives the payout
    /// back to the queue (fenced by `token`, within one renewal interval)
    /// instead of calling; if Postgres does not answer, its lease runs out.
    /// Whatever an earlier call of this attempt did, the next attempt sends
    /// the same key (`key_index` is kept) and learns it from the gateway.
    async fn give_back(
        &self,
        id: PayoutId,
        token: i32,
        key_index: u32,
        nothing_sent: bool,
    ) -> Step {
        let within = Duration::from_millis(self.settings.renew_every_ms);
        let release = payouts::release(
            &self.pool,
            id,
            token,
            i32::try_from(key_index).unwrap_or(i32::MAX),
            nothing_sent,
            &self.actor,
            "released: lease too short to call the gateway",
            self.clock.now(),
        );
        match tokio::time::timeout(within, release).await {
            Ok(Ok(true)) => tracing::info!(
                token,
                "lease too short to call the gateway: payout given back to the queue"
            ),
            Ok(Ok(false)) => tracing::info!(
                token,
                "lease too short to call the gateway: the payout was already taken over"
            ),
            Ok(Err(e)) => tracing::warn!(
                error = ?e,
                token,
                "lease too short to call the gateway, and the release failed: the lease runs out"
            ),
            Err(_) => tracing::warn!(
                token,
                ?within,
                "lease too short to call the gateway, and Postgres did not answer the release: the lease runs out"
            ),
        }
        Step::LeaseRefused
    }

    fn infra(&self, component: &str, e: impl std::fmt::Display) -> Step {
        metrics::INFRA_ERRORS.with_label_values(&[component]).inc();
        tracing::warn!(error = %format_args!("{e:#}"), component, "infrastructure error; the lease sweep will retry this payout");
        Step::InfraError(e.to_string())
    }
}

fn secs_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A process-unique worker name: host, pid, and a start counter, so a
/// restarted apalis worker never collides with its own earlier registration
/// (apalis-redis refuses a name it saw alive within the orphan threshold).
pub fn worker_name() -> String {
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", worker_name_stem())
}

fn worker_name_stem() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

/// Every apalis worker name [`worker_name`] has given out in this process.
pub fn worker_names_given() -> Vec<String> {
    let stem = worker_name_stem();
    (0..STARTS.load(std::sync::atomic::Ordering::Relaxed))
        .map(|n| format!("{stem}-{n}"))
        .collect()
}

async fn apalis_handler(
    job: serde_json::Value,
    worker: Data<Arc<Worker>>,
) -> Result<(), BoxDynError> {
    // Always acknowledge: retries live in Postgres, not in apalis (whose
    // storage ignores max_attempts and would re-run a failed job 25 times).
    // The job runs on its own task so jobs spread over the runtime's threads.
    let worker = Arc::clone(&worker);
    tokio::spawn(async move { worker.handle(&job).await }).await?;
    Ok(())
}

/// Runs apalis workers on `queue` until `shutdown`; each time apalis-redis
/// ends a worker with an error (Redis restarted, flushed, timed out) a new
/// one starts under a fresh name after a short pause.
pub async fn run_consumer(
    worker: Arc<Worker>,
    queue: Queue,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    let mut pause = Duration::from_millis(100);
    let mut restarts: u64 = 0;
    while !shutdown.is_cancelled() {
        let name = worker_name();
        let backend = queue
            .storage()
            .with_codec(crate::queue::LenientJson)
            .poll_with_strategy(IntervalStrategy::new(Duration::from_millis(
                settings.poll_interval_ms,
            )));
        let apalis_worker = WorkerBuilder::new(name.clone())
            .backend(backend)
            .data(worker.clone())
            .concurrency(settings.concurrency)
            .build(apalis_handler);
        let stop = shutdown.clone();
        let run = apalis_worker.run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        });
        let stale_after = Duration::from_secs(settings.heartbeat_secs * 4 + 2);
        let watchdog = heartbeat_stalled(&queue, &name, stale_after);
        tokio::select! {
            result = run => match result {
                Ok(()) if shutdown.is_cancelled() => break,
                Ok(()) => tracing::warn!(worker = %name, "apalis worker ended; restarting"),
                Err(e) => {
                    tracing::warn!(worker = %name, error = %format_args!("{e:#}"), "apalis worker failed; restarting")
                }
            },
            // Dropping the stalled worker's future is safe: each job runs on its
            // own task and finishes; its unacknowledged jobs come back as orphans.
            () = watchdog => tracing::warn!(
                worker = %name,
                ?stale_after,
                "apalis worker stopped heartbeating without an error; restarting under a new name"
            ),
        }
        metrics::WORKER_RESTARTS.inc();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        restarts += 1;
        pause = if restarts % 8 == 0 {
            Duration::from_millis(100)
        } else {
            (pause * 2).min(Duration::from_secs(2))
        };
    }
}

/// Resolves when the apalis worker `name` has stopped heartbeating: its score
/// in the queue's workers set is older than `stale_after`, or it vanished after
/// being seen. apalis-redis 1.0 can stop polling its backend for good after a
/// Redis stall shorter than the client's response timeout, with no error to
/// end the worker (the chaos suite's S8); this is how such a worker is noticed.
/// Redis errors are ignored here: a Redis that cannot answer ends the worker
/// by itself.
async fn heartbeat_stalled(queue: &Queue, name: &str, stale_after: Duration) {
    let mut conn = queue.conn();
    let key = queue.config().workers_set();
    let mut seen = false;
    loop {
        tokio::time::sleep(stale_after / 4).await;
        let score: redis::RedisResult<Option<f64>> = redis::cmd("ZSCORE")
            .arg(&key)
            .arg(name)
            .query_async(&mut conn)
            .await;
        let now =
            crate::clock::Clock::now(&crate::clock::SystemClock).timestamp_micros() as f64 / 1e6;
        match score {
            Ok(Some(at)) => {
                seen = true;
                if now - at > stale_after.as_secs_f64() {
                    return;
                }
            }
            Ok(None) if seen => return,
            Ok(None) | Err(_) => {}
        }
    }
}

/// Writes this process's liveness beat every `every` until `stop`. A beat
/// that fails is only logged (once per outage): the producer may then
/// release this worker's payouts, the renewal finds them gone, and the
/// fence refuses any late write.
async fn beat_loop(beats: Beats, owner: String, every: Duration, stop: CancellationToken) {
    let mut failing = false;
    loop {
        match beats.beat(&owner).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("liveness beat written again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = ?e, "liveness beat failed; the producer may release this worker's payouts (the fence protects them)");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// At a shutdown whose deadline ran out: gives every payout still held
/// back to the queue (fenced, one by one), so other workers take them at
/// once instead of after the lease; no call starts for them here any more.
/// Returns how many were given back.
async fn give_back_held(worker: &Worker) -> usize {
    let held = worker.leases.forfeit_all();
    let mut n = 0;
    for (id, token) in held {
        let release = payouts::release(
            &worker.pool,
            id,
            token,
            0,
            false,
            &worker.actor,
            "released: worker shutting down",
            worker.clock.now(),
        );
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(true)) => n += 1,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = ?e, payout_id = id.get(), "release at shutdown failed; the lease runs out")
            }
            Err(_) => tracing::warn!(
                payout_id = id.get(),
                "release at shutdown timed out; the lease runs out"
            ),
        }
    }
    n
}

/// Payout jobs this process has started handling (the webhook deliverer
/// yields while it moves: `webhooks_out.yield_secs`).
static PROCESSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many payout jobs this process has started handling.
pub fn processed() -> u64 {
    PROCESSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The `payout-worker` process: health and metrics server, the consumer, and
/// a graceful stop on `shutdown` within `worker.shutdown_deadline_secs`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics::init();
    let pool = crate::db::connect(&settings.database).await?;
    let master =
        crate::queue::sentinel::MasterWatch::start(&settings.redis, shutdown.clone()).await?;
    let conn = crate::queue::connect(&settings.redis).await?;
    let queue = Queue::from_settings(conn.clone(), &settings);
    let gateway: Arc<dyn Gateway> =
        crate::gateway::select::build(&settings.gateway).context("gateway client")?;
    let guard = Arc::new(GatewayGuard::new(
        conn.clone(),
        &settings.redis.prefix,
        GuardSettings::from_settings(&settings.gateway),
    ));
    // Every request of a self-limiting client (Stripe) counts fleet-wide.
    gateway.use_limiter(guard.limiter());
    let clock = crate::clock::system();
    let actor = format!("worker:{}", worker_name());
    let leases = Leases::from_settings(pool.clone(), &actor, clock.clone(), &settings);
    let worker = Arc::new(Worker {
        pool: pool.clone(),
        batcher: Batcher::spawn(pool.clone(), settings.worker.db_batch),
        gateway,
        guard,
        locks: Locks::new(
            conn.clone(),
            &settings.redis.prefix,
            Duration::from_millis(settings.worker.lock_ttl_ms),
        ),
        leases,
        clock,
        settings: settings.worker.clone(),
        backoff: BackoffPolicy::from_settings(&settings.gateway),
        actor: actor.clone(),
    });
    let beats = Beats::new(conn.clone(), &settings.redis.prefix);
    let beat_stop = CancellationToken::new();
    tokio::spawn(beat_loop(
        beats.clone(),
        actor.clone(),
        Duration::from_millis(settings.worker.beat_ms),
        beat_stop.clone(),
    ));
    let http = server::spawn(settings.worker.listen, pool.clone(), conn, shutdown.clone()).await?;
    tracing::info!(addr = %http, actor = %worker.actor, concurrency = settings.worker.concurrency, "worker started");
    metrics::WORKER_UP.set(1);

    // Outbound webhooks (and email to payees): every worker runs the loop,
    // the lease holder delivers.
    let hooks_stop = CancellationToken::new();
    let hooks = if settings.webhooks_out.enabled {
        let d = crate::services::webhooks_out::Dispatcher::new(
            pool.clone(),
            settings.webhooks_out.clone(),
            worker.clock.clone(),
            &actor,
        )?
        .with_email(&settings.email)?
        .yielding_to(Arc::new(processed));
        Some(tokio::spawn(crate::services::webhooks_out::run(
            d,
            hooks_stop.clone(),
        )))
    } else {
        None
    };
    let consumer_stop = CancellationToken::new();
    let consumer = tokio::spawn(run_consumer(
        worker.clone(),
        queue.clone(),
        settings.worker.clone(),
        consumer_stop.clone(),
    ));
    shutdown.cancelled().await;
    tracing::info!("stopping: no new jobs; finishing those in flight");
    consumer_stop.cancel();
    let deadline = Duration::from_secs(settings.worker.shutdown_deadline_secs);
    if tokio::time::timeout(deadline, consumer).await.is_err() {
        let held = give_back_held(&worker).await;
        tracing::warn!(
            ?deadline,
            held,
            "in-flight jobs did not finish in time; the payouts still held were given back to the queue"
        );
    }
    // A batch fetched at the moment of the stop can stay in the in-flight
    // set of an apalis worker that is gone, where apalis-redis re-enqueues
    // nothing: back to the queue for the others now, not at the lease sweep.
    match queue.hand_back(&worker_names_given()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "fetched jobs not run handed back to the queue"),
        Err(e) => tracing::warn!(
            error = %format_args!("{e:#}"),
            "fetched jobs not handed back; the lease sweep re-enqueues their payouts"
        ),
    }
    hooks_stop.cancel();
    if let Some(h) = hooks {
        let _ = tokio::time::timeout(deadline, h).await;
    }
    beat_stop.cancel();
    if let Err(e) = beats.remove(&actor).await {
        tracing::debug!(error = ?e, "liveness beat not removed; the producer finds nothing to rescue");
    }
    metrics::WORKER_UP.set(0);
    master.outcome()
}
