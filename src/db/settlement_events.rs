//! The append-only `settlement_events` table: the outbox of settlement
//! events (`settlement.created`, `earning.released`), written by the
//! settlement run in the transaction that writes the settlement, and read by
//! the webhook fan-out in (tx_id, id) order after its cursor, only below the
//! oldest transaction still running (as `payout_events`).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

/// Records `settlement.created` for each of `settlement_ids` and
/// `earning.released` for each earning they settled, at `now`; call it in the
/// settlement's transaction, after its earnings are marked settled. Returns
/// how many events were written.
///
/// A kind is written only when some endpoint (enabled or not, so one that is
/// re-enabled finds what it missed) subscribes to it or to `*`: nobody else
/// reads these rows, and a month-end settles a million earnings (1,100,000
/// rows, a quarter of `payoutctl settle`'s time, when nobody listens). An
/// endpoint registered while a settlement commits may miss that
/// settlement's events, as it would miss any event before it existed.
pub async fn record(
    conn: &mut PgConnection,
    settlement_ids: &[i64],
    now: DateTime<Utc>,
) -> sqlx::Result<u64> {
    if settlement_ids.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query!(
        "INSERT INTO settlement_events (kind, settlement_id, earning_id, at)
         SELECT kind, settlement_id, earning_id, $2 FROM (
             SELECT 'settlement.created' AS kind, s.id AS settlement_id, NULL::bigint AS earning_id,
                    s.id AS o1, 0::bigint AS o2
             FROM unnest($1::bigint[]) AS s(id)
             WHERE EXISTS (SELECT 1 FROM webhook_endpoints
                           WHERE event_types && ARRAY['settlement.created', '*'])
             UNION ALL
             SELECT 'earning.released', e.settlement_id, e.id, e.settlement_id, e.id
             FROM earnings e WHERE e.settlement_id = ANY($1)
               AND EXISTS (SELECT 1 FROM webhook_endpoints
                           WHERE event_types && ARRAY['earning.released', '*'])) AS ev
         ORDER BY o1, o2",
        settlement_ids,
        now,
    )
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected())
}

/// One settlement event as the fan-out reads it, with the settlement (and
/// the earning) as they are.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// The writing transaction (`xid8`, as a number): the cursor's first half.
    pub tx_id: i64,
    /// The event id: the cursor's second half.
    pub id: i64,
    /// `settlement.created` or `earning.released`.
    pub kind: String,
    /// When it was written.
    pub at: DateTime<Utc>,
    /// The settlement.
    pub settlement_id: i64,
    /// The payee.
    pub payee_id: i64,
    /// The currency.
    pub currency: String,
    /// The period's start.
    pub period_start: DateTime<Utc>,
    /// The period's end.
    pub period_end: DateTime<Utc>,
    /// The schedule that cut it.
    pub schedule: String,
    /// `payout`, `below_minimum`, `shortfall` (or `returned` later).
    pub outcome: String,
    /// Services (earnings) settled.
    pub services: i32,
    /// The earnings' gross.
    pub gross: Decimal,
    /// The platform's commission.
    pub platform_commission: Decimal,
    /// Deductions.
    pub deductions: Decimal,
    /// Balances carried in.
    pub carried_in: Decimal,
    /// The gateway's fee.
    pub fee: Decimal,
    /// The payout's amount, or the balance carried over.
    pub net: Decimal,
    /// Its payout, when it made one.
    pub payout_id: Option<i64>,
    /// The earning released (`earning.released`).
    pub earning_id: Option<i64>,
    /// Where the earning comes from.
    pub earning_source: Option<String>,
    /// The source's id for it.
    pub earning_ref: Option<String>,
    /// Its gross.
    pub earning_gross: Option<Decimal>,
    /// When its work was completed.
    pub earning_completed_at: Option<DateTime<Utc>>,
    /// When it became payable.
    pub earning_release_at: Option<DateTime<Utc>>,
}

/// Up to `limit` settled events after the cursor (`tx_id`, `id`), in order.
pub async fn outbox_after(
    db: &mut PgConnection,
    tx_id: i64,
    id: i64,
    limit: i64,
) -> sqlx::Result<Vec<OutboxEvent>> {
    sqlx::query_as!(
        OutboxEvent,
        r#"SELECT e.tx_id::text::bigint AS "tx_id!", e.id, e.kind, e.at, e.settlement_id,
                  s.payee_id, s.currency, s.period_start, s.period_end, s.schedule, s.outcome,
                  s.services, s.gross, s.platform_commission, s.deductions, s.carried_in, s.fee,
                  s.net, s.payout_id, e.earning_id,
                  er.source AS "earning_source?", er.external_ref AS "earning_ref?",
                  er.gross AS "earning_gross?", er.completed_at AS "earning_completed_at?",
                  er.release_at AS "earning_release_at?"
           FROM settlement_events e
           JOIN settlements s ON s.id = e.settlement_id
           LEFT JOIN earnings er ON er.id = e.earning_id
           WHERE (e.tx_id, e.id) > ($1::bigint::text::xid8, $2)
             AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY e.tx_id, e.id
           LIMIT $3"#,
        tx_id,
        id,
        limit,
    )
    .fetch_all(&mut *db)
    .await
}

/// The newest settled event (`tx_id`, `id`): where a fan-out with no
/// endpoint moves its cursor to.
pub async fn outbox_last_settled(db: &mut PgConnection) -> sqlx::Result<Option<(i64, i64)>> {
    let row = sqlx::query!(
        r#"SELECT e.tx_id::text::bigint AS "tx_id!", e.id FROM settlement_events e
           WHERE e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY e.tx_id DESC, e.id DESC LIMIT 1"#
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(row.map(|r| (r.tx_id, r.id)))
}
