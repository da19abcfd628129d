//! Where the fleet may send: `https://` anywhere public; `http://` only to
//! loopback; a private, loopback, link-local or unspecified address only
//! inside a range of `webhooks_out.allow_private`. Checked when an endpoint
//! is registered (the URL) and on every connection (each resolved address,
//! by the client's resolver, so a name that later resolves inside the
//! network is refused too). Redirects are never followed.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::config::webhooks_out::{Cidr, parse_cidr};

/// Why a URL is refused (the message names what to change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Not a URL.
    #[error("url is not a valid absolute URL")]
    Invalid,
    /// Another scheme, or plain http to a host that is not loopback.
    #[error("url must be https:// (http:// only to a loopback address)")]
    Scheme,
    /// User and password in the URL.
    #[error("url must not carry a user name or password")]
    Credentials,
    /// A private address outside the allowed ranges.
    #[error(
        "url points at a private or loopback address {0} that webhooks_out.allow_private does not allow"
    )]
    Private(IpAddr),
}

/// The address policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: Arc<Vec<Cidr>>,
}

impl Policy {
    /// The policy of `allow_private` (validated with the settings).
    pub fn new(allow_private: &[String]) -> Self {
        Policy {
            allow: Arc::new(
                allow_private
                    .iter()
                    .filter_map(|c| parse_cidr(c).ok())
                    .collect(),
            ),
        }
    }

    /// Whether the fleet may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.iter().any(|c| c.contains(ip))
    }

    /// Checks an endpoint URL; the parsed URL when it may be used.
    pub fn check_url(&self, raw: &str) -> Result<url::Url, UrlRefused> {
        let url = url::Url::parse(raw.trim()).map_err(|_| UrlRefused::Invalid)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlRefused::Credentials);
        }
        let host = url.host().ok_or(UrlRefused::Invalid)?;
        let literal: Option<IpAddr> = match &host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(*a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(*a)),
            url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost") => {
                Some(IpAddr::from([127, 0, 0, 1]))
            }
            url::Host::Domain(_) => None,
        };
        match url.scheme() {
            "https" => {}
            "http" if literal.is_some_and(|ip| ip.is_loopback()) => {}
            _ => return Err(UrlRefused::Scheme),
        }
        if let Some(ip) = literal.filter(|ip| !self.allows(*ip)) {
            return Err(UrlRefused::Private(ip));
        }
        Ok(url)
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The client's resolver: the system's, then the policy on every address.
#[derive(Debug, Clone)]
pub struct CheckedResolver(pub Policy);

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> = match addrs.first() {
                    Some(a) => Box::new(UrlRefused::Private(a.ip())),
                    None => "the name resolved to no address".into(),
                };
                return Err(refused);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_only_to_loopback_and_private_only_when_allowed() {
        let none = Policy::new(&[]);
        assert_eq!(
            none.check_url("http://example.com/h").unwrap_err(),
            UrlRefused::Scheme
        );
        assert_eq!(
            none.check_url("http://10.0.0.1/h").unwrap_err(),
            UrlRefused::Scheme
        );
        assert!(matches!(
            none.check_url("https://10.1.2.3/h").unwrap_err(),
            UrlRefused::Private(_)
        ));
        assert!(matches!(
            none.check_url("http://127.0.0.1:9/h").unwrap_err(),
            UrlRefused::Private(_)
        ));
        assert_eq!(
            none.check_url("ftp://example.com").unwrap_err(),
            UrlRefused::Scheme
        );
        assert_eq!(
            none.check_url("https://u:p@example.com").unwrap_err(),
            UrlRefused::Credentials
        );
        assert!(none.check_url("https://example.com/hooks").is_ok());
        let lo = Policy::new(&["127.0.0.0/8".into(), "10.0.0.0/8".into()]);
        assert!(lo.check_url("http://127.0.0.1:9/h").is_ok());
        assert!(lo.check_url("http://localhost:9/h").is_ok());
        assert!(lo.check_url("https://10.1.2.3/h").is_ok());
        assert_eq!(
            lo.check_url("http://10.1.2.3/h").unwrap_err(),
            UrlRefused::Scheme
        );
        assert!(!is_public("169.254.169.254".parse().unwrap()));
        assert!(!is_public("::ffff:10.0.0.1".parse().unwrap()));
        assert!(is_public("8.8.8.8".parse().unwrap()));
    }
}
