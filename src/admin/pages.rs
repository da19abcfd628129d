//! The dashboard's pages and files, the login page, and the OpenAPI
//! document: fixed bodies, each a named handler so the document describes it.

use axum::{
    http::header,
    response::{IntoResponse, Redirect, Response},
};

use super::{APP_CSS, APP_JS, INDEX_HTML, LOGIN_HTML, LOGIN_JS, asset};

/// `GET /api/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "access",
    security(("bearer" = ["viewer", "operator", "admin", "integration"])),
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::pretty(),
    )
        .into_response()
}

/// `GET /`: to the dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    security(()),
    responses((status = 303, description = "To `/ui/`"))
)]
pub(crate) async fn root() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui`: to the dashboard.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "dashboard",
    security(()),
    responses((status = 303, description = "To `/ui/`"))
)]
pub(crate) async fn ui_redirect() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/`: the dashboard (a session; else a 303 to `/login`).
#[utoipa::path(
    get,
    path = "/ui/",
    tag = "dashboard",
    security(("session" = [])),
    responses(
        (status = 200, description = "The dashboard's page", content_type = "text/html", body = String),
        (status = 303, description = "No live session: to `/login`"),
    )
)]
pub(crate) async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

/// `GET /ui/app.js`: the dashboard's script (a session; else a 303 to `/login`).
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "dashboard",
    security(("session" = [])),
    responses(
        (status = 200, description = "The dashboard's script", content_type = "text/javascript", body = String),
        (status = 303, description = "No live session: to `/login`"),
    )
)]
pub(crate) async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/app.css`: the dashboard's styles (a session; else a 303 to `/login`).
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "dashboard",
    security(("session" = [])),
    responses(
        (status = 200, description = "The dashboard's styles", content_type = "text/css", body = String),
        (status = 303, description = "No live session: to `/login`"),
    )
)]
pub(crate) async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

/// `GET /login`: the login form.
#[utoipa::path(
    get,
    path = "/login",
    tag = "access",
    security(()),
    responses((status = 200, description = "The login form", content_type = "text/html", body = String))
)]
pub(crate) async fn login_page() -> Response {
    asset(LOGIN_HTML, "text/html; charset=utf-8")
}

/// `GET /login.js`: the login form's script.
#[utoipa::path(
    get,
    path = "/login.js",
    tag = "access",
    security(()),
    responses((status = 200, description = "The login form's script", content_type = "text/javascript", body = String))
)]
pub(crate) async fn login_js() -> Response {
    asset(LOGIN_JS, "text/javascript; charset=utf-8")
}
