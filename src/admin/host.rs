//! The `Host` check of the admin listener (DNS rebinding, ASVS V14.5).
//!
//! A page on another site can point its own DNS name at the admin address
//! and read whatever the listener answers without credentials (`/metrics`,
//! `/health/ready`, the login page). The browser then sends that name as
//! `Host`, so the listener answers only names it knows: IP addresses (what
//! Prometheus, probes and port-forwards send), single-label names
//! (`localhost`, `payout-admin`, a compose service), cluster names
//! (`*.svc`, `*.svc.cluster.local`, `*.localhost`) and the names listed in
//! `admin.allowed_hosts` (the dashboard's public name behind an ingress).
//! Anything else gets `421 Misdirected Request`, counted in
//! `payout_admin_refused_total{reason="host"}` and logged with its source.

use std::net::IpAddr;

use axum::{
    Json,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;

/// The names a listener answers, besides the built-in kinds.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Vec<String>,
    client_ip_header: String,
}

impl AllowedHosts {
    /// From `admin.allowed_hosts` (and the client-IP header, for the log).
    pub fn new(names: &[String], client_ip_header: &str) -> Self {
        AllowedHosts {
            names: names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            client_ip_header: client_ip_header.to_string(),
        }
    }

    /// Whether a `Host` header value (with or without a port) is answered.
    pub fn allows(&self, host: &str) -> bool {
        let Some(name) = strip_port(host) else {
            return false;
        };
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !valid_name(&name) {
            return false;
        }
        !name.contains('.')
            || [".svc", ".svc.cluster.local", ".localhost"]
                .iter()
                .any(|s| name.ends_with(s))
            || self.names.contains(&name)
    }
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` -> the name or address.
fn strip_port(host: &str) -> Option<&str> {
    if let Some(rest) = host.strip_prefix('[') {
        let (addr, tail) = rest.split_once(']')?;
        return (tail.is_empty() || tail.strip_prefix(':').is_some_and(is_port)).then_some(addr);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => Some(name),
        Some(_) => None,
        None => Some(host),
    }
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

pub use crate::config::valid_host_name as valid_name;

/// Middleware: 421 for a `Host` the listener does not answer. A request
/// without `Host` (HTTP/1.0) passes: a browser always sends one.
pub async fn check(State(allowed): State<AllowedHosts>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).map(|v| v.to_str());
    match host {
        None => next.run(req).await,
        Some(Ok(h)) if allowed.allows(h) => next.run(req).await,
        Some(h) => {
            let source =
                super::limits::source(req.extensions(), req.headers(), &allowed.client_ip_header);
            let shown: String = h
                .unwrap_or("(not text)")
                .chars()
                .take(100)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            crate::metrics::ADMIN_REFUSED
                .with_label_values(&["host"])
                .inc();
            tracing::warn!(%source, host = %shown, path = %super::api::short(req.uri().path()), "request refused: Host is not one of admin.allowed_hosts");
            (
                StatusCode::MISDIRECTED_REQUEST,
                Json(json!({"error": "this server does not answer that Host name; add it to admin.allowed_hosts"})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_single_labels_cluster_names_and_listed_names_are_answered() {
        let a = AllowedHosts::new(&["Payouts.Example.com".into()], "");
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9300",
            "10.1.2.3:9300",
            "[::1]:9300",
            "[fe80::1]",
            "localhost",
            "localhost:9300",
            "payout-admin:9300",
            "payout-admin.payouts.svc:9300",
            "payout-admin.payouts.svc.cluster.local",
            "dash.localhost",
            "payouts.example.com",
            "PAYOUTS.example.com.:443",
        ] {
            assert!(a.allows(ok), "{ok} must be answered");
        }
    }

    #[test]
    fn other_names_and_malformed_hosts_are_refused() {
        let a = AllowedHosts::new(&["payouts.example.com".into()], "");
        for bad in [
            "evil.example",
            "evil.example:9300",
            "payouts.example.com.evil.example",
            "xpayouts.example.com",
            "svc.evil.example",
            "a b",
            "",
            "host:port",
            "[::1",
            "[::1]x",
            "127.0.0.1:99999999",
            "user@payouts.example.com",
        ] {
            assert!(!a.allows(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn configured_names_are_validated() {
        assert!(valid_name("payouts.example.com"));
        assert!(!valid_name("https://payouts.example.com"));
        assert!(!valid_name("payouts.example.com:443"));
        assert!(!valid_name(""));
    }
}
