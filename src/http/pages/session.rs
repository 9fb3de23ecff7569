//! The dashboard's session cookie and CSRF tokens. A session is `kind.nonce.mac`, signed with
//! the server's session key (derived from the tokens, see [`Auth::session_key`]); the CSRF token
//! of a session is another MAC of its nonce, so nothing is stored server-side and every check is
//! a constant-time comparison.
//!
//! With a token configured, signing in with it issues a full or read session; without one,
//! every visitor gets an open session on the first page, which exists only to tie forms to the
//! browser that loaded them (a page elsewhere cannot read the token, so it cannot post them).
//!
//! The cookie is `HttpOnly` (no script reads it) and `SameSite=Strict` (no other site's page
//! sends it).

use axum::http::{HeaderMap, HeaderValue, header};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::http::auth::{Access, Auth};

/// The cookie's name.
pub const COOKIE: &str = "imagegen_session";
/// How long a session lasts.
pub const MAX_AGE_SECS: u64 = 30 * 24 * 3600;

/// Who a session was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Signed in with the full token.
    Full,
    /// Signed in with the read token.
    Read,
    /// No token is configured: an anonymous session, for CSRF only.
    Open,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Full => "f",
            Kind::Read => "r",
            Kind::Open => "o",
        }
    }

    fn from_tag(t: &str) -> Option<Kind> {
        match t {
            "f" => Some(Kind::Full),
            "r" => Some(Kind::Read),
            "o" => Some(Kind::Open),
            _ => None,
        }
    }

    /// What a token access makes.
    pub fn of(access: Access) -> Kind {
        match access {
            Access::Full => Kind::Full,
            Access::Read => Kind::Read,
        }
    }
}

/// A verified session.
#[derive(Debug, Clone)]
pub struct Session {
    pub kind: Kind,
    nonce: String,
}

fn mac(key: &[u8; 32], parts: &[&str]) -> String {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        // A 32-byte key is always accepted by HMAC; unreachable in practice.
        return String::new();
    };
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\0");
    }
    hex::encode(m.finalize().into_bytes())
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Session {
    /// A new session of `kind` and its `Set-Cookie` value.
    pub fn issue(auth: &Auth, kind: Kind) -> (Session, HeaderValue) {
        let nonce = hex::encode(uuid::Uuid::new_v4().as_bytes());
        let sig = mac(auth.session_key(), &["session", kind.tag(), &nonce]);
        let value = format!(
            "{COOKIE}={}.{nonce}.{sig}; Path=/; HttpOnly; SameSite=Strict; Max-Age={MAX_AGE_SECS}",
            kind.tag()
        );
        let header = HeaderValue::from_str(&value)
            .unwrap_or_else(|_| HeaderValue::from_static("imagegen_session=; Path=/"));
        (Session { kind, nonce }, header)
    }

    /// The `Set-Cookie` value that ends a session.
    pub fn clear() -> HeaderValue {
        HeaderValue::from_static("imagegen_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// The session in the request's cookies, if one is there and its signature holds.
    pub fn from_headers(auth: &Auth, headers: &HeaderMap) -> Option<Session> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .find_map(|value| Session::verify(auth, value))
    }

    fn verify(auth: &Auth, value: &str) -> Option<Session> {
        let mut parts = value.splitn(3, '.');
        let (tag, nonce, sig) = (parts.next()?, parts.next()?, parts.next()?);
        let kind = Kind::from_tag(tag)?;
        let want = mac(auth.session_key(), &["session", kind.tag(), nonce]);
        same(&want, sig).then(|| Session {
            kind,
            nonce: nonce.to_owned(),
        })
    }

    /// The CSRF token forms of this session carry.
    pub fn csrf(&self, auth: &Auth) -> String {
        mac(auth.session_key(), &["csrf", &self.nonce])
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, auth: &Auth, presented: &str) -> bool {
        same(&self.csrf(auth), presented)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_of(h: &HeaderValue) -> HeaderMap {
        let pair = h.to_str().unwrap().split(';').next().unwrap().to_owned();
        let mut m = HeaderMap::new();
        m.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}")).unwrap(),
        );
        m
    }

    #[test]
    fn a_session_round_trips_and_a_forged_one_does_not() {
        let auth = Auth::open();
        let (s, set) = Session::issue(&auth, Kind::Full);
        let back = Session::from_headers(&auth, &cookie_of(&set)).expect("verifies");
        assert_eq!(back.kind, Kind::Full);
        assert!(back.csrf_ok(&auth, &s.csrf(&auth)));
        assert!(!back.csrf_ok(&auth, "00"));
        assert!(!back.csrf_ok(&auth, ""));
        // Another server (another key) does not accept it.
        assert!(Session::from_headers(&Auth::open(), &cookie_of(&set)).is_none());
        // Changing the kind breaks the signature.
        let forged = set.to_str().unwrap().replacen("=f.", "=o.", 1);
        let forged = HeaderValue::from_str(&forged).unwrap();
        assert!(Session::from_headers(&auth, &cookie_of(&forged)).is_none());
        let text = set.to_str().unwrap();
        assert!(text.contains("HttpOnly") && text.contains("SameSite=Strict"));
    }
}
