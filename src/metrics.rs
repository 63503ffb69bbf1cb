//! Prometheus metrics (prometheus-client, one registry per server, no global state):
//! HTTP traffic, object-store requests (what R2 bills), the message lifecycle, the
//! pending backlog, database connections and clean-up passes. Served at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// A label value enum, exposed in snake case (`put`, not `Put`).
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(match self {
                    $(Self::$variant => $text),+
                })
            }
        }
    };
}

label_enum!(MessageEvent { Stored => "stored", Acknowledged => "acknowledged", Expired => "expired", Deleted => "deleted" });
label_enum!(Outcome { Ok => "ok", Error => "error" });
label_enum!(Removed {
    Expired => "expired",
    Delivered => "delivered",
    IdempotencyKeys => "idempotency_keys",
    Blobs => "blobs",
    Orphans => "orphans",
});
label_enum!(PoolState { Open => "open", InUse => "in_use", Waiting => "waiting" });
label_enum!(
    /// An object-store request kind, as billed.
    BlobOp { Put => "put", Get => "get", Delete => "delete", List => "list", Head => "head" }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template (`/api/v1/messages/{id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub event: MessageEvent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemovedLabels {
    pub kind: Removed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub state: PoolState,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms … ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub messages: Family<MessageLabels, Counter>,
    pub pending_backlog: Gauge,
    pub oldest_pending_age: Gauge<f64, AtomicU64>,
    pub db_connections: Family<PoolLabels, Gauge>,
    pub cleanup_runs: Family<OutcomeLabels, Counter>,
    pub cleanup_duration: Histogram,
    pub cleanup_removed: Family<RemovedLabels, Counter>,
}

impl Metrics {
    /// A registry with every metric, plus the blob store's request counters.
    pub fn new(blob_ops: &crate::blob::OpFamily) -> Self {
        let mut registry = Registry::with_prefix("catbird");
        let m = Self {
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            messages: Family::default(),
            pending_backlog: Gauge::default(),
            oldest_pending_age: Gauge::default(),
            db_connections: Family::default(),
            cleanup_runs: Family::default(),
            cleanup_duration: latency_histogram(),
            cleanup_removed: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route template",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        registry.register(
            "blob_operations",
            "Object-store requests by kind (put, get, delete, list, head) and outcome, retries included",
            blob_ops.clone(),
        );
        registry.register(
            "messages",
            "Messages stored, acknowledged (per recipient), expired and deleted",
            m.messages.clone(),
        );
        registry.register(
            "pending_backlog",
            "Unacknowledged (message, recipient) pairs, as of the last clean-up pass",
            m.pending_backlog.clone(),
        );
        registry.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest unacknowledged message, as of the last clean-up pass",
            Unit::Seconds,
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "db_connections",
            "Database connections: open, in use, and requests waiting for one",
            m.db_connections.clone(),
        );
        registry.register(
            "cleanup_runs",
            "Clean-up passes by outcome",
            m.cleanup_runs.clone(),
        );
        registry.register_with_unit(
            "cleanup_duration",
            "Duration of clean-up passes",
            Unit::Seconds,
            m.cleanup_duration.clone(),
        );
        registry.register(
            "cleanup_removed",
            "What clean-up removed, by kind",
            m.cleanup_removed.clone(),
        );
        Self { registry, ..m }
    }

    pub fn message(&self, event: MessageEvent, n: u64) {
        if n > 0 {
            self.messages
                .get_or_create(&MessageLabels { event })
                .inc_by(n);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
