//! Who may use the HTTP server, as a layer any router (the API, later the dashboard) puts in
//! front of its routes: bearer tokens compared in constant time, a read-only token and mode, and
//! the rule that a server reachable from other hosts is never open by accident.
//!
//! - Loopback binds are open by default (only this host reaches them).
//! - Any other address needs `IMAGEGEN_HTTP_TOKEN` and/or `IMAGEGEN_HTTP_READ_TOKEN`, or an
//!   explicit `--no-auth`; otherwise [`Auth::new`] refuses and the server does not start.
//! - With a token set, every request needs `Authorization: Bearer <token>`: the read token allows
//!   only GET and HEAD. `--read-only` refuses every changing request whatever the token.
//! - Health and metrics stay open without a token only on loopback or with `--open-metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::Problem;

/// The access settings of an HTTP server, parsed once by the CLI. Tokens are secrets: `Debug`
/// never shows them, and no answer or log line carries them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Bearer token that may read and change everything. Prefer the environment variable: a
    /// command-line value is visible to other users of the host.
    #[arg(long = "http-token", env = "IMAGEGEN_HTTP_TOKEN", hide_env_values = true,
        value_parser = parse_token, value_name = "TOKEN")]
    pub token: Option<SecretString>,
    /// Bearer token that may only read (GET and HEAD).
    #[arg(long = "http-read-token", env = "IMAGEGEN_HTTP_READ_TOKEN", hide_env_values = true,
        value_parser = parse_token, value_name = "TOKEN")]
    pub read_token: Option<SecretString>,
    /// Serve a non-loopback address without any token (behind your own authenticating proxy).
    #[arg(long = "no-auth")]
    pub no_auth: bool,
    /// Refuse every changing request (403), for sharing status with people who must not steer.
    #[arg(long = "read-only")]
    pub read_only: bool,
    /// Serve /healthz, /readyz and /metrics without a token on a non-loopback address.
    #[arg(long = "open-metrics")]
    pub open_metrics: bool,
}

/// The shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_CHARS: usize = 16;

fn parse_token(value: &str) -> Result<SecretString, String> {
    let v = value.trim();
    if v.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!("must be at least {MIN_TOKEN_CHARS} characters"));
    }
    Ok(SecretString::from(v.to_owned()))
}

/// Why a server may not start with the given access settings.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "refusing to serve {addr} without a token: it is reachable from other hosts. Set \
         IMAGEGEN_HTTP_TOKEN (and/or IMAGEGEN_HTTP_READ_TOKEN), bind a loopback address, or pass \
         --no-auth if a proxy in front authenticates"
    )]
    Unprotected { addr: SocketAddr },
    #[error("--no-auth contradicts the HTTP token that is set; choose one")]
    NoAuthWithToken,
    #[error("the read token must differ from the full token")]
    SameTokens,
}

/// What a request may do, decided once per server.
#[derive(Clone)]
pub struct Auth(Arc<Inner>);

struct Inner {
    /// SHA-256 of the tokens: compared in constant time, and equal lengths whatever the input.
    full: Option<[u8; 32]>,
    read: Option<[u8; 32]>,
    read_only: bool,
    /// Health and metrics need no token.
    open_probes: bool,
    /// Signs the dashboard's session cookies and CSRF tokens: derived from the tokens (so every
    /// instance with the same tokens accepts the same cookies, and changing a token signs
    /// everyone out), or random per process when there is no token.
    session_key: [u8; 32],
}

/// What a presented token (or a dashboard session made with it) may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and change.
    Full,
    /// Read only.
    Read,
}

fn session_key(full: Option<[u8; 32]>, read: Option<[u8; 32]>) -> [u8; 32] {
    if full.is_none() && read.is_none() {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        return key;
    }
    let mut h = Sha256::new();
    h.update(b"imagegen dashboard session v1\0");
    h.update(full.unwrap_or_default());
    h.update(read.unwrap_or_default());
    h.finalize().into()
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("full_token", &self.0.full.is_some())
            .field("read_token", &self.0.read.is_some())
            .field("read_only", &self.0.read_only)
            .field("open_probes", &self.0.open_probes)
            .finish()
    }
}

fn digest(s: &SecretString) -> [u8; 32] {
    Sha256::digest(s.expose_secret().as_bytes()).into()
}

impl Auth {
    /// The access rules for a server on `addr`, or why it must not start.
    pub fn new(args: &AuthArgs, addr: SocketAddr) -> Result<Auth, AuthError> {
        let full = args.token.as_ref().map(digest);
        let read = args.read_token.as_ref().map(digest);
        let has_token = full.is_some() || read.is_some();
        if args.no_auth && has_token {
            return Err(AuthError::NoAuthWithToken);
        }
        if full.is_some() && full == read {
            return Err(AuthError::SameTokens);
        }
        let loopback = addr.ip().is_loopback();
        if !loopback && !has_token && !args.no_auth {
            return Err(AuthError::Unprotected { addr });
        }
        Ok(Auth(Arc::new(Inner {
            full,
            read,
            read_only: args.read_only,
            open_probes: loopback || args.open_metrics || !has_token,
            session_key: session_key(full, read),
        })))
    }

    /// Open access (tests and embedded use on loopback).
    pub fn open() -> Auth {
        Auth(Arc::new(Inner {
            full: None,
            read: None,
            read_only: false,
            open_probes: true,
            session_key: session_key(None, None),
        }))
    }

    /// Whether requests need a token (or a dashboard session made with one).
    pub fn has_tokens(&self) -> bool {
        self.0.full.is_some() || self.0.read.is_some()
    }

    /// What `presented` may do if it is one of the tokens, compared in constant time.
    pub fn token_access(&self, presented: &str) -> Option<Access> {
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let is = |t: &Option<[u8; 32]>| t.is_some_and(|t| bool::from(t.ct_eq(&presented)));
        if is(&self.0.full) {
            Some(Access::Full)
        } else if is(&self.0.read) {
            Some(Access::Read)
        } else {
            None
        }
    }

    /// The key the dashboard signs its cookies and CSRF tokens with. Never leaves the process.
    pub fn session_key(&self) -> &[u8; 32] {
        &self.0.session_key
    }

    /// Whether this server refuses every change.
    pub fn is_read_only(&self) -> bool {
        self.0.read_only
    }

    /// Decides one request: `probe` for health and metrics routes.
    pub fn check(
        &self,
        method: &Method,
        authorization: Option<&str>,
        probe: bool,
    ) -> Result<(), Problem> {
        let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if changes && self.0.read_only {
            return Err(Problem::read_only(
                "this server is read-only (--read-only): it changes nothing",
            ));
        }
        if probe && self.0.open_probes {
            return Ok(());
        }
        if self.0.full.is_none() && self.0.read.is_none() {
            return Ok(());
        }
        let Some(presented) = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
        else {
            return Err(Problem::unauthorized(
                "send Authorization: Bearer <token> (IMAGEGEN_HTTP_TOKEN or IMAGEGEN_HTTP_READ_TOKEN)",
            ));
        };
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let is = |t: &Option<[u8; 32]>| t.is_some_and(|t| bool::from(t.ct_eq(&presented)));
        if is(&self.0.full) {
            return Ok(());
        }
        if is(&self.0.read) {
            if changes {
                return Err(Problem::read_only("the read token may not change anything"));
            }
            return Ok(());
        }
        Err(Problem::unauthorized("the bearer token is not valid"))
    }
}

fn authorization(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Middleware for routes that read or change data (`from_fn_with_state(auth, require)`).
pub async fn require(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.check(req.method(), authorization(&req), false) {
        Ok(()) => next.run(req).await,
        Err(p) => p.into_response(),
    }
}

/// Middleware for health and metrics routes: open on loopback or with `--open-metrics`.
pub async fn require_probe(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.check(req.method(), authorization(&req), true) {
        Ok(()) => next.run(req).await,
        Err(p) => p.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(token: Option<&str>, read: Option<&str>) -> AuthArgs {
        AuthArgs {
            token: token.map(|t| SecretString::from(t.to_owned())),
            read_token: read.map(|t| SecretString::from(t.to_owned())),
            ..AuthArgs::default()
        }
    }

    const PUBLIC: &str = "0.0.0.0:8080";
    const FULL: &str = "full-token-0123456789";
    const READ: &str = "read-token-0123456789";

    #[test]
    fn a_public_bind_needs_a_token_or_no_auth() {
        let addr = PUBLIC.parse().unwrap();
        assert!(matches!(
            Auth::new(&args(None, None), addr),
            Err(AuthError::Unprotected { .. })
        ));
        assert!(Auth::new(&args(Some(FULL), None), addr).is_ok());
        assert!(Auth::new(&args(None, Some(READ)), addr).is_ok());
        let open = AuthArgs {
            no_auth: true,
            ..AuthArgs::default()
        };
        assert!(Auth::new(&open, addr).is_ok());
        assert!(Auth::new(&args(None, None), "127.0.0.1:0".parse().unwrap()).is_ok());
        assert!(Auth::new(&args(None, None), "[::1]:0".parse().unwrap()).is_ok());
    }

    #[test]
    fn tokens_decide_reads_and_writes() {
        let auth = Auth::new(&args(Some(FULL), Some(READ)), PUBLIC.parse().unwrap()).unwrap();
        let bearer = |t: &str| format!("Bearer {t}");
        assert!(auth.check(&Method::GET, Some(&bearer(FULL)), false).is_ok());
        assert!(
            auth.check(&Method::POST, Some(&bearer(FULL)), false)
                .is_ok()
        );
        assert!(auth.check(&Method::GET, Some(&bearer(READ)), false).is_ok());
        let p = auth
            .check(&Method::POST, Some(&bearer(READ)), false)
            .unwrap_err();
        assert_eq!(p.status().as_u16(), 403);
        let p = auth.check(&Method::GET, None, false).unwrap_err();
        assert_eq!(p.status().as_u16(), 401);
        let p = auth
            .check(&Method::GET, Some(&bearer("nope")), false)
            .unwrap_err();
        assert_eq!(p.status().as_u16(), 401);
        // Probes need a token off loopback unless --open-metrics.
        assert!(auth.check(&Method::GET, None, true).is_err());
    }
}
