//! The gateway settings' checks, at load: the selected adapter's URLs,
//! keys, codes and webhook secrets. Every error names its key and never the
//! value (which may be a secret).

use secrecy::ExposeSecret;

use super::{GatewayKind, GatewaySettings};

/// What `gateway.release_funds.status_map` values may say.
pub const STATUS_MEANINGS: [&str; 5] = ["paid", "in_transit", "permanent", "transient", "unknown"];

/// The secret the built-in defaults carry for the local mock gateway.
pub const MOCK_SECRET: &str = "sk_test_mock";

/// A gateway setting refused at load. The text names the key and never
/// the value (which may be a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewaySettingsError {
    /// A setting breaks its rule (a range, a form); `rule` says which, as
    /// "must …".
    #[error("{key} {rule}")]
    Rule {
        /// The setting.
        key: String,
        /// What it must be.
        rule: &'static str,
    },
    /// A `gateway.release_funds.status_map` key that is no HTTP status.
    #[error("gateway.release_funds.status_map: {0:?} is not an HTTP status code")]
    StatusCode(String),
    /// A `gateway.release_funds.status_map` value that is none of [`STATUS_MEANINGS`].
    #[error(
        "gateway.release_funds.status_map.{code} must be one of paid, in_transit, permanent, transient, unknown (got {meaning:?})"
    )]
    StatusMeaning {
        /// The status.
        code: String,
        /// What it was mapped to.
        meaning: String,
    },
    /// A webhook signing secret shorter than 16 characters.
    #[error(
        "{0}: every secret must be at least 16 characters (an empty one would let anyone sign events)"
    )]
    WeakWebhookSecret(&'static str),
    /// A remote contract gateway with the local mock's secret.
    #[error(
        "gateway.secret is the local mock gateway's ({}); set the real gateway's secret",
        MOCK_SECRET
    )]
    MockSecret,
}

fn rule(key: impl Into<String>, rule: &'static str) -> GatewaySettingsError {
    GatewaySettingsError::Rule {
        key: key.into(),
        rule,
    }
}

/// Whether `url`'s host (parsed, not a string prefix: the user part of
/// `http://localhost@evil.example` is no host) is a loopback address or
/// `localhost`, or one of `also`.
fn local_host(url: &reqwest::Url, also: &[String]) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || also.iter().any(|h| h.eq_ignore_ascii_case(d))
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || also.iter().any(|h| *h == ip.to_string()),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Checks a gateway base URL: `http(s)://` with a host and no user part,
/// and `https://` unless the host is local (loopback or `also`). Answers
/// whether the host is local. The error names `key` and never the URL
/// (which may hold a secret).
fn check_url(key: &str, raw: &str, also: &[String]) -> Result<bool, GatewaySettingsError> {
    let url = reqwest::Url::parse(raw).map_err(|_| rule(key, "must be an http(s) URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(rule(key, "must be an http(s) URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(rule(
            key,
            "must not hold a user or password (credentials go in the secret settings)",
        ));
    }
    let local = local_host(&url, also);
    if url.scheme() == "http" && !local {
        return Err(rule(
            key,
            "must be https:// (plain http only to loopback or a host in gateway.insecure_http_hosts)",
        ));
    }
    Ok(local)
}

/// Webhook signing secrets: none empty, none shorter than 16 characters
/// (an empty secret let anyone sign events).
fn check_webhook_secrets(
    key: &'static str,
    secrets: &[secrecy::SecretString],
) -> Result<(), GatewaySettingsError> {
    if secrets.iter().any(|s| s.expose_secret().trim().len() < 16) {
        return Err(GatewaySettingsError::WeakWebhookSecret(key));
    }
    Ok(())
}

/// Checks the settings of the selected adapter; the error names the bad key.
pub fn validate_gateway(g: &GatewaySettings) -> Result<(), GatewaySettingsError> {
    if g.webhooks.tolerance_secs == 0 || g.webhooks.tolerance_secs > 3600 {
        return Err(rule("gateway.webhooks.tolerance_secs", "must be 1..=3600"));
    }
    if g.sync.interval_secs == 0 {
        return Err(rule("gateway.sync.interval_secs", "must be >= 1"));
    }
    if !(1..=1000).contains(&g.sync.batch) {
        return Err(rule("gateway.sync.batch", "must be 1..=1000"));
    }
    for (code, meaning) in &g.release_funds.status_map {
        if !code.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) {
            return Err(GatewaySettingsError::StatusCode(code.clone()));
        }
        if !STATUS_MEANINGS.contains(&meaning.as_str()) {
            return Err(GatewaySettingsError::StatusMeaning {
                code: code.clone(),
                meaning: meaning.clone(),
            });
        }
    }
    check_webhook_secrets("gateway.webhooks.secrets", &g.webhooks.secrets)?;
    check_webhook_secrets("gateway.stripe.webhook_secrets", &g.stripe.webhook_secrets)?;
    let also = &g.insecure_http_hosts;
    match g.kind {
        GatewayKind::Stripe => {
            let s = &g.stripe;
            let key = s.secret_key.expose_secret();
            if !(key.starts_with("sk_") || key.starts_with("rk_")) {
                return Err(rule(
                    "gateway.stripe.secret_key",
                    "must be a Stripe secret key (sk_test_…, sk_live_… or rk_…)",
                ));
            }
            if s.stripe_version.trim().is_empty() {
                return Err(rule(
                    "gateway.stripe.stripe_version",
                    "must pin an API version (e.g. 2025-04-30.basil)",
                ));
            }
            check_url("gateway.stripe.base_url", &s.base_url, also)?;
        }
        GatewayKind::ReleaseFunds => {
            let r = &g.release_funds;
            check_url("gateway.release_funds.base_url", &r.base_url, also)?;
            if !r.endpoint.starts_with('/') {
                return Err(rule(
                    "gateway.release_funds.endpoint",
                    "must start with '/'",
                ));
            }
            if !(r.lookup_endpoint.is_empty() || r.lookup_endpoint.starts_with('/')) {
                return Err(rule(
                    "gateway.release_funds.lookup_endpoint",
                    "must be empty or start with '/'",
                ));
            }
            if !(r.account_endpoint.is_empty()
                || (r.account_endpoint.starts_with('/')
                    && r.account_endpoint.contains("{account}")))
            {
                return Err(rule(
                    "gateway.release_funds.account_endpoint",
                    "must be empty or a path starting with '/' that holds {account}",
                ));
            }
            for (key, codes) in [
                ("not_onboarded_codes", &r.not_onboarded_codes),
                ("balance_codes", &r.balance_codes),
            ] {
                if codes.iter().any(|c| c.trim().is_empty() || c.trim() != c) {
                    return Err(rule(
                        format!("gateway.release_funds.{key}"),
                        "must hold non-empty codes without spaces around them",
                    ));
                }
            }
        }
        GatewayKind::Contract => {
            let local = check_url("gateway.base_url", &g.base_url, also)?;
            if !local && g.secret.expose_secret() == MOCK_SECRET {
                return Err(GatewaySettingsError::MockSecret);
            }
        }
    }
    Ok(())
}
