//! Every metric the fleet exports, declared once. Each says what it counts
//! and which alert or panel reads it. Labels are bounded: never a payout or
//! payee id.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry `/metrics` serves.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    REGISTRY
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

const SECONDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const LAG: [f64; 14] = [
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
];

/// Payouts finished by outcome (`paid`, `in_transit`, `failed`, `retrying`). Panel: throughput; alert: failure rate.
pub static PAYOUTS_FINISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payouts_finished_total",
        "Attempts recorded, by the status they left the payout in",
        &["outcome"],
    )
});
/// Money paid, in the currency's ISO 4217 minor units (cents, yen, fils),
/// by currency: counted once per payout, when the write that records it `paid`
/// has committed and changed the row (the worker's fenced write, the
/// in-transit poll, a webhook). An integer counter, so sums are exact up to
/// 2^53 minor units per series; a panel divides by 10^exponent of each
/// currency for major units (never stored or summed as a float amount).
/// Panel: money paid per currency per hour.
pub static PAID_MINOR_UNITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_paid_minor_units_total",
        "Money recorded paid, in ISO 4217 minor units, by currency",
        &["currency"],
    )
});

/// Counts `amount` of `currency` recorded paid in [`PAID_MINOR_UNITS`]. An
/// amount that is not a valid amount of a known currency (the worker refuses
/// those before paying) is logged, not counted.
pub fn count_paid(amount: rust_decimal::Decimal, currency: &str) {
    let money = currency
        .parse::<crate::domain::Currency>()
        .and_then(|c| crate::domain::Money::new(amount, c));
    match money {
        Ok(m) => count_paid_money(&m),
        Err(e) => {
            tracing::warn!(currency, error = %format_args!("{e:#}"), "paid amount not counted in payout_paid_minor_units_total")
        }
    }
}

/// [`count_paid`] of an amount already decoded (the worker's claimed payout).
pub fn count_paid_money(money: &crate::domain::Money) {
    let currency = money.currency();
    match money.to_minor_units() {
        Ok(n) if n > 0 => PAID_MINOR_UNITS
            .with_label_values(&[currency.code()])
            .inc_by(n.unsigned_abs()),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(currency = currency.code(), error = %format_args!("{e:#}"), "paid amount not counted in payout_paid_minor_units_total")
        }
    }
}

/// Payout attempts (claims). Panel: attempts.
pub static ATTEMPTS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("payout_attempts_total", "Payouts claimed for an attempt"));
/// Payouts failed permanently or with attempts exhausted. Alert: dead letters.
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_dead_letters_total",
        "Payouts that became failed, by failure code class",
        &["reason"],
    )
});
/// Gateway calls by result class (2xx, 4xx, 429, 5xx, connect, transient, timeout); an open circuit sends nothing and is not counted here. Alert: gateway errors / 429.
pub static GATEWAY_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "gateway_requests_total",
        "Gateway calls by result class",
        &["class"],
    )
});
/// Gateway call latency. Panel: gateway latency.
pub static GATEWAY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let h = HistogramVec::new(
        HistogramOpts::new("gateway_request_seconds", "Gateway call latency")
            .buckets(SECONDS.to_vec()),
        &["class"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
});
/// Claim to recorded outcome. Alert: processing p95.
pub static PROCESSING_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "payout_processing_seconds",
        "Claim to recorded outcome, per attempt",
        SECONDS.to_vec(),
    )
});
/// Due time to paid: the lag users feel. Panel: due-to-paid percentiles.
pub static DUE_TO_PAID_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "payout_due_to_paid_seconds",
        "Due time to recorded paid",
        LAG.to_vec(),
    )
});
/// Jobs pushed into Redis, by source (`due`, `sweep`, `redis_loss`,
/// `manual`, `rescue`: a dead worker's payouts). Panel: enqueued and recovered.
pub static JOBS_ENQUEUED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_jobs_enqueued_total",
        "Jobs pushed into Redis, by source",
        &["source"],
    )
});
/// Leases the sweep recovered (crashed worker, lost job). Panel: recoveries.
pub static LEASES_RECOVERED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_leases_recovered_total",
        "Expired queued/processing leases re-enqueued by the sweep",
    )
});
/// Payouts the leader released because their worker's liveness beat
/// stopped (`producer.rescue_after_ms`). Panel: enqueued and recovered.
pub static LEASES_RESCUED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_leases_rescued_total",
        "Processing payouts released because their worker's liveness beat stopped",
    )
});
/// Lease renewal statements of this worker, by result (`ok`, `error`,
/// `timeout`): one per renewal interval while it holds payouts. Panel: leases.
pub static LEASE_RENEWALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_lease_renewals_total",
        "Lease renewal statements (one per worker process per interval), by result",
        &["result"],
    )
});
/// Held payouts a renewal found no longer this worker's (taken over after
/// its lease ran out, or rescued while its beat was stale). Panel: leases.
pub static LEASES_LOST: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_leases_lost_total",
        "Held payouts a lease renewal found taken over",
    )
});
/// Gateway calls not started because the lease had less than the call
/// margin left (renewals failing, or the payout taken over). Panel: leases.
pub static LEASE_REFUSED_CALLS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_lease_refused_calls_total",
        "Gateway calls not started: the lease had less than the call margin left",
    )
});
/// Payouts this worker process holds under a lease right now. Panel: leases.
pub static LEASES_HELD: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_leases_held",
        "Payouts held under a lease by this worker",
    )
});
/// Jobs acknowledged without work, by reason (`locked`, `not_claimable`, `not_found`, `malformed`). Panel: lock contention.
pub static JOBS_SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_jobs_skipped_total",
        "Jobs acknowledged without an attempt, by reason",
        &["reason"],
    )
});
/// Fenced writes refused because another worker took the payout over. Panel: stale fences.
pub static STALE_FENCE: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_stale_fence_writes_total",
        "Outcome writes refused by the fencing token",
    )
});
/// Worker (apalis) restarts after an error. Panel: worker restarts.
pub static WORKER_RESTARTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_worker_restarts_total",
        "apalis worker restarts after a backend error",
    )
});
/// Errors talking to Postgres or Redis in the job path, by where. Panel: infra errors.
pub static INFRA_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_infra_errors_total",
        "Postgres/Redis errors in the job path",
        &["component"],
    )
});
/// Jobs in flight in this worker process. Panel: in-flight.
pub static IN_FLIGHT: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_jobs_in_flight",
        "Jobs being handled by this process",
    )
});
/// This worker process is alive (1). Alert: no worker alive.
pub static WORKER_UP: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("payout_worker_up", "1 while this worker process runs"));
/// 1 when this producer leads. Alert: no producer leading.
pub static PRODUCER_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_producer_leader",
        "1 when this producer replica is the leader",
    )
});
/// Queued payouts (jobs in the window). Panel: queue depth.
pub static WINDOW_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_queue_window_depth",
        "Payouts queued in Redis (the window)",
    )
});
/// Payouts by status, from the producer. Panel: statuses.
pub static PAYOUTS_BY_STATUS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new("payouts_by_status", "Payouts by status"),
        &["status"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
});
/// Age of the oldest due payout not yet worked off (pending, queued or processing;
/// `retrying` ones wait on their schedule by design). Alert: backlog age.
pub static OLDEST_DUE_AGE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_oldest_due_age_seconds",
        "Age of the oldest due payout not yet paid or in flight",
    )
});

/// Age of the oldest payout `in_transit` (accepted by the gateway, not yet
/// confirmed paid or failed), since it entered that status; 0 when there is
/// none. Refreshed by the leading producer. Alert: PayoutInTransitStuck;
/// panel: in transit.
pub static OLDEST_IN_TRANSIT_AGE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_oldest_in_transit_age_seconds",
        "Age of the oldest payout in_transit since it was accepted (0 = none)",
    )
});

/// Gateway circuit: 0 closed, 1 half-open, 2 open. Panel: gateway; alert: circuit open.
pub static CIRCUIT_STATE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "gateway_circuit_state",
        "Gateway circuit breaker: 0 closed, 1 half-open, 2 open",
    )
});
/// Times the circuit opened. Alert: gateway erroring.
pub static CIRCUIT_OPENED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "gateway_circuit_opened_total",
        "Times the gateway circuit breaker opened",
    )
});
/// Calls or claims held back, by reason (`rate_limit`, `fleet_pause`, `circuit_open`). Panel: throttling.
pub static GATEWAY_THROTTLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "gateway_throttled_total",
        "Gateway calls or claims held back, by reason",
        &["reason"],
    )
});
/// Fleet-wide pauses started by a 429. Alert: gateway rate limiting.
pub static FLEET_PAUSES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "gateway_fleet_pauses_total",
        "Fleet-wide pauses started after a 429",
    )
});
/// Disagreements found by the last reconciliation, by kind. Alert: reconciliation mismatch.
pub static RECONCILE_MISMATCHES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        Opts::new(
            "payout_reconcile_mismatches",
            "Disagreements found by the last reconciliation, by kind",
        ),
        &["kind"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
});

/// When the latest recorded reconciliation finished (unix seconds; 0: never).
/// Set by the leading producer. Alert: reconciliation stale.
pub static RECONCILE_LAST_RUN: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_reconcile_last_run_timestamp_seconds",
        "When the latest recorded reconciliation finished (unix seconds; 0 = never)",
    )
});
/// Admin requests refused, by reason (`no_credentials`, `bad_credentials`,
/// `forbidden`, `csrf`, `bad_input`, `locked_out`, `timeout`). Panel: admin; a burst of bad credentials is worth a look.
pub static ADMIN_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_admin_refused_total",
        "Admin requests refused, by reason",
        &["reason"],
    )
});
/// Operator actions through the admin API, by action and result (`ok`, `conflict`, `not_found`).
pub static ADMIN_ACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_admin_actions_total",
        "Operator actions through the admin API, by action and result",
        &["action", "result"],
    )
});
/// (payee, currency) a settlement run could not settle because of an error
/// (a policy that does not cover it, an amount over the policy's maximum, a
/// database error); the others are settled all the same. Alert:
/// PayoutSettlementErrors; panel: settlement.
pub static SETTLEMENT_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_settlement_errors_total",
        "Payee-currency settlements that failed with an error (the rest of the run went on)",
    )
});
/// Periods settled by a settlement run, by outcome (`payout`,
/// `below_minimum`, `shortfall`). Panel: settlement.
pub static SETTLEMENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_settlements_total",
        "Periods settled, by outcome",
        &["outcome"],
    )
});
/// Earnings refused at intake (HTTP, CLI, import), by the field named.
/// Panel: settlement (bad input from the platform).
pub static EARNINGS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_earnings_refused_total",
        "Earnings refused at intake, by the field named",
        &["field"],
    )
});

/// Connections the admin listener closed at once because `admin.max_connections`
/// were open. Panel: admin; a steady rate is a flood or a leak.
pub static HTTP_CONNECTIONS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_admin_connections_refused_total",
        "Connections the admin listener closed because too many were open",
    )
});

/// The `class` label of gateway calls (see `gateway::Outcome::class`).
const GATEWAY_CLASSES: [&str; 7] = [
    "2xx",
    "4xx",
    "429",
    "5xx",
    "connect",
    "transient",
    "timeout",
];

/// Payouts recorded `paid` that the gateway later reported failed or
/// reversed. Every increment should page someone.
pub static FAILED_AFTER_PAID: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new(
        "payout_failed_after_paid_total",
        "Payouts recorded paid that the gateway later reported failed or reversed (page)",
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
});

/// In-transit payouts resolved, by how (`webhook`, `poll`) and to what (`paid`, `failed`).
pub static RESOLVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "payout_in_transit_resolved_total",
            "In-transit payouts resolved, by source and final status",
        ),
        &["source", "status"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
});

/// Webhooks received, by source and what they did.
pub static WEBHOOKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "payout_webhooks_total",
            "Gateway webhooks received, by source and outcome",
        ),
        &["source", "outcome"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
});

/// The outcomes of an outbound webhook attempt (the failure-rate alert
/// `WebhookDeliveriesFailing` reads them; panel "Webhooks out").
pub const WEBHOOK_OUTCOMES: [&str; 7] = [
    "delivered",
    "http_error",
    "redirect",
    "timeout",
    "connect_error",
    "error",
    "refused",
];

/// Outbound webhook attempts (one per message per attempt, immediate
/// retries inside it not counted), by outcome. Alert WebhookDeliveriesFailing;
/// panel "Webhooks out".
pub static WEBHOOK_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_webhook_out_attempts_total",
        "Outbound webhook attempts, by outcome",
        &["outcome"],
    )
});

/// Outbound messages failed after the last attempt of the schedule. Panel "Webhooks out".
pub static WEBHOOK_MESSAGES_FAILED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_webhook_out_messages_failed_total",
        "Outbound webhook messages given up after the last scheduled attempt",
    )
});

/// Endpoints the fleet disabled because every delivery failed for
/// `webhooks_out.disable_after_secs`. Alert WebhookEndpointDisabled.
pub static WEBHOOK_ENDPOINTS_DISABLED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_webhook_out_endpoints_disabled_total",
        "Webhook endpoints disabled by the fleet after failing too long",
    )
});

/// Age in seconds of the oldest undelivered outbound message (0: none), set
/// by the delivery lease holder. Alert WebhookBacklogOld; panel "Webhooks out".
pub static WEBHOOK_OLDEST_UNDELIVERED_AGE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_webhook_out_oldest_undelivered_age_seconds",
        "Age of the oldest outbound webhook message not yet delivered",
    )
});

/// Enabled webhook endpoints every attempt to which has failed for 15
/// minutes or more, set by the delivery lease holder. Alert
/// PayoutWebhookEndpointFailing; panel "Webhooks out".
pub static WEBHOOK_FAILING_ENDPOINTS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_webhook_out_failing_endpoints",
        "Enabled webhook endpoints failing every attempt for 15 minutes or more",
    )
});

/// 1 while this process holds the webhook delivery lease. Panel "Webhooks out".
pub static WEBHOOK_LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "payout_webhook_out_leader",
        "1 while this process fans out and delivers outbound webhooks",
    )
});

/// Seconds from a message's creation (fan-out) to its delivery. Panel "Webhooks out".
pub static WEBHOOK_LAG_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "payout_webhook_out_lag_seconds",
        "Seconds from an outbound message's creation to its delivery",
        LAG.to_vec(),
    )
});

/// The outcomes of a mail attempt (label `outcome` of [`MAIL_ATTEMPTS`]).
pub const MAIL_OUTCOMES: [&str; 6] = [
    "delivered",
    "smtp_deferred",
    "smtp_rejected",
    "smtp_error",
    "timeout",
    "refused",
];

/// Mails to payees handed to the SMTP server, or not, per attempt (immediate
/// retries inside it not counted), by outcome. No alert: a payee's notice
/// that is late or lost pages nobody (the payout itself is unaffected);
/// panel "Email to payees".
pub static MAIL_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "payout_mail_attempts_total",
        "Mails to payees: attempts by outcome (delivered: the SMTP server took it)",
        &["outcome"],
    )
});

/// Mails given up after the last attempt of the schedule. Panel "Email to payees".
pub static MAIL_MESSAGES_FAILED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "payout_mail_messages_failed_total",
        "Mails to payees given up after the last scheduled attempt",
    )
});

/// Touches every metric so `/metrics` lists them from the start.
pub fn init() {
    LazyLock::force(&MAIL_MESSAGES_FAILED);
    for o in MAIL_OUTCOMES {
        MAIL_ATTEMPTS.with_label_values(&[o]);
    }
    LazyLock::force(&WEBHOOK_ATTEMPTS);
    LazyLock::force(&WEBHOOK_MESSAGES_FAILED);
    LazyLock::force(&WEBHOOK_ENDPOINTS_DISABLED);
    LazyLock::force(&WEBHOOK_OLDEST_UNDELIVERED_AGE);
    LazyLock::force(&WEBHOOK_LEADER);
    LazyLock::force(&WEBHOOK_FAILING_ENDPOINTS);
    LazyLock::force(&WEBHOOK_LAG_SECONDS);
    for o in WEBHOOK_OUTCOMES {
        WEBHOOK_ATTEMPTS.with_label_values(&[o]);
    }
    LazyLock::force(&PAYOUTS_FINISHED);
    LazyLock::force(&PAID_MINOR_UNITS);
    LazyLock::force(&OLDEST_IN_TRANSIT_AGE);
    LazyLock::force(&FAILED_AFTER_PAID);
    LazyLock::force(&ATTEMPTS);
    LazyLock::force(&DEAD_LETTERS);
    LazyLock::force(&GATEWAY_REQUESTS);
    LazyLock::force(&GATEWAY_SECONDS);
    LazyLock::force(&PROCESSING_SECONDS);
    LazyLock::force(&DUE_TO_PAID_SECONDS);
    LazyLock::force(&JOBS_ENQUEUED);
    LazyLock::force(&LEASES_RECOVERED);
    LazyLock::force(&LEASES_RESCUED);
    LazyLock::force(&LEASE_RENEWALS);
    LazyLock::force(&LEASES_LOST);
    LazyLock::force(&LEASE_REFUSED_CALLS);
    LazyLock::force(&LEASES_HELD);
    LazyLock::force(&JOBS_SKIPPED);
    LazyLock::force(&STALE_FENCE);
    LazyLock::force(&WORKER_RESTARTS);
    LazyLock::force(&INFRA_ERRORS);
    LazyLock::force(&IN_FLIGHT);
    LazyLock::force(&WORKER_UP);
    LazyLock::force(&PRODUCER_LEADER);
    LazyLock::force(&WINDOW_DEPTH);
    LazyLock::force(&PAYOUTS_BY_STATUS);
    LazyLock::force(&OLDEST_DUE_AGE);
    LazyLock::force(&CIRCUIT_STATE);
    LazyLock::force(&CIRCUIT_OPENED);
    LazyLock::force(&GATEWAY_THROTTLED);
    LazyLock::force(&FLEET_PAUSES);
    LazyLock::force(&RECONCILE_MISMATCHES);
    LazyLock::force(&RECONCILE_LAST_RUN);
    LazyLock::force(&ADMIN_REFUSED);
    LazyLock::force(&HTTP_CONNECTIONS_REFUSED);
    LazyLock::force(&ADMIN_ACTIONS);
    LazyLock::force(&SETTLEMENT_ERRORS);
    LazyLock::force(&SETTLEMENTS);
    LazyLock::force(&EARNINGS_REFUSED);
    // Labelled series exist from the start at 0, so increase() sees their first event.
    let zero = |c: &IntCounterVec, labels: &[&str]| {
        for l in labels {
            c.with_label_values(&[l]);
        }
    };
    zero(
        &PAYOUTS_FINISHED,
        &["paid", "in_transit", "retrying", "failed", "held"],
    );
    zero(&DEAD_LETTERS, &["permanent", "exhausted"]);
    // Webhooks (served by payout-admin): the outcomes the failure-rate alert reads.
    for source in ["gateway", "stripe"] {
        for outcome in [
            "paid",
            "bad_signature",
            "bad_payload",
            "unmatched",
            "db_error",
        ] {
            WEBHOOKS.with_label_values(&[source, outcome]);
        }
    }
    for source in ["webhook", "poll"] {
        for status in ["paid", "failed"] {
            RESOLVED.with_label_values(&[source, status]);
        }
    }
    zero(&SETTLEMENTS, &["payout", "below_minimum", "shortfall"]);
    zero(
        &EARNINGS_REFUSED,
        &[
            "payee_id",
            "source",
            "external_ref",
            "gross",
            "currency",
            "completed_at",
            "body",
            "other",
        ],
    );
    for action in ["retry", "cancel", "enqueue", "bulk_retry"] {
        for result in ["ok", "conflict", "not_found"] {
            ADMIN_ACTIONS.with_label_values(&[action, result]);
        }
    }
    zero(
        &ADMIN_REFUSED,
        &[
            "no_credentials",
            "bad_credentials",
            "forbidden",
            "csrf",
            "bad_input",
        ],
    );
    zero(&GATEWAY_REQUESTS, &GATEWAY_CLASSES);
    zero(
        &JOBS_ENQUEUED,
        &["due", "sweep", "redis_loss", "manual", "rescue"],
    );
    zero(&LEASE_RENEWALS, &["ok", "error", "timeout"]);
    zero(
        &JOBS_SKIPPED,
        &["locked", "not_claimable", "not_found", "malformed"],
    );
    zero(
        &INFRA_ERRORS,
        &["redis_lock", "postgres_claim", "postgres_record"],
    );
    zero(
        &GATEWAY_THROTTLED,
        &["rate_limit", "fleet_pause", "circuit_open"],
    );
    for class in GATEWAY_CLASSES {
        GATEWAY_SECONDS.with_label_values(&[class]);
    }
    for s in crate::domain::status::ALL_STATUSES {
        PAYOUTS_BY_STATUS.with_label_values(&[s.as_str()]);
    }
    for k in crate::domain::mismatch::MismatchKind::ALL {
        RECONCILE_MISMATCHES.with_label_values(&[k.label()]);
    }
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&REGISTRY.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}
