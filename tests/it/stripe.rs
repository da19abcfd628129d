//! The fleet on Stripe against the Stripe stand-in
//! (`payouts::testkit::stripe_standin`, a real HTTP server that follows
//! Stripe's documented idempotency, error, rate-limit and webhook rules): one
//! test per defect of the gateway issue (#14, 1–9) and the webhook-matching
//! finding of the security issue (#15, 2). Real Postgres and Redis.
// Tests read the wall clock on purpose (clippy.toml bans it in the product).
#![allow(clippy::disallowed_methods)]

use crate::common;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use common::Fleet;
use payouts::{
    admin::webhooks::{self, WebhookState},
    clock::SystemClock,
    config::Settings,
    db::payouts as db_payouts,
    domain::{Money, PayoutStatus},
    gateway::{Outcome, TransferRequest, select},
    services::sync::InTransitSync,
    testkit::{
        mock_gateway::Faults,
        stripe_standin::{Endpoint, Fault, StandIn, StandInConfig},
    },
    worker::{Step, Worker},
};
use serde_json::{Value, json};

const KEY: &str = "sk_test_standin_51Hx";
const PLATFORM_SECRET: &str = "whsec_platform_endpoint";
const CONNECT_SECRET: &str = "whsec_connect_endpoint";

/// A fleet on `kind = "stripe"` pointed at a stand-in whose platform and
/// Connect endpoints are the fleet's `/webhooks/stripe`.
struct StripeFleet {
    standin: StandIn,
    fleet: Fleet,
    worker: Arc<Worker>,
    hooks: String,
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn stripe_fleet_with(extra: &[(&str, &str)], cfg: StandInConfig) -> StripeFleet {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut env = vec![
        ("PAYOUTS_GATEWAY__KIND", "stripe"),
        ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
        ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
    ];
    env.extend_from_slice(extra);
    let fleet = Fleet::start_with(Faults::default(), &env, Arc::new(SystemClock)).await;
    let hooks = webhook_server(&fleet, &fleet.settings, &[PLATFORM_SECRET, CONNECT_SECRET]).await;
    let url = format!("{hooks}/webhooks/stripe");
    let standin = StandIn::new(StandInConfig {
        platform_endpoint: Some(Endpoint {
            url: url.clone(),
            secret: PLATFORM_SECRET.into(),
        }),
        connect_endpoint: Some(Endpoint {
            url,
            secret: CONNECT_SECRET.into(),
        }),
        ..cfg
    });
    standin.spawn(listener).await.unwrap();
    let worker = worker_on(&fleet, &fleet.settings);
    StripeFleet {
        standin,
        fleet,
        worker,
        hooks,
    }
}

fn standin_cfg() -> StandInConfig {
    StandInConfig {
        secret_keys: vec![KEY.into()],
        ..StandInConfig::default()
    }
}

async fn stripe_fleet(extra: &[(&str, &str)]) -> StripeFleet {
    stripe_fleet_with(extra, standin_cfg()).await
}

async fn webhook_server(fleet: &Fleet, settings: &Settings, stripe: &[&str]) -> String {
    let mut g = settings.gateway.clone();
    g.stripe.webhook_secrets = stripe.iter().map(|s| s.to_string().into()).collect();
    let state = WebhookState::from_settings(fleet.pool().clone(), Arc::new(SystemClock), &g);
    serve(webhooks::router(state)).await
}

fn worker_on(fleet: &Fleet, settings: &Settings) -> Arc<Worker> {
    fleet.worker_on(settings, "worker:stripe")
}

impl StripeFleet {
    /// A payout of `amount` `currency` to `account`, queued now.
    async fn due(&self, account: &str, amount: &str, currency: &str) -> i64 {
        let payee = self.fleet.payee(account).await;
        let p = db_payouts::create(
            self.fleet.pool(),
            payee,
            Money::parse(amount, currency).unwrap(),
            Utc::now(),
            "operator:test",
            Utc::now(),
        )
        .await
        .unwrap();
        self.enqueue(p.id.get()).await;
        p.id.get()
    }

    async fn enqueue(&self, id: i64) {
        db_payouts::enqueue_now(
            self.fleet.pool(),
            payouts::domain::PayoutId::new(id),
            "operator:test",
            Utc::now() + chrono::Duration::seconds(60),
            Utc::now(),
        )
        .await
        .unwrap();
    }

    /// An operator's retry as `payoutctl retry` does it: the payout back to
    /// queued, then its job pushed with the lock cleared (a worker leaves a
    /// paid payout's lock to expire, and this retry comes within its TTL).
    async fn operator_retry(&self, id: i64) {
        let id = payouts::domain::PayoutId::new(id);
        db_payouts::retry(
            self.fleet.pool(),
            id,
            "operator:test",
            Utc::now() + chrono::Duration::seconds(60),
            Utc::now(),
        )
        .await
        .unwrap();
        self.fleet.queue.push_manual(&[id]).await.unwrap();
    }

    async fn payout(&self, id: i64) -> db_payouts::Payout {
        db_payouts::get(self.fleet.pool(), payouts::domain::PayoutId::new(id))
            .await
            .unwrap()
            .unwrap()
    }

    fn keys(&self) -> Vec<String> {
        self.standin
            .transfer_posts()
            .into_iter()
            .map(|p| p.idempotency_key.unwrap_or_default())
            .collect()
    }

    fn sync(&self) -> InTransitSync {
        InTransitSync::new(
            self.fleet.pool().clone(),
            select::build(&self.fleet.settings.gateway).unwrap(),
            Arc::new(SystemClock),
            self.fleet.settings.gateway.sync.clone(),
            "sync:test",
        )
        .with_accounts(select::account_check(&self.fleet.settings.gateway).unwrap())
    }

    async fn post_event(&self, secret: &str, body: &Value) -> (u16, String) {
        let body = body.to_string();
        let sig = webhooks::signature_header(&[secret], Utc::now().timestamp(), body.as_bytes());
        post_signed(
            &format!("{}/webhooks/stripe", self.hooks),
            "Stripe-Signature",
            &sig,
            &body,
        )
        .await
    }
}

async fn post_signed(url: &str, header: &str, sig: &str, body: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .header(header, sig)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or_default();
    (
        status,
        v["outcome"].as_str().unwrap_or_default().to_string(),
    )
}

fn form_of(s: &payouts::testkit::stripe_standin::Seen, k: &str) -> String {
    s.params
        .iter()
        .find(|(pk, _)| pk == k)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

// --- 1. balance_insufficient ----------------------------------------------------------

#[tokio::test]
async fn balance_insufficient_is_paid_under_a_new_key_once_the_platform_balance_is_topped_up() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_1Ana").await;
    s.standin.set_balance("usd", 0);
    let id = s.due("acct_1Ana", "120.50", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Retrying)
    );
    assert_eq!(
        s.payout(id).await.failure_code.as_deref(),
        Some("balance_insufficient")
    );
    // Treasury tops the balance up; the next attempt must not replay the saved 400.
    s.standin.set_balance("usd", 1_000_000);
    s.enqueue(id).await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    assert_eq!(s.standin.transfers().len(), 1);
    assert_eq!(s.standin.balance("usd"), 1_000_000 - 12_050);
}

// --- 2. held only for onboarding; capped; a new key after the saved refusal -------------

#[tokio::test]
async fn transfers_not_allowed_fails_the_payout_with_its_code_and_never_enters_held() {
    let s = stripe_fleet(&[]).await;
    s.standin.set_account("acct_blocked", "active", true).await;
    let id = s.due("acct_blocked", "10.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Failed)
    );
    assert_eq!(
        s.payout(id).await.failure_code.as_deref(),
        Some("transfers_not_allowed")
    );
}

#[tokio::test]
async fn a_payee_who_finishes_onboarding_is_paid_under_a_new_key_not_the_saved_capability_error() {
    let s = stripe_fleet(&[]).await;
    s.standin.set_account("acct_new", "inactive", false).await;
    let id = s.due("acct_new", "10.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    // Released by account.updated (or, without it, by the poll).
    s.standin.set_account("acct_new", "active", false).await;
    s.sync().release_onboarded().await.unwrap();
    assert_eq!(s.fleet.status(id).await, "queued");
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let keys = s.keys();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1], "the saved 400 was replayed: {keys:?}");
}

#[tokio::test]
async fn held_re_holds_are_capped_then_the_payout_fails_with_its_code() {
    let s = stripe_fleet(&[("PAYOUTS_WORKER__MAX_HOLDS", "2")]).await;
    s.standin.set_account("acct_slow", "inactive", false).await;
    let id = s.due("acct_slow", "10.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    s.enqueue(id).await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    s.enqueue(id).await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Failed)
    );
    assert_eq!(
        s.payout(id).await.failure_code.as_deref(),
        Some("account_not_onboarded")
    );
}

// --- 3. key chains that cannot lie -----------------------------------------------------

async fn paid_then_reversed_and_retried(s: &StripeFleet) -> (i64, String) {
    s.standin.add_account("acct_r").await;
    let id = s.due("acct_r", "25.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let first = s.payout(id).await.gateway_transfer_id.unwrap();
    s.standin.reverse(&first, None).await.unwrap();
    // The reversal reaches the fleet by webhook: paid -> failed.
    common::eventually(Duration::from_secs(5), "reversal webhook", || async {
        (s.fleet.status(id).await == "failed").then_some(())
    })
    .await;
    s.operator_retry(id).await;
    (id, first)
}

#[tokio::test]
async fn an_operator_retry_of_a_fully_reversed_payout_never_records_the_replayed_transfer_as_paid()
{
    let s = stripe_fleet(&[("PAYOUTS_GATEWAY__STRIPE__LOOKUP_BEFORE_CREATE", "false")]).await;
    let (id, first) = paid_then_reversed_and_retried(&s).await;
    let step = s.worker.process(payouts::domain::PayoutId::new(id)).await;
    let p = s.payout(id).await;
    assert_ne!(
        (step, p.gateway_transfer_id.as_deref()),
        (Step::Recorded(PayoutStatus::Paid), Some(first.as_str())),
        "recorded paid by the replay of a transfer that came back"
    );
    assert_eq!(p.status, PayoutStatus::Paid, "{p:?}");
    assert_eq!(s.standin.transfers().len(), 2, "a new transfer pays it");
}

#[tokio::test]
async fn after_a_poisoned_key_a_retry_of_a_reversed_payout_never_reuses_the_reversed_transfers_key()
{
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_p").await;
    let id = s.due("acct_p", "25.00", "USD").await;
    // The first key gets a saved 500 with nothing behind it; the payout is
    // paid under the next key after a look-up proves nothing moved.
    s.standin.push_fault(Fault::ServerErrorBeforeCreate);
    let mut step = s.worker.process(payouts::domain::PayoutId::new(id)).await;
    for _ in 0..3 {
        if step == Step::Recorded(PayoutStatus::Paid) {
            break;
        }
        s.enqueue(id).await;
        step = s.worker.process(payouts::domain::PayoutId::new(id)).await;
    }
    assert_eq!(step, Step::Recorded(PayoutStatus::Paid));
    let first = s.payout(id).await.gateway_transfer_id.unwrap();
    s.standin.reverse(&first, None).await.unwrap();
    common::eventually(Duration::from_secs(5), "reversal webhook", || async {
        (s.fleet.status(id).await == "failed").then_some(())
    })
    .await;
    s.operator_retry(id).await;
    s.worker.process(payouts::domain::PayoutId::new(id)).await;
    let p = s.payout(id).await;
    assert_eq!(p.status, PayoutStatus::Paid, "{p:?}");
    assert_ne!(p.gateway_transfer_id.as_deref(), Some(first.as_str()));
    assert_eq!(s.standin.transfers().len(), 2);
}

// --- 4. Stripe's currency units ------------------------------------------------------------

#[tokio::test]
async fn isk_goes_out_in_stripes_two_decimal_units() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_is").await;
    s.standin.set_balance("isk", 100_000_000);
    let id = s.due("acct_is", "1000", "ISK").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let post = s.standin.transfer_posts().pop().unwrap();
    assert_eq!(
        form_of(&post, "amount"),
        "100000",
        "ISK 1,000 is amount=100000"
    );
}

#[tokio::test]
async fn amounts_stripe_cannot_send_fail_with_a_clear_error_and_send_nothing() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_kw").await;
    s.standin.set_balance("kwd", 100_000_000);
    s.standin.set_balance("huf", 100_000_000);
    let kwd = s.due("acct_kw", "25.731", "KWD").await;
    let huf = s.due("acct_kw", "1000.50", "HUF").await;
    for (id, currency) in [(kwd, "KWD"), (huf, "HUF")] {
        assert_eq!(
            s.worker.process(payouts::domain::PayoutId::new(id)).await,
            Step::Recorded(PayoutStatus::Failed)
        );
        let p = s.payout(id).await;
        assert_eq!(p.failure_code.as_deref(), Some("invalid_amount"), "{p:?}");
        assert!(
            p.failure_message
                .as_deref()
                .unwrap_or("")
                .contains(currency),
            "{p:?}"
        );
    }
    assert!(
        s.standin.transfer_posts().is_empty(),
        "nothing may reach Stripe"
    );
}

// --- 5. rate limit by default ---------------------------------------------------------------

#[tokio::test]
async fn by_default_every_stripe_request_stays_under_stripes_test_mode_rate() {
    let s = stripe_fleet(&[]).await;
    let gw = select::build(&s.fleet.settings.gateway).unwrap();
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.lookup(&format!("payout_{i}")).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().expect("look-up answered");
    }
    let seen = s.standin.seen();
    assert!(
        seen.iter().all(|r| r.status != 429),
        "Stripe rate limited the fleet"
    );
    // No one-second window holds more than Stripe's test-mode 25.
    for (i, r) in seen.iter().enumerate() {
        let n = seen[i..]
            .iter()
            .take_while(|o| o.at.duration_since(r.at) < Duration::from_secs(1))
            .count();
        assert!(n <= 25, "{n} requests within one second");
    }
}

// --- 6. credentials ---------------------------------------------------------------------------

async fn assert_credentials_pause(s: &StripeFleet, id: i64, code: &str) {
    let step = s.worker.process(payouts::domain::PayoutId::new(id)).await;
    let p = s.payout(id).await;
    assert_ne!(
        p.status,
        PayoutStatus::Failed,
        "a payee failed for a platform problem: {p:?}"
    );
    assert_eq!(step, Step::Recorded(PayoutStatus::Retrying), "{p:?}");
    assert_eq!(p.failure_code.as_deref(), Some(code));
    assert_eq!(
        p.attempt - p.retry_base,
        0,
        "the attempt was not the payee's: no budget spent"
    );
    let mut conn = s.fleet.queue.conn();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(format!("{{{}}}:gateway:pause", s.fleet.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0, "the whole fleet is paused");
}

#[tokio::test]
async fn a_revoked_key_pauses_the_fleet_and_fails_no_payout() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_k").await;
    s.standin.revoke(KEY);
    let id = s.due("acct_k", "10.00", "USD").await;
    assert_credentials_pause(&s, id, "unauthorized").await;
}

#[tokio::test]
async fn a_restricted_key_without_transfer_permission_pauses_the_fleet_and_fails_no_payout() {
    let rk = "rk_test_standin_readonly";
    let s = stripe_fleet_with(
        &[("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", rk)],
        StandInConfig {
            secret_keys: vec![KEY.into()],
            read_only_keys: vec![rk.into()],
            ..StandInConfig::default()
        },
    )
    .await;
    s.standin.add_account("acct_k").await;
    let id = s.due("acct_k", "10.00", "USD").await;
    assert_credentials_pause(&s, id, "forbidden").await;
}

// --- 7. Stripe-Should-Retry -----------------------------------------------------------------

fn request(id: i64, destination: &str) -> TransferRequest {
    TransferRequest {
        amount_minor: 1_000,
        currency: "USD".into(),
        destination: destination.into(),
        reference: format!("payout_{id}"),
        metadata: [("payout_id".to_string(), id.to_string())].into(),
        idempotency_key: format!("payout_{id}"),
        key_index: 0,
        first_attempt: false,
    }
}

#[tokio::test]
async fn stripe_should_retry_false_on_a_4xx_is_never_retried_under_the_same_key() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_1").await;
    s.standin.push_fault(Fault::Unsaved {
        status: 429,
        code: "lock_timeout".into(),
        should_retry: Some(false),
    });
    let out = s.worker.gateway.transfer(&request(1, "acct_1")).await;
    assert!(!out.is_retryable(), "Stripe said not to retry: {out:?}");
}

#[tokio::test]
async fn a_409_other_than_idempotency_key_in_use_is_retried_as_stripes_sdks_do() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_1").await;
    s.standin.push_fault(Fault::Unsaved {
        status: 409,
        code: "lock_conflict".into(),
        should_retry: None,
    });
    let out = s.worker.gateway.transfer(&request(2, "acct_1")).await;
    assert!(out.is_retryable(), "{out:?}");
    // The retry pays, once.
    let out = s.worker.gateway.transfer(&request(2, "acct_1")).await;
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(s.standin.transfers().len(), 1);
}

// --- 8. account.updated -------------------------------------------------------------------------

#[tokio::test]
async fn account_updated_releases_held_payouts_of_that_account_at_once() {
    let s = stripe_fleet(&[]).await;
    s.standin.set_account("acct_onb", "inactive", false).await;
    s.standin.set_account("acct_other", "inactive", false).await;
    let id = s.due("acct_onb", "10.00", "USD").await;
    let other = s.due("acct_other", "10.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Held)
    );
    assert_eq!(
        s.worker
            .process(payouts::domain::PayoutId::new(other))
            .await,
        Step::Recorded(PayoutStatus::Held)
    );
    // Stripe sends account.updated to the Connect endpoint (no poll runs here).
    let delivered = s.standin.set_account("acct_onb", "active", false).await;
    assert_eq!(delivered, Some(200));
    assert_eq!(s.fleet.status(id).await, "queued");
    assert_eq!(s.fleet.status(other).await, "held", "only that account's");
}

// --- 9. signatures ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_signature_from_the_future_or_with_a_trailing_comma_verifies_as_in_stripes_libraries() {
    let s = stripe_fleet(&[]).await;
    let body = json!({"id": "evt_sig", "object": "event", "type": "balance.available",
        "data": {"object": {"object": "balance"}}})
    .to_string();
    let ahead = Utc::now().timestamp() + 600;
    let sig = format!(
        "{},",
        webhooks::signature_header(&[PLATFORM_SECRET], ahead, body.as_bytes())
    );
    let (status, _) = post_signed(
        &format!("{}/webhooks/stripe", s.hooks),
        "Stripe-Signature",
        &sig,
        &body,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_webhook_secret_read_with_a_trailing_newline_still_verifies() {
    let s = stripe_fleet(&[]).await;
    let hooks = webhook_server(&s.fleet, &s.fleet.settings, &["whsec_from_file\n"]).await;
    let body = json!({"id": "evt_nl", "object": "event", "type": "balance.available",
        "data": {"object": {"object": "balance"}}})
    .to_string();
    let sig = webhooks::signature_header(
        &["whsec_from_file"],
        Utc::now().timestamp(),
        body.as_bytes(),
    );
    let (status, _) = post_signed(
        &format!("{hooks}/webhooks/stripe"),
        "Stripe-Signature",
        &sig,
        &body,
    )
    .await;
    assert_eq!(status, 200);
}

// --- #15, finding 2: a webhook moves only the payout it really is about ------------------------------

#[tokio::test]
async fn a_payout_canceled_event_from_another_connected_account_never_moves_someone_elses_paid_payout()
 {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_victim").await;
    let id = s.due("acct_victim", "50.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    // Any connected account controlling its own payouts gets Stripe to sign this.
    let evil = json!({"id": "evt_evil", "object": "event", "type": "payout.canceled",
        "account": "acct_attacker",
        "data": {"object": {"id": "po_attacker", "object": "payout", "amount": 5000,
            "metadata": {"payout_id": id.to_string()}}}});
    let (status, outcome) = s.post_event(CONNECT_SECRET, &evil).await;
    assert_eq!((status, outcome.as_str()), (200, "unmatched"));
    assert_eq!(s.fleet.status(id).await, "paid");
    // A transfer event naming the payout but another transfer is unmatched too.
    let forged = json!({"id": "evt_other_tr", "object": "event", "type": "transfer.reversed",
        "data": {"object": {"id": "tr_not_ours", "object": "transfer", "amount": 5000,
            "amount_reversed": 5000, "destination": "acct_victim",
            "transfer_group": format!("payout_{id}"), "metadata": {"payout_id": id.to_string()}}}});
    let (status, outcome) = s.post_event(PLATFORM_SECRET, &forged).await;
    assert_eq!((status, outcome.as_str()), (200, "unmatched"));
    assert_eq!(s.fleet.status(id).await, "paid");
}

#[tokio::test]
async fn the_contract_endpoint_does_nothing_when_the_fleet_pays_through_stripe() {
    let s = stripe_fleet(&[]).await;
    s.standin.add_account("acct_c").await;
    let id = s.due("acct_c", "50.00", "USD").await;
    assert_eq!(
        s.worker.process(payouts::domain::PayoutId::new(id)).await,
        Step::Recorded(PayoutStatus::Paid)
    );
    let tr = s.payout(id).await.gateway_transfer_id.unwrap();
    let mut g = s.fleet.settings.gateway.clone();
    g.webhooks.secrets = vec!["gw_secret_long_enough".to_string().into()];
    let hooks = serve(webhooks::router(WebhookState::from_settings(
        s.fleet.pool().clone(),
        Arc::new(SystemClock),
        &g,
    )))
    .await;
    let body = json!({"id": "evt_gw", "type": "transfer.failed",
        "data": {"id": tr, "status": "failed", "reference": format!("payout_{id}"),
            "destination": "acct_c", "failure_code": "account_closed"}})
    .to_string();
    let sig = webhooks::signature_header(
        &["gw_secret_long_enough"],
        Utc::now().timestamp(),
        body.as_bytes(),
    );
    let (status, outcome) = post_signed(
        &format!("{hooks}/webhooks/gateway"),
        "Gateway-Signature",
        &sig,
        &body,
    )
    .await;
    assert_eq!((status, outcome.as_str()), (200, "unmatched"));
    assert_eq!(s.fleet.status(id).await, "paid");
}

// --- the key chain under any order of events ----------------------------------------------------------

/// What can happen around one payout, in any order: a worker's call (only
/// while the payout is not recorded paid, as a claim), the platform balance
/// running short or topped up, Stripe saving a 500 before or after creating
/// the transfer, Stripe forgetting its keys (24 h), and the platform
/// reversing the paid transfer in full followed by an operator retry.
#[derive(Debug, Clone, Copy)]
enum Happening {
    Call,
    BalanceShort,
    BalanceTopped,
    FaultBefore,
    FaultAfter,
    ForgetKeys,
    ReverseAndRetry,
}

fn happening() -> impl proptest::strategy::Strategy<Value = Happening> {
    use proptest::prelude::*;
    prop_oneof![
        4 => Just(Happening::Call),
        1 => Just(Happening::BalanceShort),
        1 => Just(Happening::BalanceTopped),
        1 => Just(Happening::FaultBefore),
        1 => Just(Happening::FaultAfter),
        1 => Just(Happening::ForgetKeys),
        1 => Just(Happening::ReverseAndRetry),
    ]
}

fn standing(s: &StandIn) -> Vec<String> {
    s.transfers()
        .into_iter()
        .filter(|t| t["amount_reversed"].as_i64() < t["amount"].as_i64())
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

async fn run_steps(steps: Vec<Happening>) {
    let (s, base) = StandIn::start(standin_cfg()).await.unwrap();
    s.add_account("acct_1").await;
    let settings = Settings::load_from(
        None,
        &[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", base.as_str()),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let gw = select::build(&settings.gateway).unwrap();
    // The payout as the database holds it: its stored key index, whether it
    // was recorded paid (and by which transfer), whether it was claimed before.
    let mut key_index = 0u32;
    let mut paid: Option<String> = None;
    let mut claimed = false;
    for st in steps {
        match st {
            Happening::Call if paid.is_none() => {
                let mut req = request(1, "acct_1");
                req.key_index = key_index;
                req.first_attempt = !claimed;
                claimed = true;
                let keyed = gw.transfer_keyed(&req).await;
                assert!(keyed.key_index >= key_index, "the chain never goes back");
                key_index = keyed.key_index;
                if let Outcome::Paid { transfer_id } = keyed.outcome {
                    assert!(
                        standing(&s).contains(&transfer_id),
                        "recorded paid by {transfer_id}, which does not stand"
                    );
                    paid = Some(transfer_id);
                }
            }
            Happening::Call => {}
            Happening::BalanceShort => s.set_balance("usd", 0),
            Happening::BalanceTopped => s.set_balance("usd", 1_000_000),
            Happening::FaultBefore => s.push_fault(Fault::ServerErrorBeforeCreate),
            Happening::FaultAfter => s.push_fault(Fault::ServerErrorAfterCreate),
            Happening::ForgetKeys => s.forget_keys(),
            Happening::ReverseAndRetry => {
                if let Some(id) = paid.take() {
                    s.reverse(&id, None).await.unwrap();
                }
            }
        }
        assert!(
            standing(&s).len() <= 1,
            "paid twice: {:?} after {st:?}",
            standing(&s)
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Whatever happens in whatever order, at most one transfer of a payout
    /// stands at Stripe, and the payout is recorded paid only by a transfer
    /// that stands.
    #[test]
    fn the_key_chain_never_pays_twice_nor_records_a_transfer_that_came_back(
        steps in proptest::collection::vec(happening(), 1..14)
    ) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_steps(steps));
    }
}

/// Issue 14 item 3: with `kind = "stripe"`, `payoutctl preview` computes a
/// HUF payout in whole forints (what Stripe can send), keeps the fraction in
/// the payee's balance, and shows Stripe's `amount`; another kind pays the
/// fraction.
#[tokio::test]
async fn preview_through_stripe_pays_whole_forints_keeps_the_fraction_and_shows_stripes_amount() {
    let ctl = common::Ctl::new().await;
    let text = include_str!("../../config/policy.toml")
        .replace("BHD = \"0.100\" }", "BHD = \"0.100\", HUF = \"100\" }")
        .replace("BHD = \"0.200\" }", "BHD = \"0.200\", HUF = \"100\" }")
        .replace("BHD = \"10.000\"", "BHD = \"10.000\"\nHUF = \"1000\"");
    let file = std::env::temp_dir().join(format!("{}.toml", common::unique("policy")));
    std::fs::write(&file, text).unwrap();
    let policy: payouts::domain::Policy = std::fs::read_to_string(&file).unwrap().parse().unwrap();
    let payee =
        payouts::db::payees::create(&ctl.db.pool, "Forint", "acct_huf", "HUF".parse().unwrap())
            .await
            .unwrap()
            .id;
    let done = Utc::now() - chrono::Duration::days(30);
    for (i, gross) in ["12345.50", "20000.25"].iter().enumerate() {
        let e = payouts::domain::earning::NewEarning {
            payee_id: payee.get(),
            source: "booking".into(),
            external_ref: format!("H-{i}"),
            gross: Money::parse(gross, "HUF").unwrap(),
            completed_at: done,
            release_at: policy.release_at(done),
        };
        let mut conn = ctl.db.pool.acquire().await.unwrap();
        payouts::db::earnings::record(&mut conn, &e, "operator:test", done)
            .await
            .unwrap();
    }
    let file = file.to_str().unwrap();
    let payee = payee.to_string();
    let preview = |env: &[(&str, &str)]| {
        let mut env = env.to_vec();
        env.push(("PAYOUTS_POLICY__FILE", file));
        let o = ctl.run_with(&["preview", "--payee", &payee, "--json"], &env);
        assert!(o.ok, "{}", o.stderr);
        let v: Value = serde_json::from_str(o.stdout.trim()).unwrap();
        v["settlements"][0].clone()
    };
    let stripe = [
        ("PAYOUTS_GATEWAY__KIND", "stripe"),
        ("PAYOUTS_GATEWAY__STRIPE__BASE_URL", "http://127.0.0.1:9"),
        ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", KEY),
    ];
    let dec = |v: &Value| {
        v.as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap()
    };
    let s = preview(&stripe);
    let other = preview(&[]);
    assert_eq!(s["outcome"], "payout", "{s}");
    let (net, kept, iso_net) = (dec(&s["net"]), dec(&s["carried_out"]), dec(&other["net"]));
    assert!(net.fract().is_zero(), "{s}");
    assert!(!iso_net.fract().is_zero(), "{other}");
    assert_eq!(
        net + kept,
        iso_net,
        "nothing lost: the fraction stays in the balance"
    );
    assert!(kept > rust_decimal::Decimal::ZERO && kept < rust_decimal::Decimal::ONE);
    let stripe_amount = s["stripe_amount"].as_i64().unwrap();
    assert_eq!(
        rust_decimal::Decimal::from(stripe_amount),
        net * rust_decimal::Decimal::ONE_HUNDRED
    );
    assert!(other.get("stripe_amount").is_none(), "{other}");

    let o = ctl.run_with(
        &["preview", "--payee", &payee],
        &[&stripe[..], &[("PAYOUTS_POLICY__FILE", file)]].concat(),
    );
    assert!(
        o.stdout
            .contains(&format!("sent to Stripe as amount={stripe_amount}")),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("kept in the balance"), "{}", o.stdout);

    // `settle` pays what the preview showed: whole forints, the fraction
    // kept in the payee's balance for a later period.
    let o = ctl.run_with(
        &["settle"],
        &[&stripe[..], &[("PAYOUTS_POLICY__FILE", file)]].concat(),
    );
    assert!(o.ok, "{}", o.stderr);
    let (amount, carried_out): (rust_decimal::Decimal, rust_decimal::Decimal) = sqlx::query_as(
        "SELECT p.amount, s.carried_out FROM payouts p JOIN settlements s ON s.payout_id = p.id
         WHERE p.payee_id = $1",
    )
    .bind(payee.parse::<i64>().unwrap())
    .fetch_one(&ctl.db.pool)
    .await
    .unwrap();
    assert_eq!((amount, carried_out), (net, kept));
}

/// Issue 14 item 4: every HTTP request to Stripe counts against the
/// fleet-wide limiter, the in-transit poll's look-ups and account checks
/// too: while the fleet is paused (the limiter's Redis key), the producer's
/// poll sends nothing; once the pause ends, it asks.
#[tokio::test]
async fn the_producers_in_transit_poll_and_account_checks_wait_for_the_fleet_limiter() {
    let s = stripe_fleet(&[]).await;
    let id = s.fleet.due_payout("acct_poll").await;
    let held = s.fleet.due_payout("acct_onboarding").await;
    for (id, to) in [(id, "in_transit"), (held, "held")] {
        for status in ["processing", to] {
            sqlx::query("UPDATE payouts SET status = $2, updated_at = now() - interval '1 day' WHERE id = $1")
                .bind(id)
                .bind(status)
                .execute(s.fleet.pool())
                .await
                .unwrap();
        }
    }
    sqlx::query("UPDATE payouts SET failure_code = 'account_not_onboarded' WHERE id = $1")
        .bind(held)
        .execute(s.fleet.pool())
        .await
        .unwrap();
    let mut conn = s.fleet.queue.conn();
    let pause = format!("{{{}}}:gateway:pause", s.fleet.prefix);
    let _: () = redis::cmd("SET")
        .arg(&pause)
        .arg("1")
        .arg("PX")
        .arg(120_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let sync = || {
        payouts::producer::in_transit_sync(
            &s.fleet.settings,
            s.fleet.pool().clone(),
            s.fleet.queue.conn(),
            "t",
        )
        .unwrap()
    };
    let before = s.standin.seen().len();
    let paused = sync();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), paused.run_once())
            .await
            .is_err(),
        "the look-up waits while the fleet is paused"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), paused.release_onboarded())
            .await
            .is_err(),
        "the account check waits while the fleet is paused"
    );
    assert_eq!(s.standin.seen().len(), before, "nothing was sent to Stripe");

    let _: () = redis::cmd("DEL")
        .arg(&pause)
        .query_async(&mut conn)
        .await
        .unwrap();
    let free = sync();
    assert_eq!(free.run_once().await.unwrap().looked_up, 1);
    free.release_onboarded().await.unwrap();
    let seen = s.standin.seen();
    assert!(
        seen[before..]
            .iter()
            .any(|r| r.path.starts_with("/v1/accounts")),
        "{:?}",
        seen[before..].iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}
