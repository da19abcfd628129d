//! Leases that live with the worker. A claim leases a payout for
//! `worker.lease_secs` (15 s by default); while the worker holds it, one
//! background task renews the leases of *every* payout the process holds in
//! one statement each `worker.renew_every_ms` ([`Leases::renew_once`]). So
//! the lease can be short whatever the gateway's timeouts and the in-attempt
//! retries, and a payout whose worker died is claimable again within about
//! one lease.
//!
//! The worker vouches only for the lease Postgres holds as far as it knows
//! (the claim's, or the latest renewal's): a gateway call starts only while
//! that lease has the call margin left (`gateway.timeout_ms` +
//! `worker.call_margin_ms`, [`LeaseGated`]). A worker that cannot renew
//! (Postgres unreachable, or its payout taken over) therefore stops calling
//! the gateway for that payout before its lease runs out. This only
//! shortens recovery and keeps workers out of each other's way: the fence
//! (the attempt number on the final write) stays the guarantee.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::{
    clock::SharedClock,
    db::payouts,
    domain::PayoutId,
    gateway::{
        Gateway, Keyed, Lookup, LookupError, Outcome, TransferRecord, TransferRequest,
        TransientKind,
    },
    metrics,
};

/// A lease as far as this process can vouch for it.
#[derive(Debug, Clone, Copy)]
struct Held {
    token: i32,
    /// What Postgres holds, as written by the claim or the latest renewal
    /// (`None`: the renewal found the payout no longer ours).
    until: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    owner: String,
    clock: SharedClock,
    lease: chrono::Duration,
    renew_every: Duration,
    margin: chrono::Duration,
    held: Mutex<HashMap<PayoutId, Held>>,
    statements: AtomicU64,
}

/// The leases one worker process holds, renewed together.
#[derive(Debug, Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

/// What one renewal did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Leases the statement extended.
    pub renewed: usize,
    /// Held payouts it found taken over (claimed again, rescued, swept).
    pub lost: usize,
}

impl Leases {
    /// The leases of `owner` (the claim's `lease_owner`), renewed every
    /// `renew_every` to `lease` ahead by a task that ends when the last clone
    /// is dropped; a call needs `margin` of lease left.
    pub fn spawn(
        pool: PgPool,
        owner: &str,
        clock: SharedClock,
        lease: Duration,
        renew_every: Duration,
        margin: Duration,
    ) -> Leases {
        let leases = Leases {
            inner: Arc::new(Inner {
                pool,
                owner: owner.to_string(),
                clock,
                lease: chrono_dur(lease),
                renew_every,
                margin: chrono_dur(margin),
                held: Mutex::new(HashMap::new()),
                statements: AtomicU64::new(0),
            }),
        };
        tokio::spawn(renew_loop(Arc::downgrade(&leases.inner), renew_every));
        leases
    }

    /// From the settings: `worker.lease_secs`, `worker.renew_every_ms`, and
    /// the call margin (`gateway.timeout_ms` + `worker.call_margin_ms`).
    pub fn from_settings(
        pool: PgPool,
        owner: &str,
        clock: SharedClock,
        settings: &crate::config::Settings,
    ) -> Leases {
        Leases::spawn(
            pool,
            owner,
            clock,
            Duration::from_secs(settings.worker.lease_secs),
            Duration::from_millis(settings.worker.renew_every_ms),
            settings.call_margin(),
        )
    }

    /// The lease a claim returned: payout `id` under attempt `token`, held
    /// until `until`. Renewed until the returned guard is dropped.
    pub fn hold(&self, id: PayoutId, token: i32, until: DateTime<Utc>) -> HeldLease {
        self.held().insert(
            id,
            Held {
                token,
                until: Some(until),
            },
        );
        metrics::LEASES_HELD.set(self.held().len() as i64);
        HeldLease {
            leases: self.clone(),
            id,
            token,
        }
    }

    /// How many payouts this process holds.
    pub fn held_count(&self) -> usize {
        self.held().len()
    }

    /// Renewal statements sent so far.
    pub fn statements(&self) -> u64 {
        self.inner.statements.load(Ordering::Relaxed)
    }

    /// How often the leases are renewed.
    pub fn renew_every(&self) -> Duration {
        self.inner.renew_every
    }

    /// Renews every held lease in one statement (none when nothing is held).
    /// A payout the statement did not renew is no longer ours: calls for it
    /// are refused from now on. On an error nothing changes here: the
    /// leases known keep running out, and calls stop once they are short.
    pub async fn renew_once(&self) -> Result<Renewal, sqlx::Error> {
        let inner = &self.inner;
        let snapshot: Vec<(PayoutId, i32)> = self
            .held()
            .iter()
            .filter(|(_, h)| h.until.is_some())
            .map(|(id, h)| (*id, h.token))
            .collect();
        if snapshot.is_empty() {
            return Ok(Renewal::default());
        }
        let (ids, tokens): (Vec<PayoutId>, Vec<i32>) = snapshot.iter().copied().unzip();
        // Computed before the statement is sent: what we vouch for is never
        // later than what Postgres holds.
        let until = inner.clock.now() + inner.lease;
        inner.statements.fetch_add(1, Ordering::Relaxed);
        let renewed = payouts::renew_leases(&inner.pool, &inner.owner, &ids, &tokens, until).await;
        let renewed = match renewed {
            Ok(r) => r,
            Err(e) => {
                metrics::LEASE_RENEWALS.with_label_values(&["error"]).inc();
                return Err(e);
            }
        };
        metrics::LEASE_RENEWALS.with_label_values(&["ok"]).inc();
        let mut report = Renewal::default();
        let mut held = self.held();
        for r in renewed {
            let Some(h) = held.get_mut(&r.id) else {
                continue;
            };
            if h.token != r.token {
                continue; // claimed again since the snapshot
            }
            if r.renewed {
                report.renewed += 1;
                h.until = h.until.max(Some(until));
            } else if h.until.is_some() {
                // Taken over, or finished by this worker a moment ago (its
                // guard not dropped yet): either way no call starts for it.
                h.until = None;
                if r.taken {
                    report.lost += 1;
                }
            }
        }
        drop(held);
        if report.lost > 0 {
            metrics::LEASES_LOST.inc_by(report.lost as u64);
            tracing::warn!(
                lost = report.lost,
                "payouts this worker held were taken over (lease ran out, or released as its beat stopped); no further calls for them"
            );
        }
        Ok(report)
    }

    /// Stops vouching for every held lease (no call starts for them any
    /// more) and returns those it vouched for, `(id, attempt)`: for giving
    /// them back at shutdown.
    pub fn forfeit_all(&self) -> Vec<(PayoutId, i32)> {
        let mut held = self.held();
        let mut out = Vec::new();
        for (id, h) in held.iter_mut() {
            if h.until.take().is_some() {
                out.push((*id, h.token));
            }
        }
        out
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<PayoutId, Held>> {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn renew_loop(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let leases = Leases { inner };
        // A statement that outlives its interval is abandoned: the leases it
        // would have extended keep running out, and calls stop in time.
        match tokio::time::timeout(every, leases.renew_once()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(
                error = ?e,
                held = leases.held_count(),
                "lease renewal failed; no gateway call starts for a payout whose lease is short"
            ),
            Err(_) => {
                metrics::LEASE_RENEWALS
                    .with_label_values(&["timeout"])
                    .inc();
                tracing::warn!(
                    ?every,
                    held = leases.held_count(),
                    "lease renewal did not answer within its interval; no gateway call starts for a payout whose lease is short"
                );
            }
        }
    }
}

/// One payout's lease, renewed with the others until dropped.
#[derive(Debug)]
pub struct HeldLease {
    leases: Leases,
    id: PayoutId,
    token: i32,
}

impl HeldLease {
    /// The lease left at `now` that this process can vouch for (`None`:
    /// the payout is no longer ours).
    pub fn left(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        let held = self.leases.held();
        let h = held.get(&self.id).filter(|h| h.token == self.token)?;
        h.until.map(|u| u - now)
    }

    /// Whether a gateway call may start now: the lease has the call margin left.
    pub fn vouches(&self) -> bool {
        let inner = &self.leases.inner;
        self.left(inner.clock.now())
            .is_some_and(|left| left >= inner.margin)
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let mut held = self.leases.held();
        if held.get(&self.id).is_some_and(|h| h.token == self.token) {
            held.remove(&self.id);
        }
        metrics::LEASES_HELD.set(held.len() as i64);
    }
}

/// A gateway whose transfers start only while `lease` vouches for the
/// payout: otherwise the answer is a refusal ([`Outcome::is_lease_refusal`])
/// and nothing is sent. Placed under the fleet guard, so the check is made
/// right before the request leaves, after any rate-limit wait.
#[derive(Debug)]
pub struct LeaseGated<'a> {
    inner: &'a dyn Gateway,
    lease: &'a HeldLease,
}

impl<'a> LeaseGated<'a> {
    /// `inner`, gated by `lease`.
    pub fn new(inner: &'a dyn Gateway, lease: &'a HeldLease) -> Self {
        LeaseGated { inner, lease }
    }
}

#[async_trait]
impl Lookup for LeaseGated<'_> {
    async fn lookup(&self, reference: &str) -> Result<Vec<TransferRecord>, LookupError> {
        self.inner.lookup(reference).await
    }

    fn limits_own_requests(&self) -> bool {
        self.inner.limits_own_requests()
    }

    fn use_limiter(&self, limiter: Arc<dyn crate::gateway::RequestLimiter>) {
        self.inner.use_limiter(limiter)
    }
}

#[async_trait]
impl Gateway for LeaseGated<'_> {
    async fn transfer(&self, req: &TransferRequest) -> Outcome {
        self.transfer_keyed(req).await.outcome
    }

    async fn transfer_keyed(&self, req: &TransferRequest) -> Keyed {
        if !self.lease.vouches() {
            metrics::LEASE_REFUSED_CALLS.inc();
            let now = self.lease.leases.inner.clock.now();
            let left = self.lease.left(now);
            return Keyed {
                outcome: Outcome::Transient {
                    kind: TransientKind::LeaseShort,
                    message: match left {
                        Some(l) => format!(
                            "lease has {} ms left, a call needs {} ms: not sending",
                            l.num_milliseconds(),
                            self.lease.leases.inner.margin.num_milliseconds()
                        ),
                        None => "the payout is no longer this worker's: not sending".into(),
                    },
                    retry_after: None,
                },
                key_index: req.key_index,
            };
        }
        self.inner.transfer_keyed(req).await
    }

    fn minor_units(
        &self,
        money: &crate::domain::Money,
    ) -> Result<i64, crate::gateway::AmountError> {
        self.inner.minor_units(money)
    }
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
