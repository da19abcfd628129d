//! Finding payouts: the filters of the admin API, the dashboard and
//! `payoutctl list`, with keyset pagination by id (newest first), so a page
//! never repeats or skips a row while payouts change state underneath.
//!
//! Every filter is a bound parameter, and each query is bounded by `LIMIT`:
//! with the `(status, id)`, `(payee_id, id)` and failed-by-code indexes a page
//! reads about as many rows as it shows, however large the table.
//!
//! These are reads of `payouts`, the dynamic ones built with `QueryBuilder`
//! (which filters are set decides the statement); the filtered write, the
//! bulk retry, is the payouts repository's (`db::payouts::bulk_retry`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::payouts::Payout;
use crate::domain::{Currency, PayoutStatus};

/// The largest page.
pub const MAX_LIMIT: i64 = 500;
/// The page size when none is asked for.
pub const DEFAULT_LIMIT: i64 = 50;

/// Which payouts: every field is optional and they combine with AND.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PayoutFilter {
    /// Only this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PayoutStatus>,
    /// Only this payee.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payee_id: Option<i64>,
    /// Only this currency (ISO 4217).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Only this failure code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_code: Option<String>,
    /// Created at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_from: Option<DateTime<Utc>>,
    /// Created before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_to: Option<DateTime<Utc>>,
    /// Due at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_from: Option<DateTime<Utc>>,
    /// Due before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_to: Option<DateTime<Utc>>,
    /// Paid at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_from: Option<DateTime<Utc>>,
    /// Paid before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_to: Option<DateTime<Utc>>,
}

/// One page request: a filter, a page size and where to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Which payouts.
    pub filter: PayoutFilter,
    /// Page size, 1..=[`MAX_LIMIT`].
    pub limit: i64,
    /// Continue below this id (the previous page's `next_cursor`).
    pub before_id: Option<i64>,
}

/// A page of payouts and the cursor of the next one.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Page {
    /// The payouts, newest first.
    pub items: Vec<Payout>,
    /// Pass as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// A query-string pair that names no filter, or a value a filter cannot
/// take; the text names the key and what was expected (a 400's message).
/// Values are shown cut to 40 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// No such filter.
    #[error("unknown filter {0:?}")]
    UnknownFilter(String),
    /// A key given twice.
    #[error("{0:?} given more than once")]
    Repeated(String),
    /// Not a payout status.
    #[error("status: unknown status {0:?} (expected one of {statuses})", statuses = status_list())]
    Status(String),
    /// Not a positive integer.
    #[error("payee_id: expected a positive integer, got {0:?}")]
    PayeeId(String),
    /// Not an ISO 4217 code.
    #[error("currency: unknown ISO 4217 code {0:?}")]
    Currency(String),
    /// A failure code longer than any stored one.
    #[error("failure_code: longer than 100 characters")]
    FailureCodeTooLong,
    /// Not an RFC 3339 time.
    #[error("{key}: expected an RFC 3339 time such as 2026-11-23T10:00:00Z, got {value:?}")]
    Time {
        /// The key (`created_from`, …).
        key: String,
        /// The value given.
        value: String,
    },
    /// A page size out of range.
    #[error("limit: expected 1 to {MAX_LIMIT}, got {0:?}")]
    Limit(String),
    /// Not a cursor this API gave out.
    #[error("cursor: not a cursor this API gave out: {0:?}")]
    Cursor(String),
}

fn status_list() -> String {
    crate::domain::status::ALL_STATUSES
        .map(|s| s.as_str())
        .join(", ")
}

fn time(key: &str, v: &str) -> Result<DateTime<Utc>, FilterError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| FilterError::Time {
            key: key.to_string(),
            value: v.to_string(),
        })
}

fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(40).collect();
    if v.chars().count() > 40 {
        s.push('…');
    }
    s
}

impl PayoutFilter {
    /// Sets one filter from a query-string pair; empty values mean "any".
    /// The error names the key and what was expected.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), FilterError> {
        const KEYS: [&str; 10] = [
            "status",
            "payee_id",
            "currency",
            "failure_code",
            "created_from",
            "created_to",
            "due_from",
            "due_to",
            "paid_from",
            "paid_to",
        ];
        if !KEYS.contains(&key) {
            return Err(FilterError::UnknownFilter(shown(key)));
        }
        let v = value.trim();
        if v.is_empty() {
            return Ok(());
        }
        match key {
            "status" => self.status = Some(v.parse().map_err(|_| FilterError::Status(shown(v)))?),
            "payee_id" => {
                self.payee_id = Some(
                    v.parse::<i64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| FilterError::PayeeId(shown(v)))?,
                )
            }
            "currency" => {
                let c: Currency = v
                    .to_ascii_uppercase()
                    .parse()
                    .map_err(|_| FilterError::Currency(shown(v)))?;
                self.currency = Some(c.code().to_string());
            }
            "failure_code" => {
                if v.len() > 100 {
                    return Err(FilterError::FailureCodeTooLong);
                }
                self.failure_code = Some(v.to_string());
            }
            "created_from" => self.created_from = Some(time(key, v)?),
            "created_to" => self.created_to = Some(time(key, v)?),
            "due_from" => self.due_from = Some(time(key, v)?),
            "due_to" => self.due_to = Some(time(key, v)?),
            "paid_from" => self.paid_from = Some(time(key, v)?),
            "paid_to" => self.paid_to = Some(time(key, v)?),
            other => return Err(FilterError::UnknownFilter(shown(other))),
        }
        Ok(())
    }

    /// Whether the filter narrows the failed payouts at all (a status of
    /// `failed` alone, or only a paid-time range, does not: bulk retry
    /// leaves out payouts paid before anyway). A real bulk retry needs one.
    pub fn narrows_failed(&self) -> bool {
        self.payee_id.is_some()
            || self.currency.is_some()
            || self.failure_code.is_some()
            || self.created_from.is_some()
            || self.created_to.is_some()
            || self.due_from.is_some()
            || self.due_to.is_some()
    }

    /// The filter as query-string pairs (for links and the CLI's JSON).
    pub fn pairs(&self) -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        let t = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if let Some(s) = self.status {
            m.insert("status", s.as_str().to_string());
        }
        if let Some(p) = self.payee_id {
            m.insert("payee_id", p.to_string());
        }
        if let Some(c) = &self.currency {
            m.insert("currency", c.clone());
        }
        if let Some(c) = &self.failure_code {
            m.insert("failure_code", c.clone());
        }
        for (k, v) in [
            ("created_from", &self.created_from),
            ("created_to", &self.created_to),
            ("due_from", &self.due_from),
            ("due_to", &self.due_to),
            ("paid_from", &self.paid_from),
            ("paid_to", &self.paid_to),
        ] {
            if let Some(v) = v {
                m.insert(k, t(v));
            }
        }
        m
    }

    /// Appends ` WHERE ...` for this filter to `q`, every value bound (the
    /// payouts repository's bulk retry builds on it too).
    pub(super) fn push_where<'a>(&'a self, q: &mut QueryBuilder<'a, Postgres>) {
        q.push(" WHERE true");
        if let Some(s) = self.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(p) = self.payee_id {
            q.push(" AND payee_id = ").push_bind(p);
        }
        if let Some(c) = &self.currency {
            q.push(" AND currency = ").push_bind(c.as_str());
        }
        if let Some(c) = &self.failure_code {
            q.push(" AND failure_code = ").push_bind(c.as_str());
        }
        let ranges = [
            ("created_at", &self.created_from, &self.created_to),
            ("due_at", &self.due_from, &self.due_to),
            ("paid_at", &self.paid_from, &self.paid_to),
        ];
        for (col, from, to) in ranges {
            if let Some(t) = from {
                q.push(format!(" AND {col} >= ")).push_bind(*t);
            }
            if let Some(t) = to {
                q.push(format!(" AND {col} < ")).push_bind(*t);
            }
        }
    }
}

impl PageRequest {
    /// Parses a whole query string's pairs: the filters plus `limit` and
    /// `cursor`. Unknown keys, repeated keys and bad values are errors that
    /// name the key.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<PageRequest, FilterError> {
        let mut req = PageRequest {
            filter: PayoutFilter::default(),
            limit: DEFAULT_LIMIT,
            before_id: None,
        };
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs {
            if !seen.insert(k.to_string()) {
                return Err(FilterError::Repeated(shown(k)));
            }
            match k {
                "limit" if !v.trim().is_empty() => {
                    req.limit = v
                        .trim()
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| FilterError::Limit(shown(v)))?;
                }
                "cursor" if !v.trim().is_empty() => {
                    req.before_id = Some(
                        v.trim()
                            .parse::<i64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| FilterError::Cursor(shown(v)))?,
                    );
                }
                "limit" | "cursor" => {}
                _ => req.filter.set(k, v)?,
            }
        }
        Ok(req)
    }
}

/// One page of payouts matching the request.
pub async fn page(pool: &PgPool, req: &PageRequest) -> sqlx::Result<Page> {
    let mut q = QueryBuilder::new("SELECT * FROM payouts");
    req.filter.push_where(&mut q);
    if let Some(b) = req.before_id {
        q.push(" AND id < ").push_bind(b);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(req.limit + 1);
    let mut items: Vec<Payout> = q.build_query_as().fetch_all(pool).await?;
    let more = items.len() as i64 > req.limit;
    items.truncate(req.limit as usize);
    let items: Vec<Payout> = items.into_iter().map(Payout::with_currency_scale).collect();
    let next_cursor = if more {
        items.last().map(|p| p.id.to_string())
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// How many failed payouts match `filter` (its status is taken as `failed`),
/// counting at most `cap + 1` rows.
pub async fn count_failed(pool: &PgPool, filter: &PayoutFilter, cap: i64) -> sqlx::Result<i64> {
    let mut f = filter.clone();
    f.status = Some(PayoutStatus::Failed);
    let mut q = QueryBuilder::new("SELECT count(*) FROM (SELECT id FROM payouts");
    f.push_where(&mut q);
    q.push(" AND paid_at IS NULL LIMIT ")
        .push_bind(cap + 1)
        .push(") m");
    q.build_query_scalar().fetch_one(pool).await
}

/// How many failed payouts matching `filter` were paid before they failed
/// (reversed or returned; `paid_at` is kept): left out of every bulk retry,
/// since retrying one pays again. Counted up to `cap + 1`.
pub async fn count_failed_after_paid(
    pool: &PgPool,
    filter: &PayoutFilter,
    cap: i64,
) -> sqlx::Result<i64> {
    let mut f = filter.clone();
    f.status = Some(PayoutStatus::Failed);
    let mut q = QueryBuilder::new("SELECT count(*) FROM (SELECT id FROM payouts");
    f.push_where(&mut q);
    q.push(" AND paid_at IS NOT NULL LIMIT ")
        .push_bind(cap + 1)
        .push(") m");
    q.build_query_scalar().fetch_one(pool).await
}

/// Failed payouts grouped by failure code, largest group first.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FailureGroup {
    /// The code (`unknown` when none was recorded).
    pub failure_code: String,
    /// How many failed payouts have it.
    pub count: i64,
    /// The oldest failure (by last change).
    pub oldest: DateTime<Utc>,
    /// The newest.
    pub newest: DateTime<Utc>,
    /// One of their messages.
    pub example_message: Option<String>,
}

/// The failures view: reads only `failed` rows, through the failed-by-code index.
pub async fn failure_groups(pool: &PgPool) -> sqlx::Result<Vec<FailureGroup>> {
    // The groups come from the failed-by-code index alone (index-only); one
    // example message per group is one more index probe.
    sqlx::query_as!(
        FailureGroup,
        r#"SELECT coalesce(g.code, 'unknown') AS "failure_code!", g.count AS "count!",
                  g.oldest AS "oldest!", g.newest AS "newest!",
                  (SELECT p.failure_message FROM payouts p
                    WHERE p.status = 'failed' AND p.failure_code IS NOT DISTINCT FROM g.code
                    ORDER BY p.id DESC LIMIT 1) AS example_message
           FROM (SELECT failure_code AS code, count(*) AS count,
                        min(updated_at) AS oldest, max(updated_at) AS newest
                 FROM payouts WHERE status = 'failed' GROUP BY failure_code) g
           ORDER BY g.count DESC, 1"#
    )
    .fetch_all(pool)
    .await
}

/// A payout selected by id for a bulk action, as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selected {
    /// Its id.
    pub id: i64,
    /// Its status.
    pub status: String,
    /// Paid before it failed (reversed, returned; `paid_at` kept): never
    /// part of a bulk retry.
    pub paid_before: bool,
}

/// The payouts among `ids` that exist, by id.
pub async fn selected(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<Selected>> {
    sqlx::query_as!(
        Selected,
        r#"SELECT id, status, paid_at IS NOT NULL AS "paid_before!" FROM payouts
           WHERE id = ANY($1) ORDER BY id"#,
        ids,
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<PageRequest, FilterError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap();
        PageRequest::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    #[test]
    fn parses_every_filter_and_names_the_bad_one() {
        let r = parse("status=failed&payee_id=7&currency=eur&failure_code=account_closed&created_from=2026-11-01T00:00:00Z&paid_to=2026-11-02T00:00:00%2B01:00&limit=10&cursor=99").unwrap();
        assert_eq!(r.filter.status, Some(PayoutStatus::Failed));
        assert_eq!(r.filter.payee_id, Some(7));
        assert_eq!(r.filter.currency.as_deref(), Some("EUR"));
        assert_eq!(
            r.filter.paid_to.unwrap().to_rfc3339(),
            "2026-11-01T23:00:00+00:00"
        );
        assert_eq!((r.limit, r.before_id), (10, Some(99)));
        assert_eq!(
            parse("status=&currency=").unwrap().filter,
            PayoutFilter::default()
        );
        for (q, says) in [
            ("status=lost", "status: unknown status"),
            ("payee_id=-1", "payee_id"),
            ("currency=XXY", "currency"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("cursor=abc", "cursor"),
            ("due_from=yesterday", "due_from"),
            ("sort=id", "unknown filter"),
            ("status=paid&status=failed", "more than once"),
        ] {
            let e = parse(q).unwrap_err().to_string();
            assert!(e.contains(says), "{q}: {e}");
        }
    }

    #[test]
    fn pairs_round_trip() {
        let r = parse("status=failed&currency=USD&due_from=2026-11-01T00:00:00Z").unwrap();
        let pairs = r.filter.pairs();
        let again = PageRequest::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
        assert_eq!(again.filter, r.filter);
    }
}
