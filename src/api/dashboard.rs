//! The web dashboard (static files embedded in the binary) and access control.
//!
//! Why embedded: the dashboard must work on a farm network with no internet
//! and no build step; its files are part of the binary.
//!
//! Access control: when `auth.token` is set, every route needs it (a
//! `Authorization: Bearer` header, or the cookie the login form sets), except
//! `/api/health` (for load balancers and monitors) and the login form itself.
//! The check is one middleware on the whole router, so a new route cannot
//! forget it.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

const INDEX: &str = include_str!("../dashboard/index.html");
/// The page's assets: name, content type, text.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../dashboard/app.js")),
    ("farm.js", JS, include_str!("../dashboard/farm.js")),
    ("submit.js", JS, include_str!("../dashboard/submit.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../dashboard/style.css"),
    ),
];
const JS: &str = "text/javascript; charset=utf-8";
const COOKIE: &str = "orchestrator_token";

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/assets/{name}", get(asset))
        .route("/login", get(login_form).post(login))
}

/// One of the page's files.
async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, text)) => {
            ([(header::CONTENT_TYPE, *content_type)], *text).into_response()
        }
        None => ApiError::not_found(format!("asset `{name}`")).into_response(),
    }
}

/// Routes open without a token.
fn is_open(path: &str) -> bool {
    path == "/api/health" || path == "/login"
}

/// Compares by hash, so the time taken says nothing about the token.
fn same(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some(t.trim().to_string());
        }
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Refuses requests without the configured token.
pub(super) async fn require_token(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = state.config.auth.token.as_deref() else {
        return next.run(req).await;
    };
    if is_open(req.uri().path()) || presented(req.headers()).is_some_and(|t| same(&t, token)) {
        return next.run(req).await;
    }
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        return Redirect::to("/login").into_response();
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this orchestrator needs a token: send `Authorization: Bearer TOKEN` (or log in at /login)",
    )
    .into_response()
}

fn login_page(message: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>orchestrator: log in</title>\
         <link rel=stylesheet href=/assets/style.css></head><body><main>\
         <h2>orchestrator</h2><p class=muted>This orchestrator needs its access token.</p>\
         <form method=post action=/login><input type=password name=token placeholder=token autofocus> \
         <button>Log in</button></form><p class=s-failed>{message}</p></main></body></html>"
    ))
}

async fn login_form() -> Html<String> {
    login_page("")
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    match state.config.auth.token.as_deref() {
        Some(t) if same(&form.token, t) => (
            [(
                header::SET_COOKIE,
                format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", form.token),
            )],
            Redirect::to("/"),
        )
            .into_response(),
        Some(_) => (StatusCode::UNAUTHORIZED, login_page("Wrong token.")).into_response(),
        None => Redirect::to("/").into_response(),
    }
}
