//! Picks the gateway adapter by configuration (`gateway.kind`, checked at
//! load by `config::validate_gateway`), so a fleet pointed at Stripe test
//! mode needs nothing but configuration.

use std::sync::Arc;

use super::{
    Gateway, Lookup, http::HttpGateway, release_funds::ReleaseFundsGateway, stripe::StripeGateway,
};
use crate::config::{GatewayKind, GatewaySettings};

/// The adapter `settings.kind` names, behind the [`Gateway`] trait.
pub fn build(settings: &GatewaySettings) -> anyhow::Result<Arc<dyn Gateway>> {
    crate::config::validate_gateway(settings)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(match settings.kind {
        GatewayKind::Stripe => Arc::new(StripeGateway::new(settings)?),
        GatewayKind::ReleaseFunds => Arc::new(ReleaseFundsGateway::new(settings)?),
        GatewayKind::Contract => Arc::new(HttpGateway::new(settings)?),
    })
}

/// The look-up half only ([`Lookup`]) of the adapter `settings.kind` names:
/// for everything that asks the gateway but must never pay (the producer's
/// in-transit poll, reconciliation, a cancel's look-up). Its requests keep to
/// the configured limits in this process alone; see [`lookup_limited`].
pub fn build_lookup(settings: &GatewaySettings) -> anyhow::Result<Arc<dyn Lookup>> {
    Ok(build(settings)?)
}

/// [`build_lookup`], every HTTP request of which (look-ups, account checks)
/// waits for the fleet-wide limiter on Redis (`conn`, keys under `prefix`)
/// that the workers share.
pub fn lookup_limited(
    settings: &GatewaySettings,
    conn: redis::aio::ConnectionManager,
    prefix: &str,
) -> anyhow::Result<Arc<dyn Lookup>> {
    let gateway = build_lookup(settings)?;
    gateway.use_limiter(fleet_limiter(settings, conn, prefix));
    Ok(gateway)
}

/// The fleet-wide limiter of `settings`' gateway on Redis (see [`lookup_limited`]).
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
) -> anyhow::Result<Option<Arc<dyn crate::gateway::AccountCheck>>> {
    account_check_limited(settings, None)
}

/// [`account_check`]; with `limiter`, each of its requests waits for it (see
/// [`lookup_limited`]).
pub fn account_check_limited(
    settings: &GatewaySettings,
    limiter: Option<Arc<dyn crate::gateway::RequestLimiter>>,
) -> anyhow::Result<Option<Arc<dyn crate::gateway::AccountCheck>>> {
    Ok(match settings.kind {
        GatewayKind::Stripe => {
            let gw = StripeGateway::new(settings)?;
            if let Some(l) = limiter {
                gw.use_limiter(l);
            }
            Some(Arc::new(gw))
        }
        GatewayKind::ReleaseFunds => {
            let gw = ReleaseFundsGateway::new(settings)?;
            gw.has_account_check()
                .then(|| Arc::new(gw) as Arc<dyn crate::gateway::AccountCheck>)
        }
        GatewayKind::Contract => None,
    })
}

/// Why the selected adapter cannot look transfers up at all, if it cannot
/// (a release-funds API with no `lookup_endpoint`): reconciliation is then a
/// failed run, not a fresh one.
pub fn lookup_unavailable(settings: &GatewaySettings) -> Option<String> {
    (settings.kind == GatewayKind::ReleaseFunds
        && settings.release_funds.lookup_endpoint.is_empty())
    .then(|| {
        "the release-funds API has no look-up endpoint configured \
             (gateway.release_funds.lookup_endpoint): nothing can be compared"
            .to_string()
    })
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
