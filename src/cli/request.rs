//! `payoutctl request PAYEE [--amount X] [--method instant] [--currency EUR]
//! [--idempotency-key K]` (#17 item 3): an early payout request, the same as
//! `POST /api/v1/payees/{id}/payout-requests`
//! (`src/services/payout_requests.rs`), with the operator as actor.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::Args;
use rand::RngCore;
use serde_json::json;
use sqlx::PgPool;

use super::{EXIT_CONFLICT, EXIT_USAGE, Exit, print_table, table};
use crate::{
    config::Settings,
    services::payout_requests::{self as requests, By, RequestError},
};

/// The arguments of `payoutctl request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// Payee id.
    pub payee: i64,
    /// The gross of released earnings to settle at most (whole earnings in
    /// release order); default: everything released.
    #[arg(long, allow_hyphen_values = true)]
    pub amount: Option<String>,
    /// standard or instant (the policy's fee for it); default: the payee's method.
    #[arg(long)]
    pub method: Option<String>,
    /// ISO 4217 code; default: the payee's currency.
    #[arg(long)]
    pub currency: Option<String>,
    /// The request's idempotency key (a replay answers the first request);
    /// default: a new one, printed.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// The exit of a refused request: 3 no such payee, 4 refused by the state
/// (suspended, the key used otherwise, the balance), 2 bad input.
fn exit_of(e: RequestError) -> anyhow::Error {
    match e {
        e @ RequestError::NotFound(_) => Exit::not_found(e.to_string()),
        RequestError::Conflict(m) => Exit::new(EXIT_CONFLICT, m).into(),
        RequestError::Invalid(m) => Exit::new(EXIT_USAGE, m).into(),
        RequestError::Unprocessable {
            message,
            available: Some(a),
            currency,
        } => Exit::new(
            EXIT_CONFLICT,
            format!(
                "{message} (available: {a} {})",
                currency.unwrap_or_default()
            ),
        )
        .into(),
        RequestError::Unprocessable { message, .. } => Exit::new(EXIT_USAGE, message).into(),
        RequestError::Db(e) => e.into(),
    }
}

/// Runs `payoutctl request`.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    args: RequestArgs,
    as_json: bool,
    actor: &str,
    now: DateTime<Utc>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let policy = crate::services::settlement::policy_for(settings)?;
    let key = args.idempotency_key.unwrap_or_else(|| {
        let mut b = [0u8; 12];
        rand::rng().fill_bytes(&mut b);
        format!(
            "cli-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    });
    let ask = requests::Ask {
        payee_id: args.payee,
        currency: args.currency.as_deref(),
        amount: args.amount.as_deref(),
        method: args.method.as_deref(),
        idempotency_key: &key,
    };
    let by = By {
        actor,
        source: None,
        now,
    };
    let r = requests::request(pool, &policy, &ask, by)
        .await
        .map_err(exit_of)?;
    if as_json {
        writeln!(out, "{}", json!(r))?;
        return Ok(());
    }
    writeln!(
        out,
        "{} payout {} of {} {} for payee {} (request {}, key {:?}, {} by {}), due now ahead of the schedule",
        if r.replayed {
            "replayed:"
        } else {
            "requested:"
        },
        r.payout.id,
        r.payout.amount,
        r.payout.currency,
        r.request.payee_id,
        r.request.id,
        r.request.idempotency_key,
        r.request.method,
        r.request.requested_by,
    )?;
    let mut t = table(&["#", "KIND", "AMOUNT", "DESCRIPTION"], &[2]);
    for l in &r.lines {
        t.add_row(vec![
            l.position.to_string(),
            l.kind.clone(),
            l.amount.to_string(),
            l.description.clone(),
        ]);
    }
    print_table(out, &t)?;
    Ok(())
}
