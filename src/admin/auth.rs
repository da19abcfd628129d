//! Who is asking, and may they. Two ways in:
//! - `Authorization: Bearer pat_…` (scripts, the platform posting earnings);
//! - the browser's session cookie from a token login, with a CSRF secret that
//!   every state-changing request must echo in `X-CSRF-Token`.
//!
//! Tokens and cookies are compared as SHA-256 digests looked up by equality;
//! neither is ever logged or echoed back.

use axum::{
    Form,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use std::net::IpAddr;

use super::{AdminState, ApiError, limits};
use crate::{
    db::tokens::{self, Permission, Principal, Role},
    metrics,
};

/// The session cookie's name when it is `Secure` (`admin.cookie_secure`,
/// the default): the `__Host-` prefix makes browsers refuse it unless it is
/// Secure, host-only and `Path=/`, so no subdomain can plant or shadow it.
pub const COOKIE: &str = "__Host-payouts_session";
/// Its name without `Secure` (plain-HTTP development), where browsers refuse
/// the prefix.
pub const COOKIE_PLAIN: &str = "payouts_session";

/// The cookie name in force.
pub fn cookie_name(state: &AdminState) -> &'static str {
    if state.settings.admin.cookie_secure {
        COOKIE
    } else {
        COOKIE_PLAIN
    }
}
/// The header that carries the CSRF secret.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The request's source address (a request extension after [`authenticate`]),
/// for audit rows and refusal logs.
#[derive(Debug, Clone, Copy)]
pub struct Source(pub IpAddr);

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Via {
    /// A bearer token.
    Bearer,
    /// A browser session, with its CSRF secret.
    Session {
        /// The secret state-changing requests must echo.
        csrf: String,
    },
}

/// An authenticated caller (a request extension after [`authenticate`]).
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// How.
    pub via: Via,
}

impl Caller {
    /// `Ok` when the caller's role is `role` or above it on the operators'
    /// ladder ([`Role::includes`]: never for an `integration` token unless
    /// `role` is `integration`); a 403 naming both otherwise.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.principal.role.includes(role) {
            Ok(())
        } else {
            metrics::ADMIN_REFUSED
                .with_label_values(&["forbidden"])
                .inc();
            Err(ApiError::Forbidden(format!(
                "this needs the {role} role; the token {:?} is {}",
                self.principal.name, self.principal.role
            )))
        }
    }

    /// `Ok` when the caller's role allows `what` ([`Role::allows`]); a 403
    /// naming the action and the role otherwise.
    pub fn permit(&self, what: Permission, action: &str) -> Result<(), ApiError> {
        if self.principal.role.allows(what) {
            Ok(())
        } else {
            metrics::ADMIN_REFUSED
                .with_label_values(&["forbidden"])
                .inc();
            Err(ApiError::Forbidden(format!(
                "the {} role may not {action} (token {:?})",
                self.principal.role, self.principal.name
            )))
        }
    }

    /// The actor written to payout events.
    pub fn actor(&self) -> String {
        self.principal.actor()
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn bearer(headers: &HeaderMap) -> Option<Result<String, ()>> {
    let v = headers.get(header::AUTHORIZATION)?;
    let v = v.to_str().map_err(|_| ());
    Some(v.and_then(|v| {
        v.strip_prefix("Bearer ")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(())
    }))
}

/// Resolves the caller of a request from `source`: `Ok(None)` when it
/// carries no credentials. A source locked out by too many failed
/// authentications is refused (429) before its token is looked up.
pub async fn caller(
    state: &AdminState,
    headers: &HeaderMap,
    source: IpAddr,
) -> Result<Option<Caller>, ApiError> {
    let now = state.clock.now();
    if let Some(token) = bearer(headers) {
        if let Some(wait) = state.lockout.locked(source) {
            return Err(locked_out(source, wait));
        }
        let Ok(token) = token else {
            return Err(failed_auth(
                state,
                source,
                "the Authorization header must be `Bearer <token>`",
            ));
        };
        return match tokens::authenticate(&state.pool, &token, now).await? {
            Some(principal) => Ok(Some(Caller {
                principal,
                via: Via::Bearer,
            })),
            None => Err(failed_auth(
                state,
                source,
                "the token is not valid or was revoked",
            )),
        };
    }
    if let Some(cookie) = cookie_value(headers, cookie_name(state)) {
        return match tokens::session(&state.pool, &cookie, now, idle(state)).await? {
            Some((principal, csrf)) => Ok(Some(Caller {
                principal,
                via: Via::Session { csrf },
            })),
            None => Err(refused(
                "bad_credentials",
                source,
                "the session has expired or its token was revoked; log in again",
            )),
        };
    }
    Ok(None)
}

fn idle(state: &AdminState) -> chrono::Duration {
    chrono::Duration::seconds(state.settings.admin.session_idle_secs as i64)
}

/// A refusal: counted by reason and logged with its source (never the
/// credential).
fn refused(reason: &'static str, source: IpAddr, msg: &str) -> ApiError {
    metrics::ADMIN_REFUSED.with_label_values(&[reason]).inc();
    tracing::warn!(%source, reason, "admin request refused: {msg}");
    ApiError::Unauthorized(msg.to_string())
}

/// A bad bearer token or login: refused, and counted against the source's
/// failure budget (which may lock it out).
fn failed_auth(state: &AdminState, source: IpAddr, msg: &str) -> ApiError {
    if state.lockout.failed(source) {
        tracing::warn!(%source, lockout_secs = state.settings.admin.lockout_secs, "source locked out after too many failed authentications");
    }
    refused("bad_credentials", source, msg)
}

fn locked_out(source: IpAddr, wait: std::time::Duration) -> ApiError {
    metrics::ADMIN_REFUSED
        .with_label_values(&["locked_out"])
        .inc();
    tracing::warn!(%source, "admin request refused: source locked out");
    ApiError::TooManyRequests {
        message: "too many failed authentications from this address; try again later".into(),
        retry_after: wait.as_secs().max(1),
    }
}

/// The request's source, as [`limits::source`] reads it with this server's settings.
pub fn source_of(state: &AdminState, req: &Request) -> IpAddr {
    limits::source(
        req.extensions(),
        req.headers(),
        &state.settings.admin.client_ip_header,
    )
}

/// Middleware of every API route: a caller or 401; and, for a browser
/// session, a matching `X-CSRF-Token` on anything but GET/HEAD or 403.
pub async fn authenticate(
    State(state): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Response {
    let source = source_of(&state, &req);
    let caller = match caller(&state, req.headers(), source).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return refused(
                "no_credentials",
                source,
                "credentials required: `Authorization: Bearer <token>` or a dashboard session",
            )
            .into_response();
        }
        Err(e) => return e.into_response(),
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if let Via::Session { csrf } = &caller.via {
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !safe && !bool::from(sent.ct_eq(csrf.as_bytes())) {
            metrics::ADMIN_REFUSED.with_label_values(&["csrf"]).inc();
            tracing::warn!(%source, token = %caller.principal.name, "admin request refused: missing or wrong CSRF token");
            return ApiError::Forbidden(
                "missing or wrong X-CSRF-Token for this session (GET /api/v1/session gives it)"
                    .into(),
            )
            .into_response();
        }
    }
    if caller.principal.role == Role::Integration
        && !integration_route(req.method(), req.uri().path())
    {
        metrics::ADMIN_REFUSED
            .with_label_values(&["forbidden"])
            .inc();
        tracing::warn!(%source, token = %caller.principal.name, "admin request refused: not open to the integration role");
        return ApiError::Forbidden(format!(
            "the integration role may post earnings, read payees, balances, earnings and payouts, and request payouts; not {} {}",
            req.method(),
            super::api::short(req.uri().path())
        ))
        .into_response();
    }
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(Source(source));
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The routes an `integration` token may reach at all (each handler still
/// checks its own [`Permission`]): its session, the payees and their reads,
/// payouts, payout requests, the earnings intake and the API description.
/// Everything else (the overview, search, actions, bulk, tokens, the fleet,
/// the audit log) is refused before any handler runs.
pub fn integration_route(method: &Method, path: &str) -> bool {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let get = *method == Method::GET || *method == Method::HEAD;
    match segs.as_slice() {
        ["v1", "earnings"] => *method == Method::POST,
        ["api", "openapi.json"] | ["api", "v1", "session"] => get,
        ["api", "v1", "payees"] | ["api", "v1", "payees", _] => get,
        [
            "api",
            "v1",
            "payees",
            _,
            "balance" | "earnings" | "payouts" | "upcoming",
        ] => get,
        ["api", "v1", "payees", _, "payout-requests"] => get || *method == Method::POST,
        ["api", "v1", "payouts"] => get,
        // `/payouts/{id}` only: not `/payouts/bulk-retry` or an action.
        ["api", "v1", "payouts", id] => get && id.bytes().all(|b| b.is_ascii_digit()),
        _ => false,
    }
}

/// Middleware of the earnings intake: a caller whose role may post
/// earnings (operator, admin, integration).
pub async fn require_operator(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) => match c.permit(Permission::PostEarnings, "post earnings") {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
        None => ApiError::Unauthorized("credentials required".into()).into_response(),
    }
}

/// The login form's body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoginForm {
    /// A token of an operator's role (viewer, operator or admin).
    token: String,
}

/// A request from another site (an `Origin` that is not ours) must not log
/// anyone in or out.
fn cross_site(headers: &HeaderMap) -> bool {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (None, _) | (Some("null"), None) => false,
        (Some(o), Some(h)) => {
            let o = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .unwrap_or(o);
            o != h
        }
        (Some(_), None) => true,
    }
}

fn session_cookie(state: &AdminState, value: &str, max_age: i64) -> HeaderValue {
    let secure = if state.settings.admin.cookie_secure {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
        cookie_name(state)
    ))
    .expect("hex cookie value")
}

/// `POST /login`: a token in, a session cookie out (303 to the dashboard),
/// or back to the form with `?error=1`.
#[utoipa::path(
    post,
    path = "/login",
    tag = "access",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    security(()),
    responses(
        (status = 303, description = "To `/ui/` with a session cookie (`Set-Cookie`); back to `/login?error=1` for a token that does not open a session, `/login?error=locked` for a source locked out"),
        (status = 403, description = "From another site (an `Origin` that is not this server's)", body = super::openapi::ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AdminState>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, ApiError> {
    let mut ext = axum::http::Extensions::new();
    if let Some(axum::Extension(c)) = connect {
        ext.insert(c);
    }
    let source = limits::source(&ext, &headers, &state.settings.admin.client_ip_header);
    if cross_site(&headers) {
        metrics::ADMIN_REFUSED.with_label_values(&["csrf"]).inc();
        tracing::warn!(%source, "login refused: cross-site Origin");
        return Err(ApiError::Forbidden("cross-site login refused".into()));
    }
    if let Some(wait) = state.lockout.locked(source) {
        // A browser posted the form: back to it, with the reason shown.
        let _ = locked_out(source, wait);
        return Ok(Redirect::to("/login?error=locked").into_response());
    }
    let now = state.clock.now();
    let token = form.token.trim();
    let principal = if token.is_empty() || token.len() > 256 {
        None
    } else {
        tokens::authenticate(&state.pool, token, now).await?
    };
    let Some(principal) = principal else {
        let _ = failed_auth(&state, source, "login with a token that is not valid");
        return Ok(Redirect::to("/login?error=1").into_response());
    };
    if principal.role == Role::Integration {
        // The platform's backend calls the API with its bearer token; the
        // dashboard is for operators.
        let _ = refused(
            "forbidden",
            source,
            "an integration token cannot open a dashboard session",
        );
        return Ok(Redirect::to("/login?error=1").into_response());
    }
    let ttl = state.settings.admin.session_ttl_secs as i64;
    let (cookie, _csrf) = tokens::open_session(
        &state.pool,
        &principal,
        now,
        now + chrono::Duration::seconds(ttl),
    )
    .await?;
    tracing::info!(actor = %principal.actor(), role = %principal.role, "dashboard login");
    let mut resp = Redirect::to("/ui/").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, &cookie, ttl));
    Ok(resp)
}

/// `POST /logout` (behind [`authenticate`], so CSRF-checked): ends the session.
#[utoipa::path(
    post,
    path = "/logout",
    tag = "access",
    responses((status = 303, description = "To `/login`, the session ended and its cookie cleared"))
)]
pub async fn logout(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(cookie) = cookie_value(&headers, cookie_name(&state)) {
        tokens::close_session(&state.pool, &cookie, state.clock.now()).await?;
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, "", 0));
    Ok(resp)
}

/// Middleware of the dashboard's own files: a live session, or a redirect to
/// the login page (bearer tokens are for the API, not for pages).
pub async fn page_session(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let ok = match cookie_value(req.headers(), cookie_name(&state)) {
        Some(cookie) => matches!(
            tokens::session(&state.pool, &cookie, state.clock.now(), idle(&state)).await,
            Ok(Some(_))
        ),
        None => false,
    };
    if ok {
        next.run(req).await
    } else {
        (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_the_session_cookie_among_others() {
        let h = headers(&[("cookie", "a=1; __Host-payouts_session=abc; b=2")]);
        assert_eq!(cookie_value(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, COOKIE_PLAIN), None);
        assert_eq!(
            cookie_value(&headers(&[("cookie", "__Host-payouts_session=")]), COOKIE),
            None
        );
        assert_eq!(cookie_value(&HeaderMap::new(), COOKIE), None);
    }

    #[test]
    fn bearer_header_shapes() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer pat_x")])),
            Some(Ok("pat_x".into()))
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Basic abc")])),
            Some(Err(()))
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer ")])),
            Some(Err(()))
        );
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn integration_reaches_only_its_routes() {
        let ok = [
            (Method::POST, "/v1/earnings"),
            (Method::GET, "/api/v1/payees"),
            (Method::GET, "/api/v1/payees/7"),
            (Method::GET, "/api/v1/payees/7/balance"),
            (Method::GET, "/api/v1/payees/7/earnings"),
            (Method::GET, "/api/v1/payees/7/payouts"),
            (Method::GET, "/api/v1/payees/7/upcoming"),
            (Method::POST, "/api/v1/payees/7/payout-requests"),
            (Method::GET, "/api/v1/payouts"),
            (Method::GET, "/api/v1/payouts/12"),
            (Method::GET, "/api/v1/session"),
        ];
        for (m, p) in ok {
            assert!(integration_route(&m, p), "{m} {p}");
        }
        let refused = [
            (Method::POST, "/api/v1/payouts/12/retry"),
            (Method::POST, "/api/v1/payouts/12/cancel"),
            (Method::POST, "/api/v1/payouts/bulk-retry"),
            (Method::GET, "/api/v1/payouts/bulk-retry"),
            (Method::POST, "/api/v1/payees/7/suspend"),
            (Method::PUT, "/api/v1/payees/7/account"),
            (Method::GET, "/api/v1/tokens"),
            (Method::GET, "/api/v1/overview"),
            (Method::GET, "/api/v1/audit"),
            (Method::POST, "/api/v1/fleet/pause"),
            (Method::GET, "/v1/earnings"),
            (Method::DELETE, "/api/v1/payees/7"),
        ];
        for (m, p) in refused {
            assert!(!integration_route(&m, p), "{m} {p}");
        }
    }

    #[test]
    fn cross_site_logins_are_told_apart() {
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:9300")])));
        assert!(!cross_site(&headers(&[
            ("host", "127.0.0.1:9300"),
            ("origin", "http://127.0.0.1:9300")
        ])));
        assert!(cross_site(&headers(&[
            ("host", "127.0.0.1:9300"),
            ("origin", "https://evil.example")
        ])));
    }
}
