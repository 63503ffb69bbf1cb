//! HTTP layer: the router, shared state and the extractors that turn every rejection
//! into API.md's JSON error shape.

mod limits;
mod messages;
mod openapi;
mod ops;

pub use limits::RateLimit;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::de::DeserializeOwned;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Auth;
use crate::config::Config;
use crate::did;
use crate::error::ApiError;
use crate::metrics::{HttpLabels, RouteLabels};
use crate::relay::Relay;

#[derive(Clone)]
pub struct AppState {
    pub relay: Arc<Relay>,
    pub auth: Arc<Auth>,
    /// Per-caller token bucket; `None` when `RATE_LIMIT_PER_MINUTE` is 0.
    pub rate_limit: Option<Arc<RateLimit>>,
}

/// The whole HTTP surface. Fails (at start-up) on a CORS setting that cannot work.
pub fn router(state: AppState, config: &Config) -> anyhow::Result<Router> {
    let body_limit = messages::body_limit(&state.relay.policy);
    let cors = limits::cors(&config.cors_allowed_origins)?;
    // Each route is added together with its OpenAPI description (utoipa-axum).
    let api = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(messages::send))
        .routes(routes!(messages::pending))
        .routes(routes!(messages::ack_many))
        .routes(routes!(messages::fetch, messages::withdraw))
        .routes(routes!(messages::ack_one))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz));
    let api = if config.metrics_enabled {
        api.routes(routes!(ops::metrics))
    } else {
        api
    };
    let (router, description) = api.split_for_parts();
    let description = Arc::new(description);
    let router = router.route(
        "/api/v1/openapi.json",
        get(move || {
            let description = description.clone();
            async move { Json(description.as_ref().clone()) }
        }),
    );
    let router = router
        .fallback(|| async { ApiError::RouteNotFound })
        // Checks Content-Length up front (413 before reading), and the body as it streams.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(body_limit))
        // A server-side stall is our problem, not the client's: 503, not 408.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ));
    // Outside the error mapping, so error responses carry CORS headers too.
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    // Every request gets an id (the client's `x-request-id`, or a new UUID), echoed in
    // the response and carried by every log line of the request through its span.
    let request_id = HeaderName::from_static("x-request-id");
    let router = router
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("request", request_id = id, method = %req.method(), path = req.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(middleware::map_request(drop_unusable_request_id));
    Ok(router.with_state(state))
}

/// A client's `x-request-id` is kept only if it is short, visible ASCII; otherwise a
/// fresh one is generated, so logs cannot be flooded or garbled through it.
async fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = |v: &axum::http::HeaderValue| {
        (1..=128).contains(&v.len()) && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    };
    let values: Vec<_> = request.headers().get_all("x-request-id").iter().collect();
    if values.len() > 1 || values.first().is_some_and(|v| !usable(v)) {
        request.headers_mut().remove("x-request-id");
    }
    request
}

/// HTTP metrics by route template (never the raw path, which holds ids), method and
/// final status.
async fn count_requests(
    State(state): State<AppState>,
    route: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    // Only the methods the API knows, so a client cannot mint new series at will.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "DELETE" | "PUT" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let route = route.map_or_else(|| "unmatched".to_owned(), |r| r.as_str().to_owned());
    let response = next.run(request).await;
    let m = &state.relay.metrics;
    let status = response.status().as_u16();
    m.http_requests
        .get_or_create(&HttpLabels {
            route: route.clone(),
            method,
            status,
        })
        .inc();
    m.http_duration
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Last line of defence: any error response that did not come from [`ApiError`]
/// (axum's 405, a layer's 413, …) is rewritten into the JSON shape, keeping its headers
/// (such as `Allow`).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let mut fresh = ApiError::from_status(status).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in fresh.headers_mut().drain() {
        if let Some(name) = name {
            parts.headers.insert(name, value);
        }
    }
    Response::from_parts(parts, fresh.into_body())
}

/// The authenticated caller: the DID in the bearer token's `sub` claim, within its
/// rate limit.
pub struct Caller(pub String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let value = single_header(&parts.headers, header::AUTHORIZATION.as_str())
            .map_err(|()| ApiError::Unauthorized("send exactly one Authorization header".into()))?
            .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        let caller = state.auth.verify(token).map_err(ApiError::Unauthorized)?;
        if let Some(limit) = &state.rate_limit {
            limit.check(&caller).map_err(ApiError::RateLimited)?;
        }
        Ok(Caller(caller))
    }
}

/// `Json<T>` whose rejections use our error shape: 400 `invalid_json`, 413, 415.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(
                ApiError::PayloadTooLarge("request body is larger than this server accepts".into()),
            ),
            Err(JsonRejection::BytesRejection(e)) => Err(ApiError::InvalidRequest(e.body_text())),
            Err(e) => Err(ApiError::InvalidJson(e.body_text())),
        }
    }
}

/// A message id from the path; anything but a UUID is a 400 naming the field.
pub struct MessageId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for MessageId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
        parse_id(&raw).map(MessageId).ok_or_else(|| {
            ApiError::InvalidRequest(
                "id must be a lowercase hyphenated UUID, as the server returned it".into(),
            )
        })
    }
}

/// A message id exactly as the server writes them (lowercase, hyphenated), so that the
/// ids a client sends and gets back compare equal as strings.
pub(crate) fn parse_id(raw: &str) -> Option<Uuid> {
    let id = Uuid::try_parse(raw).ok()?;
    (raw.len() == 36 && id.hyphenated().to_string() == raw).then_some(id)
}

/// The value of a header that may appear at most once; `Err` when it is repeated (a
/// proxy may merge or reorder repeats, so guessing which one counts is unsafe).
pub(crate) fn single_header<'a>(
    headers: &'a axum::http::HeaderMap,
    name: &str,
) -> Result<Option<&'a axum::http::HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        Err(())
    } else {
        Ok(first)
    }
}

/// `Some(field name)` problem text for a DID that fails the syntax check.
pub(crate) fn check_did(field: &str, value: &str) -> Result<(), ApiError> {
    if did::is_valid(value) {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "{field} must be a DID like did:plc:ewvi7nxzyoun6zhxrhs64oiz (at most {} characters)",
            did::MAX_LEN
        )))
    }
}
