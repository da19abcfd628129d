//! Per-source limits on failed authentication (OWASP ASVS 4.0 V2.2.1): a
//! source that sends more than `admin.auth_failures_per_minute` bad bearer
//! tokens or bad logins is locked out for `admin.lockout_secs`, and while it
//! is, its requests with credentials are answered 429 before any Postgres
//! round trip. Without this, 600 bad logins in 5 s were 600 Postgres look-ups,
//! none logged.
//!
//! The failure budget is a GCRA per source (`governor`, keyed by address):
//! the burst is the per-minute figure and it refills evenly. The source is
//! the TCP peer, or, behind a proxy the operator trusts, the last address of
//! `admin.client_ip_header` (e.g. `x-forwarded-for`); a lockout keyed by a
//! proxy's address would lock everybody out.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    sync::Mutex,
    time::Duration,
};

use axum::{extract::ConnectInfo, http::Extensions, http::HeaderMap};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// Locked sources kept before the expired ones are pruned.
const PRUNE_AT: usize = 4096;

/// Failed-authentication budget and lockouts, per source address.
pub struct Lockout {
    failures: DefaultKeyedRateLimiter<IpAddr>,
    locked: Mutex<HashMap<IpAddr, Instant>>,
    lockout: Duration,
}

impl std::fmt::Debug for Lockout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockout")
            .field("lockout", &self.lockout)
            .finish_non_exhaustive()
    }
}

impl Lockout {
    /// `per_minute` failures (as a burst, refilled evenly), then `lockout`.
    pub fn new(per_minute: u32, lockout: Duration) -> Self {
        let n = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
        Lockout {
            failures: RateLimiter::keyed(Quota::per_minute(n)),
            locked: Mutex::new(HashMap::new()),
            lockout,
        }
    }

    /// How much longer `source` is locked out, if it is.
    pub fn locked(&self, source: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let locked = self.locked.lock().expect("lockout map");
        locked
            .get(&source)
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Records one failed authentication from `source`; `true` when it used
    /// up the budget and locked the source out.
    pub fn failed(&self, source: IpAddr) -> bool {
        if self.failures.check_key(&source).is_ok() {
            return false;
        }
        let now = Instant::now();
        let mut locked = self.locked.lock().expect("lockout map");
        if locked.len() >= PRUNE_AT {
            locked.retain(|_, until| *until > now);
            self.failures.retain_recent();
        }
        locked.insert(source, now + self.lockout);
        true
    }
}

/// The request's source: the last address of `client_ip_header` when one is
/// configured and present, else the TCP peer, else (a router served without
/// peer addresses, as in unit tests) the unspecified address.
pub fn source(extensions: &Extensions, headers: &HeaderMap, client_ip_header: &str) -> IpAddr {
    if !client_ip_header.is_empty() {
        let forwarded = headers
            .get_all(client_ip_header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .next_back();
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_locked_out_after_its_budget_and_others_are_not() {
        let l = Lockout::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(!l.failed(a));
        assert!(!l.failed(a));
        assert!(!l.failed(a));
        assert!(l.locked(a).is_none());
        assert!(l.failed(a), "the fourth failure within a minute locks it");
        assert!(l.locked(a).is_some_and(|d| d > Duration::from_secs(50)));
        assert!(l.locked(b).is_none());
        assert!(!l.failed(b));
    }

    #[test]
    fn the_forwarded_header_counts_only_when_configured() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.1.1.1".parse().unwrap());
        let mut ext = Extensions::new();
        ext.insert(ConnectInfo::<SocketAddr>("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(source(&ext, &h, ""), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            source(&ext, &h, "x-forwarded-for"),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }
}
