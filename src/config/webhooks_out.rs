//! `[webhooks_out]`: outbound webhooks to the platform (Standard Webhooks),
//! delivered by the worker that holds the delivery lease.

use serde::Deserialize;

/// Outbound webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksOutSettings {
    /// Run the fan-out and the deliverer in the worker processes (one of
    /// them at a time, by lease).
    pub enabled: bool,
    /// How often the lease holder fans out and delivers, in ms.
    pub tick_ms: u64,
    /// The delivery lease, in seconds: a standby worker takes over within it.
    /// The holder renews it (and its messages' leases) every third of it
    /// while a batch is in flight; it must exceed one message's worst case,
    /// `timeout_ms` x (1 + `immediate_retries`), by 5 s (checked at load).
    pub lease_secs: u64,
    /// Most events one fan-out pass reads.
    pub fanout_batch: i64,
    /// Most messages one pass claims.
    pub delivery_batch: i64,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Delivery yields to payouts: while the worker holding the delivery
    /// lease is paying payouts, the fan-out waits, up to this many seconds at
    /// a time, then sends everything that waited before it yields again (so
    /// a drain does not share its cores with delivery, and no message waits
    /// much longer than this). 0: never wait.
    pub yield_secs: u64,
    /// TCP + TLS connect timeout, in ms.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout (answer included), in ms.
    pub timeout_ms: u64,
    /// Most bytes of an answer read (the rest is dropped); the log keeps at
    /// most 512 characters of them.
    pub response_cap_bytes: usize,
    /// Retries within one attempt, at once, after a failure or a timeout
    /// (the schedule's "immediately").
    pub immediate_retries: usize,
    /// Then the delays between attempts, in seconds; after the last the
    /// message is failed.
    pub retry_schedule_secs: Vec<u64>,
    /// An endpoint every attempt to which has failed for this long is
    /// disabled, in seconds (5 days).
    pub disable_after_secs: u64,
    /// After a rotation, how long the previous secret keeps signing, in
    /// seconds (when the rotation does not say).
    pub rotation_overlap_secs: u64,
    /// Private address ranges (CIDR, e.g. "10.0.0.0/8", "127.0.0.0/8") that
    /// endpoints may resolve to. Every other private, loopback, link-local
    /// or unspecified address is refused, at registration and at delivery.
    pub allow_private: Vec<String>,
}

/// What the delivery lease must exceed one message's worst case by, in ms
/// (a renewal's own round trip, a busy database).
pub const LEASE_MARGIN_MS: u64 = 5_000;

impl WebhooksOutSettings {
    /// The longest one attempt of one message can take, in ms: the request
    /// timeout, once and again for each immediate retry.
    pub fn worst_attempt_ms(&self) -> u64 {
        self.timeout_ms
            .saturating_mul(1 + self.immediate_retries as u64)
    }

    /// Checks ranges; the error names the bad key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let checks = [
            (self.tick_ms >= 10, "webhooks_out.tick_ms must be >= 10"),
            (self.lease_secs >= 1, "webhooks_out.lease_secs must be >= 1"),
            (
                (1..=10_000).contains(&self.fanout_batch),
                "webhooks_out.fanout_batch must be 1..=10000",
            ),
            (
                (1..=10_000).contains(&self.delivery_batch),
                "webhooks_out.delivery_batch must be 1..=10000",
            ),
            (
                (1..=1000).contains(&self.concurrency),
                "webhooks_out.concurrency must be 1..=1000",
            ),
            (
                self.yield_secs <= 600,
                "webhooks_out.yield_secs must be <= 600",
            ),
            (
                self.connect_timeout_ms >= 1 && self.timeout_ms >= self.connect_timeout_ms,
                "webhooks_out.timeout_ms must be >= webhooks_out.connect_timeout_ms >= 1",
            ),
            (
                self.lease_secs.saturating_mul(1000)
                    >= self.worst_attempt_ms().saturating_add(LEASE_MARGIN_MS),
                "webhooks_out.lease_secs must be >= webhooks_out.timeout_ms x (1 + webhooks_out.immediate_retries) + 5 s",
            ),
            (
                self.response_cap_bytes <= 1 << 20,
                "webhooks_out.response_cap_bytes must be <= 1048576",
            ),
            (
                self.immediate_retries <= 5,
                "webhooks_out.immediate_retries must be <= 5",
            ),
            (
                self.disable_after_secs >= 1,
                "webhooks_out.disable_after_secs must be >= 1",
            ),
        ];
        if let Some((_, msg)) = checks.iter().find(|(ok, _)| !ok) {
            anyhow::bail!("{msg}");
        }
        for c in &self.allow_private {
            crate::config::webhooks_out::parse_cidr(c).map_err(|e| {
                anyhow::anyhow!("webhooks_out.allow_private: {c:?} is not a CIDR range: {e}")
            })?;
        }
        Ok(())
    }
}

/// A CIDR range: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(a)) => {
                self.contains(std::net::IpAddr::V6(a.to_ipv6_mapped()))
            }
            (IpAddr::V4(_), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(std::net::IpAddr::V4(v4))),
        }
    }
}

/// Why an address range could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not an IPv4 or IPv6 address.
    #[error("bad address")]
    Address,
    /// A prefix length longer than the address (or not a number).
    #[error("the prefix length must be 0..={max}")]
    PrefixLength {
        /// 32 or 128.
        max: u8,
    },
}

/// Parses `a.b.c.d/n` or `x::y/n` (a bare address is a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<Cidr, CidrError> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: std::net::IpAddr = addr.trim().parse().map_err(|_| CidrError::Address)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or(CidrError::PrefixLength { max })?,
        None => max,
    };
    Ok(Cidr { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_contain_their_addresses_only() {
        let r = parse_cidr("10.0.0.0/8").unwrap();
        assert!(r.contains("10.2.3.4".parse().unwrap()));
        assert!(!r.contains("11.0.0.1".parse().unwrap()));
        let all = parse_cidr("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let one = parse_cidr("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = parse_cidr("fc00::/7").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }
}
