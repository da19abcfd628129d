//! The dashboard's go-to box: one query string read as a payout id, an
//! idempotency key (`payout_<id>`, or a later key of its chain
//! `payout_<id>-<n>`), a gateway transfer id, a gateway account or the words
//! of a payee's name. Every look-up is a bound parameter over an index (see
//! the `admin_search` migration), and the admin pool's statement timeout
//! bounds them all.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;

/// The most results one search returns.
pub const MAX_RESULTS: usize = 20;

/// One thing found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Hit {
    /// `payout` or `payee`.
    pub kind: &'static str,
    /// Its id.
    pub id: i64,
    /// What matched: `payout id`, `idempotency key`, `transfer id`,
    /// `gateway account` or `payee name`.
    pub matched: &'static str,
    /// A line to show: a payout's amount and status, a payee's name and account.
    pub label: String,
    /// A payout's or payee's status.
    pub status: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// The payout id an idempotency key names (`payout_42`, `payout_42-3`).
pub fn id_of_key(q: &str) -> Option<i64> {
    let rest = q.strip_prefix("payout_")?;
    let id = rest.split_once('-').map_or(rest, |(id, n)| {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            id
        } else {
            ""
        }
    });
    digits(id)
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|n| *n > 0)
}

/// The words of `q` as a prefix full-text query (`ada:* & love:*`), only
/// letters and digits kept, so `to_tsquery` never sees its own syntax.
pub fn name_query(q: &str) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(8)
        .map(|w| format!("{}:*", w.to_lowercase()))
        .collect();
    (!words.is_empty()).then(|| words.join(" & "))
}

/// `q` with LIKE's wildcards escaped, for a prefix match.
fn like_prefix(q: &str) -> String {
    let mut s = String::with_capacity(q.len() + 1);
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('%');
    s
}

type PayoutRow = (i64, Decimal, String, String, DateTime<Utc>);
type PayeeRow = (i64, String, String, String, DateTime<Utc>);

fn payout_hit(matched: &'static str, (id, mut amount, currency, status, at): PayoutRow) -> Hit {
    // At the currency's exponent (`10.00`, not the column's `10.00000000`).
    if let Ok(c) = currency.parse::<crate::domain::Currency>()
        && amount.scale() > c.exponent()
    {
        amount.rescale(c.exponent());
    }
    Hit {
        kind: "payout",
        id,
        matched,
        label: format!("payout #{id} · {amount} {currency}"),
        status,
        created_at: at,
    }
}

async fn payout_by_id(pool: &PgPool, id: i64) -> sqlx::Result<Option<PayoutRow>> {
    let row = sqlx::query!(
        "SELECT id, amount, currency, status, created_at FROM payouts WHERE id = $1",
        id,
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.id, r.amount, r.currency, r.status, r.created_at)))
}

fn payee_hit(matched: &'static str, (id, name, account, status, at): PayeeRow) -> Hit {
    Hit {
        kind: "payee",
        id,
        matched,
        label: format!("{name} · {account}"),
        status,
        created_at: at,
    }
}

/// Everything `q` (trimmed, non-empty) names, at most [`MAX_RESULTS`]:
/// exact matches first (payout id, idempotency key, transfer id, account),
/// then payees by account prefix and by the words of their name.
pub async fn search(pool: &PgPool, q: &str) -> sqlx::Result<Vec<Hit>> {
    let mut hits: Vec<Hit> = Vec::new();
    let q = q.trim();
    let as_id = digits(q.strip_prefix('#').unwrap_or(q));
    if let Some(id) = as_id {
        hits.extend(
            payout_by_id(pool, id)
                .await?
                .map(|r| payout_hit("payout id", r)),
        );
    }
    if let Some(id) = id_of_key(q) {
        hits.extend(
            payout_by_id(pool, id)
                .await?
                .map(|r| payout_hit("idempotency key", r)),
        );
    }
    let rows = sqlx::query!(
        "SELECT id, amount, currency, status, created_at FROM payouts
         WHERE gateway_transfer_id = $1 ORDER BY id DESC LIMIT $2",
        q,
        MAX_RESULTS as i64,
    )
    .fetch_all(pool)
    .await?;
    hits.extend(rows.into_iter().map(|r| {
        payout_hit(
            "transfer id",
            (r.id, r.amount, r.currency, r.status, r.created_at),
        )
    }));
    // Accounts: the exact one first, then by prefix. The inner LIMIT keeps a
    // short prefix from sorting every payee (the same for names: a word
    // prefix as short as one letter matches them all).
    let rows = sqlx::query!(
        r#"SELECT id AS "id!", name AS "name!", gateway_account AS "gateway_account!",
                  status AS "status!", created_at AS "created_at!" FROM (
             SELECT id, name, gateway_account, status, created_at FROM payees WHERE gateway_account = $1
             UNION ALL
             SELECT * FROM (SELECT id, name, gateway_account, status, created_at FROM payees
                            WHERE gateway_account LIKE $2 LIMIT 200) m) u
           ORDER BY gateway_account <> $1, id LIMIT $3"#,
        q,
        like_prefix(q),
        MAX_RESULTS as i64 + 1,
    )
    .fetch_all(pool)
    .await?;
    let rows: Vec<PayeeRow> = rows
        .into_iter()
        .map(|r| (r.id, r.name, r.gateway_account, r.status, r.created_at))
        .collect();
    let (exact, prefix): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.2 == q);
    hits.extend(exact.into_iter().map(|r| payee_hit("gateway account", r)));
    hits.extend(prefix.into_iter().map(|r| payee_hit("gateway account", r)));
    if let Some(words) = name_query(q) {
        let rows = sqlx::query!(
            r#"SELECT id AS "id!", name AS "name!", gateway_account AS "gateway_account!",
                      status AS "status!", created_at AS "created_at!" FROM (
                 SELECT id, name, gateway_account, status, created_at FROM payees
                 WHERE to_tsvector('simple', name) @@ to_tsquery('simple', $1)
                 LIMIT 200) m ORDER BY id LIMIT $2"#,
            words,
            MAX_RESULTS as i64,
        )
        .fetch_all(pool)
        .await?;
        hits.extend(rows.into_iter().map(|r| {
            payee_hit(
                "payee name",
                (r.id, r.name, r.gateway_account, r.status, r.created_at),
            )
        }));
    }
    let mut seen = std::collections::HashSet::new();
    hits.retain(|h| seen.insert((h.kind, h.id)));
    hits.truncate(MAX_RESULTS);
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_payout_and_nothing_else() {
        assert_eq!(id_of_key("payout_42"), Some(42));
        assert_eq!(id_of_key("payout_42-3"), Some(42));
        for q in [
            "payout_",
            "payout_x",
            "payout_42-",
            "payout_42-a",
            "pay_42",
            "payout_-1",
        ] {
            assert_eq!(id_of_key(q), None, "{q}");
        }
    }

    #[test]
    fn name_queries_keep_only_words() {
        assert_eq!(name_query("Ada Love").as_deref(), Some("ada:* & love:*"));
        assert_eq!(name_query("a'b:*|!(c)").as_deref(), Some("a:* & b:* & c:*"));
        assert_eq!(name_query("'&|!"), None);
    }
}
