//! Registering, changing and rotating endpoints: the rules the admin API and
//! `payoutctl webhooks` share. Bad input is refused with a message that names
//! the field, and nothing is written; every change is audited (never a
//! secret). A secret leaves the fleet only in the answer that made it.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use sqlx::PgPool;

use super::{check_event_types, safety::Policy, sign};
use crate::db::{audit, webhook_deliveries, webhook_endpoints};

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The input is wrong; the message names the field.
    #[error("{0}")]
    BadInput(String),
    /// No such endpoint.
    #[error("webhook endpoint {0} not found")]
    NotFound(i64),
    /// No such message.
    #[error("webhook delivery {0} not found")]
    MessageNotFound(i64),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A new endpoint (the API's body, the CLI's flags).
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    /// Where to POST.
    pub url: String,
    /// The event types wanted (`*`: all).
    pub event_types: Vec<String>,
    /// A note for people.
    pub description: Option<String>,
    /// Enabled at once (default true).
    pub enabled: Option<bool>,
}

/// A change to an endpoint; what is absent stays.
#[derive(Debug, Clone, Default)]
pub struct EndpointChange {
    /// Where to POST.
    pub url: Option<String>,
    /// The event types wanted.
    pub event_types: Option<Vec<String>>,
    /// A note for people.
    pub description: Option<String>,
    /// Enabled or not.
    pub enabled: Option<bool>,
}

/// The JSON object `v` with only the keys `allowed` (an error names any other).
fn object(v: Value, allowed: &[&str]) -> Result<Map<String, Value>, EndpointError> {
    let obj = match v {
        Value::Object(o) => o,
        Value::Null => Map::new(),
        _ => {
            return Err(EndpointError::BadInput(
                "the body must be a JSON object".into(),
            ));
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        let shown: String = k.chars().take(40).collect();
        return Err(EndpointError::BadInput(format!(
            "unknown field {shown:?}; the fields are {}",
            allowed.join(", ")
        )));
    }
    Ok(obj)
}

/// Field `name` of `obj` as a `T` (absent or null: `None`); the error names it.
fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, EndpointError> {
    obj.get(name)
        .filter(|v| !v.is_null())
        .map(|v| {
            serde_json::from_value(v.clone())
                .map_err(|e| EndpointError::BadInput(format!("{name}: {e}")))
        })
        .transpose()
}

impl NewEndpoint {
    /// From a request body: `url`, `event_types`, `description`, `enabled`.
    pub fn from_json(v: Value) -> Result<Self, EndpointError> {
        let o = object(v, &["url", "event_types", "description", "enabled"])?;
        Ok(NewEndpoint {
            url: field(&o, "url")?.unwrap_or_default(),
            event_types: field(&o, "event_types")?.unwrap_or_default(),
            description: field(&o, "description")?,
            enabled: field(&o, "enabled")?,
        })
    }
}

impl EndpointChange {
    /// From a request body: any of `url`, `event_types`, `description`, `enabled`.
    pub fn from_json(v: Value) -> Result<Self, EndpointError> {
        let o = object(v, &["url", "event_types", "description", "enabled"])?;
        Ok(EndpointChange {
            url: field(&o, "url")?,
            event_types: field(&o, "event_types")?,
            description: field(&o, "description")?,
            enabled: field(&o, "enabled")?,
        })
    }
}

fn check_url(policy: &Policy, url: &str) -> Result<String, EndpointError> {
    if url.trim().is_empty() {
        return Err(EndpointError::BadInput("url is required".into()));
    }
    if url.len() > 2000 {
        return Err(EndpointError::BadInput(
            "url must be at most 2000 characters".into(),
        ));
    }
    policy
        .check_url(url)
        .map(|u| u.to_string())
        .map_err(|e| EndpointError::BadInput(e.to_string()))
}

fn check_description(d: &str) -> Result<(), EndpointError> {
    if d.chars().count() > 200 || d.chars().any(char::is_control) {
        return Err(EndpointError::BadInput(
            "description must be at most 200 characters, without control characters".into(),
        ));
    }
    Ok(())
}

/// Registers an endpoint; its id and its secret (shown once).
pub async fn register(
    pool: &PgPool,
    policy: &Policy,
    new: &NewEndpoint,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(i64, SecretString), EndpointError> {
    let url = check_url(policy, &new.url)?;
    check_event_types(&new.event_types).map_err(|e| EndpointError::BadInput(e.to_string()))?;
    let description = new.description.clone().unwrap_or_default();
    check_description(&description)?;
    let secret = sign::new_secret();
    let mut tx = pool.begin().await?;
    let id = webhook_endpoints::create(
        &mut *tx,
        &url,
        &description,
        &new.event_types,
        new.enabled.unwrap_or(true),
        secret.expose_secret(),
        now,
    )
    .await?;
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_endpoint.create",
        &id.to_string(),
        json!({"url": url, "event_types": new.event_types}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok((id, secret))
}

/// Changes an endpoint.
pub async fn change(
    pool: &PgPool,
    policy: &Policy,
    id: i64,
    c: &EndpointChange,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), EndpointError> {
    let url = c.url.as_deref().map(|u| check_url(policy, u)).transpose()?;
    if let Some(t) = &c.event_types {
        check_event_types(t).map_err(|e| EndpointError::BadInput(e.to_string()))?;
    }
    if let Some(d) = &c.description {
        check_description(d)?;
    }
    let mut tx = pool.begin().await?;
    let found = webhook_endpoints::update(
        &mut *tx,
        id,
        url.as_deref(),
        c.description.as_deref(),
        c.event_types.as_deref(),
        c.enabled,
        now,
    )
    .await?;
    if !found {
        return Err(EndpointError::NotFound(id));
    }
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_endpoint.update",
        &id.to_string(),
        json!({"url": url, "event_types": c.event_types, "enabled": c.enabled}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes an endpoint and its messages.
pub async fn remove(
    pool: &PgPool,
    id: i64,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), EndpointError> {
    let mut tx = pool.begin().await?;
    if !webhook_endpoints::delete(&mut *tx, id).await? {
        return Err(EndpointError::NotFound(id));
    }
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_endpoint.delete",
        &id.to_string(),
        json!({}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Rotates an endpoint's secret: the new one (shown once) signs from now,
/// the old one too until the returned time.
pub async fn rotate(
    pool: &PgPool,
    id: i64,
    overlap_secs: u64,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(SecretString, DateTime<Utc>), EndpointError> {
    if overlap_secs > 30 * 86_400 {
        return Err(EndpointError::BadInput(
            "overlap_secs must be at most 2592000 (30 days)".into(),
        ));
    }
    let (secret, until) = super::rotation(now, std::time::Duration::from_secs(overlap_secs));
    let mut tx = pool.begin().await?;
    if !webhook_endpoints::rotate(&mut *tx, id, secret.expose_secret(), until, now).await? {
        return Err(EndpointError::NotFound(id));
    }
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_endpoint.rotate_secret",
        &id.to_string(),
        json!({"previous_until": until}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok((secret, until))
}

/// Sends message `id` again now, whatever its status (a new attempt in its
/// log); audited.
pub async fn replay(
    pool: &PgPool,
    id: i64,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), EndpointError> {
    let mut tx = pool.begin().await?;
    if !webhook_deliveries::replay(&mut *tx, id, now).await? {
        return Err(EndpointError::MessageNotFound(id));
    }
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_delivery.replay",
        &id.to_string(),
        json!({}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Sends again now every message to endpoint `id` created since `since`;
/// how many. Audited.
pub async fn replay_since(
    pool: &PgPool,
    id: i64,
    since: DateTime<Utc>,
    actor: &str,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<u64, EndpointError> {
    let mut tx = pool.begin().await?;
    if webhook_endpoints::get(&mut *tx, id).await?.is_none() {
        return Err(EndpointError::NotFound(id));
    }
    let n = webhook_deliveries::replay_since(&mut *tx, id, since, now).await?;
    audit::record(
        &mut *tx,
        now,
        actor,
        "webhook_endpoint.replay",
        &id.to_string(),
        json!({"since": since, "replayed": n}),
        source,
    )
    .await?;
    tx.commit().await?;
    Ok(n)
}
