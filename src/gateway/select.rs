//! Picks the gateway adapter by configuration (`gateway.kind`) and checks
//! that adapter's settings at load, so a fleet pointed at Stripe test mode
//! needs nothing but configuration and a bad setting names its key.

use std::sync::Arc;

use secrecy::ExposeSecret;

use super::{
    Gateway, http::HttpGateway, release_funds::ReleaseFundsGateway, stripe::StripeGateway,
};
use crate::config::GatewaySettings;

/// The kinds `gateway.kind` accepts.
pub const KINDS: [&str; 3] = ["contract", "stripe", "release_funds"];

/// What `gateway.release_funds.status_map` values may say.
pub const STATUS_MEANINGS: [&str; 5] = ["paid", "in_transit", "permanent", "transient", "unknown"];

/// The secret the built-in defaults carry for the local mock gateway.
pub const MOCK_SECRET: &str = "sk_test_mock";

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
fn check_url(key: &str, raw: &str, also: &[String]) -> Result<bool, String> {
    let url = reqwest::Url::parse(raw).map_err(|_| format!("{key} must be an http(s) URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{key} must be an http(s) URL with a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{key} must not hold a user or password (credentials go in the secret settings)"
        ));
    }
    let local = local_host(&url, also);
    if url.scheme() == "http" && !local {
        return Err(format!(
            "{key} must be https:// (plain http only to loopback or a host in gateway.insecure_http_hosts)"
        ));
    }
    Ok(local)
}

/// Webhook signing secrets: none empty, none shorter than 16 characters
/// (an empty secret let anyone sign events).
fn check_webhook_secrets(key: &str, secrets: &[secrecy::SecretString]) -> Result<(), String> {
    if secrets.iter().any(|s| s.expose_secret().trim().len() < 16) {
        return Err(format!(
            "{key}: every secret must be at least 16 characters (an empty one would let anyone sign events)"
        ));
    }
    Ok(())
}

/// Checks the settings of the selected adapter; the error names the bad key.
pub fn validate(g: &GatewaySettings) -> Result<(), String> {
    if !KINDS.contains(&g.kind.as_str()) {
        return Err(format!(
            "gateway.kind must be one of \"contract\", \"stripe\", \"release_funds\" (got {:?})",
            g.kind
        ));
    }
    if g.webhooks.tolerance_secs == 0 || g.webhooks.tolerance_secs > 3600 {
        return Err("gateway.webhooks.tolerance_secs must be 1..=3600".into());
    }
    if g.sync.interval_secs == 0 {
        return Err("gateway.sync.interval_secs must be >= 1".into());
    }
    if !(1..=1000).contains(&g.sync.batch) {
        return Err("gateway.sync.batch must be 1..=1000".into());
    }
    for (code, meaning) in &g.release_funds.status_map {
        if !code.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) {
            return Err(format!(
                "gateway.release_funds.status_map: {code:?} is not an HTTP status code"
            ));
        }
        if !STATUS_MEANINGS.contains(&meaning.as_str()) {
            return Err(format!(
                "gateway.release_funds.status_map.{code} must be one of paid, in_transit, permanent, transient, unknown (got {meaning:?})"
            ));
        }
    }
    check_webhook_secrets("gateway.webhooks.secrets", &g.webhooks.secrets)?;
    check_webhook_secrets("gateway.stripe.webhook_secrets", &g.stripe.webhook_secrets)?;
    let also = &g.insecure_http_hosts;
    match g.kind.as_str() {
        "stripe" => {
            let s = &g.stripe;
            let key = s.secret_key.expose_secret();
            if !(key.starts_with("sk_") || key.starts_with("rk_")) {
                return Err(
                    "gateway.stripe.secret_key must be a Stripe secret key (sk_test_…, sk_live_… or rk_…)"
                        .into(),
                );
            }
            if s.stripe_version.trim().is_empty() {
                return Err(
                    "gateway.stripe.stripe_version must pin an API version (e.g. 2025-04-30.basil)"
                        .into(),
                );
            }
            check_url("gateway.stripe.base_url", &s.base_url, also)?;
        }
        "release_funds" => {
            let r = &g.release_funds;
            check_url("gateway.release_funds.base_url", &r.base_url, also)?;
            if !r.endpoint.starts_with('/') {
                return Err("gateway.release_funds.endpoint must start with '/'".into());
            }
            if !(r.lookup_endpoint.is_empty() || r.lookup_endpoint.starts_with('/')) {
                return Err(
                    "gateway.release_funds.lookup_endpoint must be empty or start with '/'".into(),
                );
            }
            if !(r.account_endpoint.is_empty()
                || (r.account_endpoint.starts_with('/')
                    && r.account_endpoint.contains("{account}")))
            {
                return Err(
                    "gateway.release_funds.account_endpoint must be empty or a path starting with '/' that holds {account}"
                        .into(),
                );
            }
            for (key, codes) in [
                ("not_onboarded_codes", &r.not_onboarded_codes),
                ("balance_codes", &r.balance_codes),
            ] {
                if codes.iter().any(|c| c.trim().is_empty() || c.trim() != c) {
                    return Err(format!(
                        "gateway.release_funds.{key} must hold non-empty codes without spaces around them"
                    ));
                }
            }
        }
        _ => {
            let local = check_url("gateway.base_url", &g.base_url, also)?;
            if !local && g.secret.expose_secret() == MOCK_SECRET {
                return Err(format!(
                    "gateway.secret is the local mock gateway's ({MOCK_SECRET}); set the real gateway's secret"
                ));
            }
        }
    }
    Ok(())
}

/// The adapter `settings.kind` names, behind the [`Gateway`] trait.
pub fn build(settings: &GatewaySettings) -> anyhow::Result<Arc<dyn Gateway>> {
    validate(settings).map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(match settings.kind.as_str() {
        "stripe" => Arc::new(StripeGateway::new(settings)?),
        "release_funds" => Arc::new(ReleaseFundsGateway::new(settings)?),
        _ => Arc::new(HttpGateway::new(settings)?),
    })
}

/// [`build`], every HTTP request of which (look-ups, account checks,
/// transfers) waits for the fleet-wide limiter on Redis (`conn`, keys under
/// `prefix`) that the workers share: for clients that are not behind a
/// worker's guard (the in-transit poll, `payoutctl reconcile`, a cancel's look-up).
pub fn build_limited(
    settings: &GatewaySettings,
    conn: redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Arc<dyn Gateway>> {
    let gateway = build(settings)?;
    gateway.use_limiter(fleet_limiter(settings, conn, prefix));
    Ok(gateway)
}

/// The fleet-wide limiter of `settings`' gateway on Redis (see [`build_limited`]).
pub fn fleet_limiter(
    settings: &GatewaySettings,
    conn: redis::aio::ConnectionManager,
    prefix: &str,
) -> Arc<dyn crate::gateway::RequestLimiter> {
    Arc::new(crate::gateway::guard::FleetLimiter::new(
        conn,
        prefix,
        crate::gateway::guard::limits(settings),
    ))
}

/// The onboarding check of the selected adapter, when it has one (Stripe:
/// the connected account's `transfers` capability; release-funds: its
/// `account_endpoint`, when configured), for
/// [`crate::services::sync::InTransitSync::release_onboarded`].
pub fn account_check(
    settings: &GatewaySettings,
) -> anyhow::Result<Option<Arc<dyn crate::services::sync::AccountCheck>>> {
    account_check_limited(settings, None)
}

/// [`account_check`]; with `limiter`, each of its requests waits for it (see
/// [`build_limited`]).
pub fn account_check_limited(
    settings: &GatewaySettings,
    limiter: Option<Arc<dyn crate::gateway::RequestLimiter>>,
) -> anyhow::Result<Option<Arc<dyn crate::services::sync::AccountCheck>>> {
    Ok(match settings.kind.as_str() {
        "stripe" => {
            let gw = StripeGateway::new(settings)?;
            if let Some(l) = limiter {
                gw.use_limiter(l);
            }
            Some(Arc::new(gw))
        }
        "release_funds" => {
            let gw = ReleaseFundsGateway::new(settings)?;
            gw.has_account_check()
                .then(|| Arc::new(gw) as Arc<dyn crate::services::sync::AccountCheck>)
        }
        _ => None,
    })
}

/// Why the selected adapter cannot look transfers up at all, if it cannot
/// (a release-funds API with no `lookup_endpoint`): reconciliation is then a
/// failed run, not a fresh one.
pub fn lookup_unavailable(settings: &GatewaySettings) -> Option<String> {
    (settings.kind == "release_funds" && settings.release_funds.lookup_endpoint.is_empty()).then(
        || {
            "the release-funds API has no look-up endpoint configured \
             (gateway.release_funds.lookup_endpoint): nothing can be compared"
                .to_string()
        },
    )
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn load(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let env: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, &env)
    }

    /// Security finding 6: the loopback check was a string prefix, plain
    /// http carried the bearer secret to any host, the mock's secret went to
    /// whatever base_url was set, and an empty webhook secret let anyone sign.
    #[test]
    fn secrets_go_only_over_https_to_a_real_host_and_webhook_secrets_are_real() {
        let err = |pairs: &[(&str, &str)]| load(pairs).unwrap_err().to_string();
        let e = err(&[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", "sk_test_abc"),
            (
                "PAYOUTS_GATEWAY__STRIPE__BASE_URL",
                "http://localhost@evil.example",
            ),
        ]);
        assert!(e.contains("gateway.stripe.base_url"), "{e}");
        assert!(!e.contains("evil.example"), "the URL is not echoed: {e}");
        let e = err(&[
            ("PAYOUTS_GATEWAY__BASE_URL", "http://gateway.example.com"),
            ("PAYOUTS_GATEWAY__SECRET", "sk_real_secret_value"),
        ]);
        assert!(e.contains("must be https://"), "{e}");
        let e = err(&[("PAYOUTS_GATEWAY__BASE_URL", "https://gateway.example.com")]);
        assert!(e.contains("gateway.secret is the local mock"), "{e}");
        assert!(
            load(&[
                ("PAYOUTS_GATEWAY__BASE_URL", "https://gateway.example.com"),
                ("PAYOUTS_GATEWAY__SECRET", "sk_real_secret_value"),
            ])
            .is_ok()
        );
        // A compose network's mock, declared as such.
        assert!(
            load(&[
                ("PAYOUTS_GATEWAY__BASE_URL", "http://mock-gateway:8085"),
                ("PAYOUTS_GATEWAY__INSECURE_HTTP_HOSTS", "mock-gateway"),
            ])
            .is_ok()
        );
        let e = err(&[
            ("PAYOUTS_GATEWAY__KIND", "release_funds"),
            (
                "PAYOUTS_GATEWAY__RELEASE_FUNDS__BASE_URL",
                "http://10.0.0.7",
            ),
        ]);
        assert!(e.contains("gateway.release_funds.base_url"), "{e}");
        let e = err(&[("PAYOUTS_GATEWAY__WEBHOOKS__SECRETS", r#"[""]"#)]);
        assert!(e.contains("gateway.webhooks.secrets"), "{e}");
        let e = err(&[("PAYOUTS_GATEWAY__STRIPE__WEBHOOK_SECRETS", "whsec_short")]);
        assert!(e.contains("gateway.stripe.webhook_secrets"), "{e}");
        assert!(!e.contains("whsec_short"), "{e}");
    }

    #[test]
    fn stripe_test_mode_needs_only_the_kind_and_a_test_key() {
        let s = load(&[
            ("PAYOUTS_GATEWAY__KIND", "stripe"),
            ("PAYOUTS_GATEWAY__STRIPE__SECRET_KEY", "sk_test_abc"),
        ])
        .unwrap();
        assert_eq!(s.gateway.stripe.base_url, "https://api.stripe.com");
        let gw = super::build(&s.gateway).unwrap();
        let dbg = format!("{gw:?} {s:?}");
        assert!(dbg.contains("StripeGateway"), "{dbg}");
        assert!(!dbg.contains("sk_test_abc"), "the key leaked: {dbg}");
    }

    #[test]
    fn an_unknown_kind_or_a_missing_stripe_key_names_the_key() {
        let e = load(&[("PAYOUTS_GATEWAY__KIND", "paypal")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.kind"), "{e}");
        let e = load(&[("PAYOUTS_GATEWAY__KIND", "stripe")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.stripe.secret_key"), "{e}");
        let e = load(&[
            ("PAYOUTS_GATEWAY__KIND", "release_funds"),
            ("PAYOUTS_GATEWAY__RELEASE_FUNDS__STATUS_MAP__409", "maybe"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("status_map.409"), "{e}");
    }

    #[test]
    fn release_funds_defaults_follow_the_booking_worker() {
        let s = load(&[("PAYOUTS_GATEWAY__KIND", "release_funds")]).unwrap();
        assert_eq!(
            s.gateway.release_funds.endpoint,
            "/api/Payment/release-funds"
        );
        // "Insufficient Funds: check platform Stripe account balance": the
        // platform's problem, retried later, never the driver's failure.
        assert_eq!(
            s.gateway
                .release_funds
                .status_map
                .get("402")
                .map(String::as_str),
            Some("transient")
        );
        assert!(super::account_check(&s.gateway).unwrap().is_none());
        assert!(super::lookup_unavailable(&s.gateway).is_some());
        let gw = super::build(&s.gateway).unwrap();
        assert!(format!("{gw:?}").contains("ReleaseFundsGateway"));
    }
}
