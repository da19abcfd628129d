//! `payout_requests` (#17 item 3): one row per early payout request, with
//! who asked (the token's actor, as earnings record who posted them), what
//! was asked (currency, amount, method), and the settlement and payout it
//! made. The idempotency key is unique per payee; written in the request's
//! transaction, under the payee lock (`crate::services::payout_requests`).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgConnection;

/// A request as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PayoutRequest {
    /// Id.
    pub id: i64,
    /// The payee.
    pub payee_id: i64,
    /// The caller's key: a replay with it answers this request.
    pub idempotency_key: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The gross of earnings asked for (`None`: everything released).
    #[schema(value_type = Option<crate::domain::DecimalString>)]
    pub amount: Option<Decimal>,
    /// The payout method whose fee applies (`standard`, `instant`, ...).
    pub method: String,
    /// The settlement it made.
    pub settlement_id: i64,
    /// The payout it made.
    pub payout_id: i64,
    /// Who asked (`integration:NAME`, `operator:NAME`, `cli:USER`).
    pub requested_by: String,
    /// The request's source address, when it came over HTTP.
    pub source: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// The request of `payee_id` with `key`, if any.
pub async fn find(
    conn: &mut PgConnection,
    payee_id: i64,
    key: &str,
) -> sqlx::Result<Option<PayoutRequest>> {
    sqlx::query_as!(
        PayoutRequest,
        "SELECT id, payee_id, idempotency_key, currency, amount, method, settlement_id, payout_id,
                requested_by, source, created_at
         FROM payout_requests WHERE payee_id = $1 AND idempotency_key = $2",
        payee_id,
        key,
    )
    .fetch_optional(conn)
    .await
}

/// What [`insert`] writes.
#[derive(Debug, Clone)]
pub struct NewRequest<'a> {
    /// The payee.
    pub payee_id: i64,
    /// The caller's key.
    pub idempotency_key: &'a str,
    /// ISO 4217 code.
    pub currency: &'a str,
    /// The gross asked for.
    pub amount: Option<Decimal>,
    /// The method.
    pub method: &'a str,
    /// The settlement made.
    pub settlement_id: i64,
    /// The payout made.
    pub payout_id: i64,
    /// Who asked.
    pub requested_by: &'a str,
    /// From where.
    pub source: Option<&'a str>,
}

/// Records a request; returns it.
pub async fn insert(
    conn: &mut PgConnection,
    n: &NewRequest<'_>,
    now: DateTime<Utc>,
) -> sqlx::Result<PayoutRequest> {
    sqlx::query_as!(
        PayoutRequest,
        "INSERT INTO payout_requests (payee_id, idempotency_key, currency, amount, method,
             settlement_id, payout_id, requested_by, source, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         RETURNING id, payee_id, idempotency_key, currency, amount, method, settlement_id, payout_id,
                   requested_by, source, created_at",
        n.payee_id,
        n.idempotency_key,
        n.currency,
        n.amount,
        n.method,
        n.settlement_id,
        n.payout_id,
        n.requested_by,
        n.source,
        now,
    )
    .fetch_one(conn)
    .await
}
