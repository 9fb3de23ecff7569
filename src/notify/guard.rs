//! The outbound guard: the only HTTP client that calls URLs taken from rows (`callback_url`).
//!
//! A row is written by whoever can insert a job, so its URL is untrusted: http or https only, no
//! redirects (a public URL must not bounce the call inward), a short timeout, at most
//! [`MAX_RESPONSE_BYTES`] of the answer read, no proxy from the environment, and no private,
//! loopback, link-local or otherwise non-public address unless allowed. The address check is
//! made on what the connection is opened to: names go through [`GuardedResolver`], which drops
//! every refused address before the connector sees any (so a name that resolves differently on
//! a second lookup cannot slip past an earlier check), and IP literals, which the connector
//! opens without resolving, are checked here before the request is made.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::error::{Classify, ErrorClass};

/// The most of a receiver's answer that is read (the rest is dropped with the connection).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// How the guard treats addresses and time.
#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    /// Allow private, loopback and link-local addresses (development, tests, receivers inside
    /// the same network on purpose).
    pub allow_private: bool,
    /// The whole request, connect to last byte read.
    pub timeout: Duration,
}

impl Default for GuardConfig {
    /// Public addresses only; 10 s: a receiver should answer at once and work later.
    fn default() -> Self {
        GuardConfig {
            allow_private: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why a call was not made or did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The URL is not one the guard calls (scheme, host, address): retrying cannot help.
    #[error("refused callback URL: {0}")]
    Refused(String),
    /// The call failed (connection, timeout, TLS): worth retrying.
    #[error("callback request failed: {0}")]
    Request(String),
}

impl Classify for GuardError {
    fn class(&self) -> ErrorClass {
        match self {
            GuardError::Refused(_) => ErrorClass::Permanent,
            GuardError::Request(_) => ErrorClass::RETRY,
        }
    }
}

/// A receiver's answer: its status and the start of its body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// At most [`MAX_RESPONSE_BYTES`], lossily decoded: for the delivery's `last_error`.
    pub body: String,
}

/// The guarded client.
#[derive(Debug, Clone)]
pub struct Guard {
    client: reqwest::Client,
    config: GuardConfig,
}

impl Guard {
    pub fn new(config: GuardConfig) -> Result<Guard, GuardError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("imagegen-webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: config.allow_private,
            }))
            .build()
            .map_err(|e| GuardError::Request(e.to_string()))?;
        Ok(Guard { client, config })
    }

    /// Checks a URL as far as it can be without resolving it: scheme, host, and the address
    /// when the host is an IP literal.
    pub fn check_url(&self, url: &str) -> Result<Url, GuardError> {
        let parsed = Url::parse(url).map_err(|e| GuardError::Refused(format!("{e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(GuardError::Refused(format!(
                "scheme {:?} (only http and https)",
                parsed.scheme()
            )));
        }
        let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
            return Err(GuardError::Refused("no host".into()));
        };
        // The parser has normalised IPv4 forms (`0x7f.1` is `127.0.0.1`); IPv6 comes bracketed.
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if let Some(ip) = literal
            && !self.config.allow_private
            && !is_public(ip)
        {
            return Err(GuardError::Refused(format!(
                "{ip} is not a public address (allow with --allow-private-callbacks)"
            )));
        }
        Ok(parsed)
    }

    /// POSTs `body` as JSON with `headers` to `url`, and reads the start of the answer.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: String,
    ) -> Result<Answer, GuardError> {
        let url = self.check_url(url)?;
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let mut response = request.body(body).send().await.map_err(request_error)?;
        let status = response.status().as_u16();
        let mut read = Vec::new();
        while read.len() < MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read.extend_from_slice(&chunk),
                // The status is the answer; a body cut short does not change it.
                Ok(None) | Err(_) => break,
            }
        }
        read.truncate(MAX_RESPONSE_BYTES);
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&read).into_owned(),
        })
    }
}

/// A request error in words, without the URL (it may carry credentials).
fn request_error(e: reqwest::Error) -> GuardError {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    // A refusal by the resolver is permanent: it comes back the same on every retry.
    if text.contains(REFUSED_BY_RESOLVER) {
        return GuardError::Refused(text);
    }
    GuardError::Request(text)
}

const REFUSED_BY_RESOLVER: &str = "resolves only to non-public addresses";

/// Resolves names and keeps only the addresses the guard allows, so the connector can only
/// connect to those.
#[derive(Debug)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() && !found.is_empty() {
                return Err(format!(
                    "{host} {REFUSED_BY_RESOLVER} (allow with --allow-private-callbacks)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether `ip` is a globally reachable unicast address: not loopback, private, link-local,
/// unique-local, shared (CGNAT), unspecified, broadcast, multicast, documentation, benchmarking
/// or reserved, and not an IPv4 address of those kinds wrapped in IPv6.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [o0, o1, o2, _] = a.octets();
    !(a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o0 == 0
        || (o0 == 100 && (64..128).contains(&o1)) // shared address space (CGNAT)
        || (o0 == 192 && o1 == 0 && o2 == 0) // IETF protocol assignments
        || (o0 == 198 && (18..20).contains(&o1)) // benchmarking
        || o0 >= 240) // reserved
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = a.segments();
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64: would reach IPv4 inside
        || s[0] == 0x2002 // 6to4: likewise
        || (s[0..6] == [0, 0, 0, 0, 0, 0])) // IPv4-compatible (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_inner_addresses_and_allows_public_ones() {
        for inner in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(!is_public(ip(inner)), "{inner} must be refused");
        }
        for public in [
            "93.184.215.14",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "8.8.8.8",
        ] {
            assert!(is_public(ip(public)), "{public} must be allowed");
        }
    }

    #[test]
    fn checks_scheme_and_literal_addresses_before_any_call() {
        let guard = Guard::new(GuardConfig::default()).unwrap();
        for bad in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "http://127.0.0.1:8080/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://0x7f.1/hook",
        ] {
            assert!(
                matches!(guard.check_url(bad), Err(GuardError::Refused(_))),
                "{bad}"
            );
        }
        assert!(guard.check_url("https://example.com/hook").is_ok());
        let open = Guard::new(GuardConfig {
            allow_private: true,
            ..GuardConfig::default()
        })
        .unwrap();
        assert!(open.check_url("http://127.0.0.1:8080/hook").is_ok());
    }
}
