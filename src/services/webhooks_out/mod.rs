//! Outbound webhooks: every payout and settlement event the platform
//! subscribed to, signed to the Standard Webhooks specification and
//! delivered at least once; and, through the same machinery, email to
//! payees ([`mail`]).
//!
//! - **Outbox.** `payout_events` is the outbox of payout events: every
//!   status change writes its event in the same transaction (no event for a
//!   change that rolled back). The hot path writes nothing more; each event
//!   row carries the id of the transaction that wrote it (`tx_id`).
//!   `settlement_events` is that of the settlement run (`settlement.created`,
//!   `earning.released`), read after a cursor of its own.
//! - **Lease.** One process at a time fans out and delivers; it renews its
//!   lease, and those of the messages it has claimed, every third of
//!   `webhooks_out.lease_secs` while a pass is in flight, so a slow endpoint
//!   cannot let it run out mid-batch.
//! - **Fan-out.** The process holding the delivery lease reads the events
//!   after its cursor in (tx_id, id) order, only below the oldest transaction
//!   still running (so an event of an open transaction is never skipped),
//!   maps each to an event type, creates one message per subscribed, enabled
//!   endpoint and moves the cursor, in one transaction. With no endpoint it
//!   only moves the cursor.
//! - **Delivery.** It claims due messages (the claim leases them, so a crash
//!   loses nothing), POSTs them signed, retries once at once (backon) and
//!   then on `webhooks_out.retry_schedule_secs`, and fails a message after
//!   the last; an endpoint failing for `disable_after_secs` is disabled.
//!   [`safety`] decides where the fleet may connect; redirects are not
//!   followed, answers are read up to a cap, secrets are never logged.

pub mod endpoints;
pub mod mail;
pub mod safety;
pub mod sign;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use backon::{ConstantBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::SharedClock,
    config::{EmailSettings, WebhooksOutSettings},
    db::{
        events::{self, OutboxEvent},
        payees, settlement_events,
        webhook_cursors::{self, PAYOUT_EVENTS, SETTLEMENT_EVENTS},
        webhook_deliveries::{self, Claimed, NewMail, Outcome, SentDelivery},
        webhook_endpoints::{self, Subscriber, Target},
    },
    metrics,
};

/// Every event type an endpoint may subscribe to (`*`: all of them): only
/// those the fleet emits, so a subscription never waits for an event that
/// never comes.
pub const EVENT_TYPES: [&str; 10] = [
    "payout.created",
    "payout.queued",
    "payout.held",
    "payout.in_transit",
    "payout.paid",
    "payout.failed",
    "payout.cancelled",
    "payout.reversed",
    "settlement.created",
    "earning.released",
];

/// The outboxes the fan-out reads, each after its own cursor (under one
/// delivery lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbox {
    /// `payout_events`: payout transitions.
    Payouts,
    /// `settlement_events`: settlements written, earnings released.
    Settlements,
}

impl Outbox {
    fn cursor(self) -> &'static str {
        match self {
            Outbox::Payouts => PAYOUT_EVENTS,
            Outbox::Settlements => SETTLEMENT_EVENTS,
        }
    }
}

/// One event as told: its type, `webhook-id`, time and body.
struct Told {
    kind: &'static str,
    message_id: String,
    at: DateTime<Utc>,
    body: String,
}

/// The event type a settlement event is told as.
fn settlement_event_type(kind: &str) -> Option<&'static str> {
    match kind {
        "settlement.created" => Some("settlement.created"),
        "earning.released" => Some("earning.released"),
        _ => None,
    }
}

/// The `webhook-id` of a settlement event.
pub fn settlement_message_id(event_id: i64) -> String {
    format!("evt_settlement_{event_id}")
}

/// The body of a settlement event: the settlement (`settlement.created`),
/// or the earning with its settlement (`earning.released`).
pub fn settlement_body(kind: &str, e: &settlement_events::OutboxEvent) -> String {
    let money = |d: rust_decimal::Decimal| shown_amount(d, &e.currency);
    let settlement = json!({
        "object": "settlement",
        "id": e.settlement_id,
        "payee_id": e.payee_id,
        "currency": e.currency,
        "period_start": e.period_start,
        "period_end": e.period_end,
        "schedule": e.schedule,
        "outcome": e.outcome,
        "services": e.services,
        "gross": money(e.gross),
        "platform_commission": money(e.platform_commission),
        "deductions": money(e.deductions),
        "carried_in": money(e.carried_in),
        "fee": money(e.fee),
        "net": money(e.net),
        "payout_id": e.payout_id,
    });
    let data = match (kind, e.earning_id) {
        ("earning.released", Some(id)) => json!({
            "object": "earning",
            "id": id,
            "seq": e.id,
            "event_id": settlement_message_id(e.id),
            "payee_id": e.payee_id,
            "source": e.earning_source,
            "external_ref": e.earning_ref,
            "gross": e.earning_gross.map(money),
            "currency": e.currency,
            "completed_at": e.earning_completed_at,
            "release_at": e.earning_release_at,
            "settlement_id": e.settlement_id,
            "payout_id": e.payout_id,
            "settlement": settlement,
        }),
        _ => {
            let mut s = settlement;
            s["seq"] = json!(e.id);
            s["event_id"] = json!(settlement_message_id(e.id));
            s
        }
    };
    json!({
        "type": kind,
        "timestamp": e.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": data,
    })
    .to_string()
}

/// The event type a payout transition is told as, if any. Internal moves
/// (claims, in-attempt retries, re-enqueues after a retry or a lost lease)
/// are not told.
pub fn payout_event_type(from: Option<&str>, to: &str) -> Option<&'static str> {
    Some(match (from, to) {
        (None, _) => "payout.created",
        (Some("pending" | "failed" | "held"), "queued") => "payout.queued",
        (_, "held") => "payout.held",
        (_, "in_transit") => "payout.in_transit",
        (_, "paid") => "payout.paid",
        (Some("paid"), "failed") => "payout.reversed",
        (_, "failed") => "payout.failed",
        (_, "cancelled") => "payout.cancelled",
        _ => return None,
    })
}

/// Why a list of wanted event types was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTypesError {
    /// The list is empty.
    #[error("event_types must name at least one event type (or \"*\")")]
    Empty,
    /// More than 32 types.
    #[error("event_types may name at most 32 types")]
    TooMany,
    /// Not an event type (its first 60 characters).
    #[error("event_types: {0:?} is not an event type; use \"*\" or some of {types}", types = EVENT_TYPES.join(", "))]
    Unknown(String),
}

/// Checks a list of wanted event types; the error names the bad one.
pub fn check_event_types(types: &[String]) -> Result<(), EventTypesError> {
    if types.is_empty() {
        return Err(EventTypesError::Empty);
    }
    if types.len() > 32 {
        return Err(EventTypesError::TooMany);
    }
    if let Some(bad) = types
        .iter()
        .find(|t| t.as_str() != "*" && !EVENT_TYPES.contains(&t.as_str()))
    {
        return Err(EventTypesError::Unknown(bad.chars().take(60).collect()));
    }
    Ok(())
}

fn wants(sub: &Subscriber, kind: &str) -> bool {
    sub.event_types.iter().any(|t| t == "*" || t == kind)
}

/// The `webhook-id` of a payout event.
pub fn payout_message_id(event_id: i64) -> String {
    format!("evt_payout_{event_id}")
}

/// The amount at its currency's scale (`120.50`), as the API shows it.
fn shown_amount(amount: rust_decimal::Decimal, currency: &str) -> String {
    match currency.parse::<crate::domain::Currency>() {
        Ok(c) => match crate::domain::Money::new(amount, c) {
            Ok(m) => crate::domain::money::at_minor_unit(&m).to_string(),
            Err(_) => amount.normalize().to_string(),
        },
        Err(_) => amount.normalize().to_string(),
    }
}

/// The body of a payout event (Standard Webhooks: type, timestamp, data).
/// Serialized from borrowed fields in one pass (no intermediate
/// `serde_json::Value`: one of these is built per message the fan-out
/// sends); the keys in alphabetical order, as a `json!` object has them.
pub fn payout_body(kind: &str, e: &OutboxEvent) -> String {
    #[derive(serde::Serialize)]
    struct Data<'a> {
        amount: String,
        attempt: Option<i32>,
        currency: &'a str,
        due_at: DateTime<Utc>,
        event_id: String,
        failure_code: Option<&'a str>,
        gateway_transfer_id: Option<&'a str>,
        id: i64,
        object: &'static str,
        payee_id: i64,
        previous_status: Option<&'a str>,
        reason: Option<&'a str>,
        seq: i64,
        status: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        data: Data<'a>,
        timestamp: String,
        #[serde(rename = "type")]
        kind: &'a str,
    }
    let body = Body {
        data: Data {
            amount: shown_amount(e.amount, &e.currency),
            attempt: e.attempt,
            currency: &e.currency,
            due_at: e.due_at,
            event_id: payout_message_id(e.id),
            failure_code: e.failure_code.as_deref(),
            gateway_transfer_id: e.gateway_transfer_id.as_deref(),
            id: e.payout_id,
            object: "payout",
            payee_id: e.payee_id,
            previous_status: e.from_status.as_deref(),
            reason: e.reason.as_deref(),
            seq: e.id,
            status: &e.to_status,
        },
        timestamp: e.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        kind,
    };
    serde_json::to_string(&body).expect("a payout body serializes")
}

/// What one delivery pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Whether this process held the lease.
    pub leading: bool,
    /// Events read by the fan-out.
    pub events: usize,
    /// Messages created.
    pub messages: u64,
    /// Messages delivered.
    pub delivered: usize,
    /// Attempts that failed.
    pub failed: usize,
    /// Whether the fan-out waited for the payouts being paid (`yield_secs`).
    pub yielded: bool,
}

/// A count of the work this process has done for payouts (e.g. payouts
/// handled so far): the deliverer yields while it moves.
pub type WorkCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Where the yield to payouts stands (see `webhooks_out.yield_secs`).
#[derive(Debug, Default)]
struct Yield {
    /// The work count at the previous pass.
    last: u64,
    /// Since when the fan-out has been waiting.
    since: Option<tokio::time::Instant>,
    /// The wait ran out: passes send until the fan-out has caught up.
    catching_up: bool,
}

/// The fan-out and the deliverer of one process.
#[derive(Clone)]
pub struct Dispatcher {
    pool: PgPool,
    settings: WebhooksOutSettings,
    clock: SharedClock,
    owner: String,
    client: reqwest::Client,
    /// Where endpoints may point (`allow_private`), parsed once.
    policy: safety::Policy,
    /// The SMTP channel (email to payees), when `email.enabled`.
    mailer: Option<mail::Mailer>,
    /// When the gauges were last refreshed (every 5 s at most).
    gauges_at: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    /// The process's payout work, when delivery yields to it.
    work: Option<WorkCounter>,
    yielding: Arc<std::sync::Mutex<Yield>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The HTTP client of the deliverer: no redirects, both timeouts, every
/// address checked by the policy.
pub fn client(settings: &WebhooksOutSettings) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .timeout(Duration::from_millis(settings.timeout_ms))
        .dns_resolver(Arc::new(safety::CheckedResolver(safety::Policy::new(
            &settings.allow_private,
        ))))
        .user_agent(concat!("payouts-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("failed to build the webhook client")
}

enum Sent {
    Answer {
        code: u16,
        excerpt: String,
    },
    /// The SMTP server took the mail.
    Accepted {
        code: u16,
        excerpt: String,
    },
    Error {
        kind: &'static str,
        message: String,
    },
}

impl Dispatcher {
    /// A dispatcher acting as `owner` (its lease's holder).
    pub fn new(
        pool: PgPool,
        settings: WebhooksOutSettings,
        clock: SharedClock,
        owner: &str,
    ) -> anyhow::Result<Self> {
        Ok(Dispatcher {
            client: client(&settings)?,
            policy: safety::Policy::new(&settings.allow_private),
            pool,
            settings,
            clock,
            owner: owner.to_string(),
            mailer: None,
            gauges_at: Arc::default(),
            work: None,
            yielding: Arc::default(),
        })
    }

    /// Yields to the payouts this process pays (`webhooks_out.yield_secs`):
    /// while `work` moves from one pass to the next, the fan-out waits, up to
    /// `yield_secs` at a time; then passes send until the fan-out has caught
    /// up, and it may wait again. Without this, it never waits.
    pub fn yielding_to(mut self, work: WorkCounter) -> Self {
        self.work = Some(work);
        self
    }

    /// Whether this pass's fan-out waits for the payouts being paid.
    fn yields(&self) -> bool {
        let Some(work) = &self.work else {
            return false;
        };
        if self.settings.yield_secs == 0 {
            return false;
        }
        let count = work();
        let mut y = self.yielding.lock().expect("yield state");
        let working = std::mem::replace(&mut y.last, count) != count;
        if !working {
            y.since = None;
            y.catching_up = false;
            return false;
        }
        if y.catching_up {
            return false;
        }
        let now = tokio::time::Instant::now();
        let since = *y.since.get_or_insert(now);
        if now.duration_since(since) < Duration::from_secs(self.settings.yield_secs) {
            return true;
        }
        y.since = None;
        y.catching_up = true;
        false
    }

    /// Also mails payees, when `email.enabled`: mail messages are written by
    /// the fan-out of payout events and sent by the same deliverer.
    pub fn with_email(mut self, email: &EmailSettings) -> anyhow::Result<Self> {
        self.mailer = if email.enabled {
            Some(mail::Mailer::new(email)?)
        } else {
            None
        };
        Ok(self)
    }

    /// One pass: hold the lease; if held, fan out and deliver what is due.
    pub async fn tick(&self) -> anyhow::Result<Pass> {
        let now = self.clock.now();
        let until = now + chrono::Duration::seconds(self.settings.lease_secs as i64);
        let leading = webhook_cursors::hold(&self.pool, PAYOUT_EVENTS, &self.owner, until, now)
            .await
            .context("failed to hold the webhook lease")?;
        metrics::WEBHOOK_LEADER.set(i64::from(leading));
        if !leading {
            return Ok(Pass::default());
        }
        let inflight = InFlight::default();
        let work = async {
            let mut pass = Pass {
                leading,
                ..Pass::default()
            };
            // A bounded number of fan-out batches of each outbox per pass,
            // then delivery (retries). While yielding to payouts, the
            // fan-out waits: the events stay in the outbox, after the cursor.
            pass.yielded = self.yields();
            let mut caught_up = true;
            for outbox in [Outbox::Payouts, Outbox::Settlements] {
                if pass.yielded {
                    break;
                }
                let mut all = false;
                for _ in 0..8 {
                    let (events, messages) = self.fan_out(outbox).await?;
                    pass.events += events;
                    pass.messages += messages;
                    if events < self.settings.fanout_batch as usize {
                        all = true;
                        break;
                    }
                }
                caught_up &= all;
            }
            if caught_up && !pass.yielded {
                self.yielding.lock().expect("yield state").catching_up = false;
            }
            let (delivered, failed) = self.deliver_leased(&inflight).await?;
            pass.delivered = delivered;
            pass.failed = failed;
            anyhow::Ok(pass)
        };
        let Some(pass) = self.keeping_lease(&inflight, work).await else {
            // Another process holds the lease now: what was in flight is
            // dropped unrecorded, and the new holder sends it again.
            metrics::WEBHOOK_LEADER.set(0);
            tracing::warn!(
                "webhook lease lost during a pass; the new holder sends its messages again"
            );
            return Ok(Pass::default());
        };
        let pass = pass?;
        let due = {
            let mut at = self.gauges_at.lock().expect("gauge clock");
            let due = at.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
            if due {
                *at = Some(tokio::time::Instant::now());
            }
            due
        };
        if due {
            self.refresh_gauges().await?;
        }
        Ok(pass)
    }

    /// One fan-out batch of `outbox`: reads the events after its cursor,
    /// sends each message once (to endpoints not failing; at most one
    /// failure per endpoint per batch, the rest wait for the retry pass),
    /// then writes the messages with their outcome and moves the cursor in
    /// one transaction. A crash before that commit sends them again (at
    /// least once). Returns (events read, messages written).
    pub async fn fan_out(&self, outbox: Outbox) -> anyhow::Result<(usize, u64)> {
        let now = self.clock.now();
        let cursor = outbox.cursor();
        let mut conn = self.pool.acquire().await?;
        let Some(from) = webhook_cursors::get(&mut conn, cursor, &self.owner).await? else {
            return Ok((0, 0));
        };
        let subs = webhook_endpoints::subscribers(&mut conn).await?;
        let mailer = self.mailer.as_ref().filter(|_| outbox == Outbox::Payouts);
        if subs.is_empty() && mailer.is_none() {
            let last = match outbox {
                Outbox::Payouts => events::outbox_last_settled(&mut conn).await?,
                Outbox::Settlements => settlement_events::outbox_last_settled(&mut conn).await?,
            };
            if let Some(to) = last
                && to > from
            {
                webhook_cursors::advance(&mut conn, cursor, &self.owner, from, to).await?;
            }
            return Ok((0, 0));
        }
        let limit = self.settings.fanout_batch;
        // Each event told (type, `webhook-id`, time, body), built only when
        // some endpoint wants it.
        let wanted = |kind: &str, at: DateTime<Utc>| {
            subs.iter().any(|s| wants(s, kind) && s.created_at <= at)
        };
        let mut mails = Vec::new();
        let (read, last, told): (usize, Option<(i64, i64)>, Vec<Told>) = match outbox {
            Outbox::Payouts => {
                let batch = events::outbox_after(&mut conn, from.0, from.1, limit).await?;
                if let Some(m) = mailer {
                    mails = self.mails(&mut conn, m, &batch).await?;
                }
                let told = batch
                    .iter()
                    .filter_map(|e| {
                        let kind = payout_event_type(e.from_status.as_deref(), &e.to_status)?;
                        wanted(kind, e.at).then(|| Told {
                            kind,
                            message_id: payout_message_id(e.id),
                            at: e.at,
                            body: payout_body(kind, e),
                        })
                    })
                    .collect();
                (batch.len(), batch.last().map(|e| (e.tx_id, e.id)), told)
            }
            Outbox::Settlements => {
                let batch =
                    settlement_events::outbox_after(&mut conn, from.0, from.1, limit).await?;
                let told = batch
                    .iter()
                    .filter_map(|e| {
                        let kind = settlement_event_type(&e.kind)?;
                        wanted(kind, e.at).then(|| Told {
                            kind,
                            message_id: settlement_message_id(e.id),
                            at: e.at,
                            body: settlement_body(kind, e),
                        })
                    })
                    .collect();
                (batch.len(), batch.last().map(|e| (e.tx_id, e.id)), told)
            }
        };
        drop(conn);
        let Some(to) = last else {
            return Ok((0, 0));
        };
        let mut messages = Vec::new();
        for t in &told {
            for s in subs
                .iter()
                .filter(|s| wants(s, t.kind) && s.created_at <= t.at)
            {
                messages.push(Claimed {
                    id: 0,
                    endpoint_id: Some(s.id),
                    event_id: t.message_id.clone(),
                    body: t.body.clone(),
                    attempts: 1,
                    created_at: now,
                    channel: "webhook".into(),
                    recipient: None,
                    subject: None,
                });
            }
        }
        let targets: std::collections::HashMap<i64, &Target> =
            subs.iter().map(|s| (s.id, &s.target)).collect();
        // Endpoints not to send to in this batch: failing already, or failed once here.
        let held: std::sync::Mutex<std::collections::HashSet<i64>> = std::sync::Mutex::new(
            targets
                .values()
                .filter(|t| t.failing_since.is_some())
                .map(|t| t.id)
                .collect(),
        );
        let kinds: std::collections::HashMap<&str, &'static str> = told
            .iter()
            .map(|t| (t.message_id.as_str(), t.kind))
            .collect();
        let rows: Vec<SentDelivery> = futures::stream::iter(messages)
            .map(|c| {
                let (targets, held, kinds) = (&targets, &held, &kinds);
                async move {
                    let kind = kinds.get(c.event_id.as_str()).copied().unwrap_or("unknown");
                    // Webhook messages only here: each has its endpoint.
                    let endpoint = c.endpoint_id.unwrap_or_default();
                    let skip = held.lock().expect("held set").contains(&endpoint);
                    if skip {
                        return SentDelivery {
                            endpoint_id: endpoint,
                            event_id: c.event_id,
                            event_type: kind.to_string(),
                            body: c.body,
                            status: "pending",
                            attempts: 0,
                            next_attempt_at: now,
                            delivered_at: None,
                            status_code: None,
                            error: None,
                            latency_ms: 0,
                            response: None,
                        };
                    }
                    let o = self.attempt(targets.get(&endpoint).copied(), &c).await;
                    if o.status != "delivered" {
                        held.lock().expect("held set").insert(endpoint);
                    }
                    SentDelivery {
                        endpoint_id: endpoint,
                        event_id: c.event_id,
                        event_type: kind.to_string(),
                        body: c.body,
                        status: o.status,
                        attempts: 1,
                        next_attempt_at: o.next_attempt_at,
                        delivered_at: (o.status == "delivered").then_some(o.next_attempt_at),
                        status_code: o.status_code,
                        error: o.error,
                        latency_ms: o.latency_ms,
                        response: o.response,
                    }
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let end = self.clock.now();
        let mut tx = self.pool.begin().await?;
        webhook_deliveries::insert_sent(&mut tx, &rows, end).await?;
        let mailed = webhook_deliveries::insert_mail(&mut tx, &mails, end).await?;
        if !webhook_cursors::advance(&mut tx, cursor, &self.owner, from, to).await? {
            // The lease moved on meanwhile: the new holder sends these again.
            tx.rollback().await?;
            return Ok((read, 0));
        }
        tx.commit().await?;
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for r in rows.iter().filter(|r| r.attempts > 0) {
            if r.status == "delivered" {
                ok.push(r.endpoint_id);
            } else {
                bad.push(r.endpoint_id);
            }
        }
        self.record_endpoints(ok, bad, end).await?;
        Ok((read, rows.len() as u64 + mailed))
    }

    /// The mails about the events of `batch` of a type `m` mails, one to
    /// each payee that has an address (none for a payee without one).
    async fn mails(
        &self,
        conn: &mut sqlx::PgConnection,
        m: &mail::Mailer,
        batch: &[OutboxEvent],
    ) -> anyhow::Result<Vec<NewMail>> {
        let mailed: Vec<(&'static str, &OutboxEvent)> = batch
            .iter()
            .filter_map(|e| {
                let kind = payout_event_type(e.from_status.as_deref(), &e.to_status)?;
                m.wants(kind).then_some((kind, e))
            })
            .collect();
        if mailed.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<i64> = mailed.iter().map(|(_, e)| e.payee_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let contacts: std::collections::HashMap<i64, (String, String)> =
            payees::addresses(&mut *conn, &ids)
                .await?
                .into_iter()
                .map(|(id, name, email)| (id, (name, email)))
                .collect();
        Ok(mailed
            .into_iter()
            .filter_map(|(kind, e)| {
                let (name, email) = contacts.get(&e.payee_id)?;
                let (subject, body) = mail::render(kind, e, name)?;
                Some(NewMail {
                    payee_id: e.payee_id,
                    event_id: payout_message_id(e.id),
                    event_type: kind.to_string(),
                    recipient: email.clone(),
                    subject,
                    body,
                })
            })
            .collect())
    }

    /// Records each endpoint's run of failures and disables those failing too long.
    async fn record_endpoints(
        &self,
        mut ok: Vec<i64>,
        mut bad: Vec<i64>,
        end: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        ok.sort_unstable();
        ok.dedup();
        bad.sort_unstable();
        bad.dedup();
        if ok.is_empty() && bad.is_empty() {
            return Ok(());
        }
        webhook_endpoints::record_outcomes(&self.pool, &ok, &bad, end).await?;
        let cutoff = end - chrono::Duration::seconds(self.settings.disable_after_secs as i64);
        let disabled = webhook_endpoints::disable_failing(
            &self.pool,
            cutoff,
            "every delivery failed for webhooks_out.disable_after_secs",
            end,
        )
        .await?;
        for id in disabled {
            metrics::WEBHOOK_ENDPOINTS_DISABLED.inc();
            tracing::warn!(
                endpoint_id = id,
                "webhook endpoint disabled: every delivery failed too long"
            );
        }
        Ok(())
    }

    /// Runs `work` (a pass) while renewing the delivery lease, and the
    /// leases of the messages in `inflight`, every third of
    /// `webhooks_out.lease_secs`: a slow endpoint can hold a batch longer
    /// than one lease, and a lease that ran out mid-batch would let another
    /// process send the same messages again. `None` when the lease was lost
    /// all the same (a stalled process): `work` is then dropped, its
    /// requests cancelled and nothing of it recorded.
    async fn keeping_lease<T>(
        &self,
        inflight: &InFlight,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let every = Duration::from_millis((self.settings.lease_secs * 1000 / 3).max(10));
        let renew = async {
            loop {
                tokio::time::sleep(every).await;
                let now = self.clock.now();
                let until = now + chrono::Duration::seconds(self.settings.lease_secs as i64);
                match webhook_cursors::hold(&self.pool, PAYOUT_EVENTS, &self.owner, until, now)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %format_args!("{e:#}"), "webhook lease not renewed; trying again");
                        continue;
                    }
                }
                let held = inflight.lock().expect("in-flight messages").clone();
                if !held.is_empty()
                    && let Err(e) = webhook_deliveries::extend(&self.pool, &held, until).await
                {
                    tracing::warn!(error = %format_args!("{e:#}"), "message leases not renewed; trying again");
                }
            }
        };
        tokio::select! {
            biased;
            done = work => Some(done),
            () = renew => None,
        }
    }

    /// Claims the due messages and delivers them; (delivered, failed
    /// attempts). Call it as part of [`Dispatcher::tick`], which renews the
    /// leases while it runs.
    pub async fn deliver(&self) -> anyhow::Result<(usize, usize)> {
        let inflight = InFlight::default();
        self.keeping_lease(&inflight, self.deliver_leased(&inflight))
            .await
            .unwrap_or(Ok((0, 0)))
    }

    async fn deliver_leased(&self, inflight: &InFlight) -> anyhow::Result<(usize, usize)> {
        let now = self.clock.now();
        let lease = now + chrono::Duration::seconds(self.settings.lease_secs as i64);
        let claimed =
            webhook_deliveries::claim(&self.pool, self.settings.delivery_batch, lease, now).await?;
        if claimed.is_empty() {
            return Ok((0, 0));
        }
        *inflight.lock().expect("in-flight messages") =
            claimed.iter().map(|c| (c.id, c.attempts)).collect();
        let mut ids: Vec<i64> = claimed.iter().filter_map(|c| c.endpoint_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let targets: std::collections::HashMap<i64, Target> =
            webhook_endpoints::targets(&self.pool, &ids)
                .await?
                .into_iter()
                .map(|t| (t.id, t))
                .collect();
        let targets = Arc::new(targets);
        let outcomes: Vec<(Option<i64>, Outcome)> = futures::stream::iter(claimed)
            .map(|c| {
                let targets = targets.clone();
                async move {
                    let endpoint = c.endpoint_id;
                    let target = endpoint.and_then(|e| targets.get(&e));
                    (endpoint, self.attempt(target, &c).await)
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;
        let end = self.clock.now();
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        let mut delivered = 0;
        for (endpoint, o) in &outcomes {
            if o.status == "delivered" {
                delivered += 1;
            }
            // Mails have no endpoint whose run of failures to record.
            let Some(endpoint) = endpoint else { continue };
            if o.status == "delivered" {
                ok.push(*endpoint);
            } else {
                bad.push(*endpoint);
            }
        }
        let failed = outcomes.len() - delivered;
        let outcomes: Vec<Outcome> = outcomes.into_iter().map(|(_, o)| o).collect();
        webhook_deliveries::finish(&self.pool, &outcomes, end).await?;
        inflight.lock().expect("in-flight messages").clear();
        self.record_endpoints(ok, bad, end).await?;
        Ok((delivered, failed))
    }

    /// One attempt (with the immediate retries) of one message.
    async fn attempt(&self, target: Option<&Target>, c: &Claimed) -> Outcome {
        let started = tokio::time::Instant::now();
        let email = c.channel == "email";
        let retries = ConstantBuilder::default()
            .with_delay(Duration::ZERO)
            .with_max_times(self.settings.immediate_retries);
        let sent = match target {
            _ if email => match &self.mailer {
                Some(m) => {
                    let send = || m.send(c);
                    send.retry(retries).await.unwrap_or_else(|e| e.sent)
                }
                None => Sent::Error {
                    kind: "refused",
                    message: "email to payees is off (email.enabled)".into(),
                },
            },
            Some(t) if t.enabled => {
                let send = || self.send(t, c);
                send.retry(retries).await.unwrap_or_else(|e| e.sent)
            }
            _ => Sent::Error {
                kind: "refused",
                message: "the endpoint is disabled".into(),
            },
        };
        let latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let now = self.clock.now();
        let (status_code, error, response, outcome) = match sent {
            Sent::Answer { code, excerpt } if (200..300).contains(&code) => {
                (Some(i32::from(code)), None, Some(excerpt), "delivered")
            }
            Sent::Accepted { code, excerpt } => {
                (Some(i32::from(code)), None, Some(excerpt), "delivered")
            }
            Sent::Answer { code, excerpt } => (
                Some(i32::from(code)),
                Some(format!("HTTP {code}")),
                Some(excerpt),
                if (300..400).contains(&code) {
                    "redirect"
                } else {
                    "http_error"
                },
            ),
            Sent::Error { kind, message } => (None, Some(message), None, kind),
        };
        if email {
            metrics::MAIL_ATTEMPTS.with_label_values(&[outcome]).inc();
        } else {
            metrics::WEBHOOK_ATTEMPTS
                .with_label_values(&[outcome])
                .inc();
        }
        if outcome == "delivered" {
            if !email {
                metrics::WEBHOOK_LAG_SECONDS
                    .observe((now - c.created_at).num_milliseconds().max(0) as f64 / 1000.0);
            }
            return Outcome {
                id: c.id,
                attempt: c.attempts,
                status: "delivered",
                next_attempt_at: now,
                status_code,
                latency_ms,
                error: None,
                response,
            };
        }
        // attempts = 1 failed: the first delay of the schedule; past the end,
        // or a mail the SMTP server refused for good (5xx), failed.
        let delay = if outcome == "smtp_rejected" {
            None
        } else {
            self.settings
                .retry_schedule_secs
                .get(c.attempts.max(1) as usize - 1)
                .copied()
        };
        let (status, next) = match delay {
            Some(d) => ("pending", now + chrono::Duration::seconds(d as i64)),
            None => {
                if email {
                    metrics::MAIL_MESSAGES_FAILED.inc();
                } else {
                    metrics::WEBHOOK_MESSAGES_FAILED.inc();
                }
                ("failed", now)
            }
        };
        Outcome {
            id: c.id,
            attempt: c.attempts,
            status,
            next_attempt_at: next,
            status_code,
            latency_ms,
            error,
            response,
        }
    }

    /// One POST; an error when it should be tried again at once.
    async fn send(&self, t: &Target, c: &Claimed) -> Result<Sent, SendFailed> {
        let url = match self.policy.check_url(&t.url) {
            Ok(u) => u,
            Err(e) => {
                return Ok(Sent::Error {
                    kind: "refused",
                    message: e.to_string(),
                });
            }
        };
        let now = self.clock.now();
        let ts = now.timestamp();
        let mut secrets: Vec<&SecretString> = vec![&t.secret];
        if let Some((prev, until)) = &t.previous
            && *until > now
        {
            secrets.push(prev);
        }
        let signature = match sign::header(&secrets, &c.event_id, ts, &c.body) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Sent::Error {
                    kind: "refused",
                    message: e.to_string(),
                });
            }
        };
        let resp = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &c.event_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(c.body.clone())
            .send()
            .await;
        let sent = match resp {
            Ok(mut r) => {
                let code = r.status().as_u16();
                let mut buf: Vec<u8> = Vec::new();
                let cap = self.settings.response_cap_bytes;
                while buf.len() < cap {
                    match r.chunk().await {
                        Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                buf.truncate(cap);
                let excerpt: String = String::from_utf8_lossy(&buf).chars().take(512).collect();
                Sent::Answer { code, excerpt }
            }
            Err(e) => Sent::Error {
                kind: if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect_error"
                } else {
                    "error"
                },
                // Without the URL: a query string could hold the
                // receiver's own token, and the text is shown to viewers.
                message: error_chain(&e.without_url()),
            },
        };
        match &sent {
            Sent::Answer { code, .. } if (200..300).contains(code) || (300..400).contains(code) => {
                Ok(sent)
            }
            _ => Err(SendFailed { sent }),
        }
    }

    /// The gauges: how old the oldest undelivered message is, how many
    /// endpoints keep failing.
    pub async fn refresh_gauges(&self) -> anyhow::Result<()> {
        let oldest = webhook_deliveries::oldest_pending(&self.pool, "webhook").await?;
        let age = oldest.map_or(0, |t| (self.clock.now() - t).num_seconds().max(0));
        metrics::WEBHOOK_OLDEST_UNDELIVERED_AGE.set(age);
        let failing = webhook_endpoints::count_failing(
            &self.pool,
            self.clock.now() - chrono::Duration::minutes(15),
        )
        .await?;
        metrics::WEBHOOK_FAILING_ENDPOINTS.set(failing);
        Ok(())
    }

    /// Gives the lease up (graceful stop).
    pub async fn resign(&self) {
        if let Err(e) = webhook_cursors::release(&self.pool, PAYOUT_EVENTS, &self.owner).await {
            tracing::debug!(error = %format_args!("{e:#}"), "webhook lease not released; it runs out");
        }
        metrics::WEBHOOK_LEADER.set(0);
    }
}

/// The messages a pass has claimed and not finished: (id, attempt).
type InFlight = std::sync::Mutex<Vec<(i64, i32)>>;

struct SendFailed {
    sent: Sent,
}

/// An error's chain on one line, cut to 300 characters (callers strip the
/// URL first: reqwest's messages name it, query string included).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s.chars().take(300).collect()
}

/// The loop in the worker process: a pass every `tick_ms` until `shutdown`,
/// then the lease is given up.
pub async fn run(dispatcher: Dispatcher, shutdown: CancellationToken) {
    let every = Duration::from_millis(dispatcher.settings.tick_ms);
    loop {
        match dispatcher.tick().await {
            Ok(p) if p.events > 0 || p.delivered > 0 || p.failed > 0 => {
                tracing::debug!(?p, "webhook pass");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "webhook pass failed; trying again")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    dispatcher.resign().await;
}

/// A `whsec_` secret and when an endpoint's previous one stops signing after
/// a rotation at `now` with `overlap`.
pub fn rotation(now: DateTime<Utc>, overlap: Duration) -> (SecretString, DateTime<Utc>) {
    (
        sign::new_secret(),
        now + chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::zero()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payout_body_is_the_json_object_it_was() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-27T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        for (from, failure) in [(Some("processing"), None), (None, Some("\"quoted\" é"))] {
            let e = OutboxEvent {
                tx_id: 7,
                id: 42,
                payout_id: 9,
                from_status: from.map(String::from),
                to_status: "paid".into(),
                reason: Some("gateway said so".into()),
                attempt: Some(1),
                at,
                payee_id: 3,
                amount: "120.5".parse().unwrap(),
                currency: "USD".into(),
                due_at: at,
                gateway_transfer_id: Some("tr_1".into()),
                failure_code: failure.map(String::from),
            };
            let was = json!({
                "type": "payout.paid",
                "timestamp": e.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "data": {
                    "object": "payout",
                    "id": e.payout_id,
                    "seq": e.id,
                    "event_id": payout_message_id(e.id),
                    "status": e.to_status,
                    "previous_status": e.from_status,
                    "reason": e.reason,
                    "attempt": e.attempt,
                    "payee_id": e.payee_id,
                    "amount": "120.50",
                    "currency": e.currency,
                    "due_at": e.due_at,
                    "gateway_transfer_id": e.gateway_transfer_id,
                    "failure_code": e.failure_code,
                }
            })
            .to_string();
            assert_eq!(payout_body("payout.paid", &e), was);
        }
    }

    #[test]
    fn transitions_are_told_as_their_event_types() {
        assert_eq!(payout_event_type(None, "pending"), Some("payout.created"));
        assert_eq!(
            payout_event_type(Some("pending"), "queued"),
            Some("payout.queued")
        );
        assert_eq!(payout_event_type(Some("retrying"), "queued"), None);
        assert_eq!(payout_event_type(Some("processing"), "queued"), None);
        assert_eq!(payout_event_type(Some("queued"), "processing"), None);
        assert_eq!(payout_event_type(Some("processing"), "retrying"), None);
        assert_eq!(
            payout_event_type(Some("processing"), "paid"),
            Some("payout.paid")
        );
        assert_eq!(
            payout_event_type(Some("paid"), "failed"),
            Some("payout.reversed")
        );
        assert_eq!(
            payout_event_type(Some("processing"), "failed"),
            Some("payout.failed")
        );
        assert_eq!(
            payout_event_type(Some("processing"), "held"),
            Some("payout.held")
        );
        assert_eq!(
            payout_event_type(Some("held"), "queued"),
            Some("payout.queued")
        );
        assert_eq!(
            payout_event_type(Some("failed"), "cancelled"),
            Some("payout.cancelled")
        );
        assert!(check_event_types(&["*".into()]).is_ok());
        assert!(check_event_types(&["payout.paid".into()]).is_ok());
        assert!(check_event_types(&[]).is_err());
        assert!(
            check_event_types(&["payout.nope".into()])
                .unwrap_err()
                .to_string()
                .starts_with("event_types: \"payout.nope\" is not an event type; use \"*\" or some of payout.")
        );
    }
}
