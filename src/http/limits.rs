//! Abuse limits: a token bucket per caller (governor), and the CORS policy. Both are
//! built and checked at start-up, so a bad setting is an error message, never a panic
//! inside a layer (C10).

use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;

/// Requests per minute and burst for each caller DID.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl RateLimit {
    /// `None` when `RATE_LIMIT_PER_MINUTE` is 0 (no limit).
    pub fn from_config(config: &Config) -> Option<Arc<Self>> {
        let per_minute = NonZeroU32::new(config.rate_limit_per_minute)?;
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        let limit = Arc::new(Self {
            limiter: DefaultKeyedRateLimiter::keyed(
                Quota::per_minute(per_minute).allow_burst(burst),
            ),
        });
        // Forget idle callers now and then, so memory follows active callers only. The
        // task ends once the server (the last owner of the limiter) is gone.
        let weak: Weak<Self> = Arc::downgrade(&limit);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                match weak.upgrade() {
                    Some(limit) => limit.limiter.retain_recent(),
                    None => return,
                }
            }
        });
        Some(limit)
    }

    /// `Err(wait)` when `caller` must wait before its next request.
    pub fn check(&self, caller: &str) -> Result<(), Duration> {
        self.limiter
            .check_key(&caller.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The CORS layer for `CORS_ALLOWED_ORIGINS`, or `None` when it is empty.
pub fn cors(origins: &str) -> Result<Option<CorsLayer>, anyhow::Error> {
    let list: Vec<&str> = origins
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect();
    if list.is_empty() {
        return Ok(None);
    }
    let allow = if list == ["*"] {
        AllowOrigin::any()
    } else {
        let mut values = Vec::with_capacity(list.len());
        for origin in list {
            if origin == "*" {
                anyhow::bail!(
                    "CORS_ALLOWED_ORIGINS: `*` allows every origin and cannot be combined with others"
                );
            }
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let valid =
                rest.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#', ' ']));
            if !valid {
                anyhow::bail!(
                    "CORS_ALLOWED_ORIGINS: {origin:?} is not an origin; write scheme://host[:port], \
                     like https://app.example.com (no path, no trailing slash)"
                );
            }
            values.push(HeaderValue::from_str(origin).map_err(|_| {
                anyhow::anyhow!("CORS_ALLOWED_ORIGINS: {origin:?} is not a valid header value")
            })?);
        }
        AllowOrigin::list(values)
    };
    // Bearer tokens travel in a header, so credentials mode is never needed (and
    // tower-http would panic on credentials with a wildcard).
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(Duration::from_secs(3600)),
    ))
}
