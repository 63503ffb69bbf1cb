//! `/api/v1/messages…`: validation and JSON shapes; the work is in [`crate::relay`].

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{ApiJson, AppState, Caller, MessageId, check_did};
use crate::did;
use crate::error::{ApiError, ErrorBody};
use crate::relay::{Outgoing, Policy};
use crate::store::{Cursor, MessageMeta, Receipt};

const MAX_CONVO_ID: usize = 256;
const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_PAGE: i64 = 500;
const DEFAULT_PAGE: i64 = 100;
const MAX_ACK_IDS: usize = 500;

/// A string schema with a pattern, for the description only: `Did`, `MessageIdText`.
macro_rules! string_schema {
    ($name:ident, $pattern:literal, $max:expr, $doc:literal) => {
        #[doc = $doc]
        pub(super) struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some($doc))
                    .pattern(Some($pattern))
                    .max_length($max)
                    .build()
                    .into()
            }
        }

        impl ToSchema for $name {}
    };
}

string_schema!(
    Did,
    "^did:[a-z]+:[A-Za-z0-9._:%-]*[A-Za-z0-9._%-]$",
    Some(2048),
    "A DID (AT Protocol syntax)"
);
string_schema!(
    MessageIdText,
    "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    None,
    "A message id, lowercase hyphenated"
);

/// Standard alphabet; padding optional, as API.md promises.
const BASE64_IN: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        // "aGl" and "aGk" both mean "hi": accept the non-canonical one too.
        .with_decode_allow_trailing_bits(true),
);

/// Largest request body: the base64 of the largest payload plus the largest recipient
/// list (JSON may escape every character, so be generous), plus room for the rest.
pub(super) fn body_limit(policy: &Policy) -> usize {
    let payload = policy.max_message_bytes.div_ceil(3) * 4;
    let recipients = policy.max_recipients * (did::MAX_LEN as u64 + 8);
    (payload + recipients + 64 * 1024)
        .try_into()
        .unwrap_or(usize::MAX)
}

fn rfc3339_ms<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// What the sender gets back for a stored message.
#[derive(Serialize, ToSchema)]
pub(super) struct ReceiptView<'a> {
    id: Uuid,
    convo_id: &'a str,
    /// Per-conversation sequence number: 1, 2, 3, … without gaps, in commit order.
    seq: i64,
    sender: &'a str,
    /// De-duplicated, in the order sent.
    recipients: &'a [String],
    /// Decoded payload size in bytes.
    size: i64,
    /// RFC 3339, UTC, milliseconds.
    #[serde(serialize_with = "rfc3339_ms")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_ms")]
    expires_at: DateTime<Utc>,
}

impl<'a> From<&'a Receipt> for ReceiptView<'a> {
    fn from(r: &'a Receipt) -> Self {
        Self {
            id: r.id,
            convo_id: &r.convo_id,
            seq: r.seq,
            sender: &r.sender,
            recipients: &r.recipients,
            size: r.size,
            created_at: r.created_at,
            expires_at: r.expires_at,
        }
    }
}

/// A stored message; `encrypted_data` only where asked for.
#[derive(Serialize, ToSchema)]
pub(super) struct MessageView {
    id: Uuid,
    convo_id: String,
    seq: i64,
    sender: String,
    size: i64,
    #[serde(serialize_with = "rfc3339_ms")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_ms")]
    expires_at: DateTime<Utc>,
    /// Canonical padded standard base64 of the stored bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Byte)]
    encrypted_data: Option<String>,
}

impl MessageView {
    fn new(m: MessageMeta, data: Option<&Bytes>) -> Self {
        Self {
            id: m.id,
            convo_id: m.convo_id,
            seq: m.seq,
            sender: m.sender,
            size: m.size,
            created_at: m.created_at,
            expires_at: m.expires_at,
            encrypted_data: data.map(|d| STANDARD.encode(d)),
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendBody {
    /// Standard base64 (RFC 4648 §4, padding optional) of the MLS ciphertext;
    /// 1 ..= MAX_MESSAGE_BYTES decoded bytes.
    #[schema(format = Byte, min_length = 2, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}(?:==)?|[A-Za-z0-9+/]{3}=?)?$")]
    encrypted_data: String,
    /// 1 ..= 256 printable ASCII characters without spaces.
    #[schema(min_length = 1, max_length = 256, pattern = "^[!-~]+$")]
    convo_id: String,
    /// 1 ..= MAX_RECIPIENTS DIDs; duplicates are removed.
    #[schema(min_items = 1, value_type = Vec<Did>)]
    recipients: Vec<String>,
}

fn check_convo_id(value: &str) -> Result<(), ApiError> {
    if (1..=MAX_CONVO_ID).contains(&value.len())
        && value.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(format!(
            "convo_id must be 1 to {MAX_CONVO_ID} printable ASCII characters without spaces"
        )))
    }
}

fn decode_payload(b64: &str, max: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "encrypted_data decodes to more than {max} bytes (MAX_MESSAGE_BYTES)"
        ))
    };
    // Check the size before decoding, so an oversized body costs no allocation.
    let unpadded = b64.trim_end_matches('=').len() as u64;
    if unpadded * 3 / 4 > max {
        return Err(too_large());
    }
    let data = BASE64_IN.decode(b64).map_err(|e| {
        ApiError::InvalidRequest(format!("encrypted_data is not standard base64: {e}"))
    })?;
    if data.is_empty() {
        return Err(ApiError::InvalidRequest(
            "encrypted_data must not be empty".into(),
        ));
    }
    if data.len() as u64 > max {
        return Err(too_large());
    }
    Ok(Bytes::from(data))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let bad = || {
        ApiError::InvalidRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        ))
    };
    let Some(value) = super::single_header(headers, "idempotency-key")
        .map_err(|()| ApiError::InvalidRequest("send at most one Idempotency-Key header".into()))?
    else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY
        || !bytes.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(bad());
    }
    Ok(Some(value.to_str().map_err(|_| bad())?.to_owned()))
}

/// Store an encrypted message for its recipients.
#[utoipa::path(post, path = "/api/v1/messages", tag = "messages", security(("bearer" = [])),
    request_body(content = SendBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]([ -~]{0,253}[!-~])?$", max_length = 255,
        description = "1 ..= 255 printable ASCII characters; a retry with the same key and request replays the original answer")),
    responses(
        (status = 201, description = "Stored (or replayed: header Idempotent-Replayed)", body = ReceiptView,
            headers(("Location" = String, description = "/api/v1/messages/{id}"), ("Idempotent-Replayed" = Option<String>, description = "`true` on a replay"))),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with a different request", body = ErrorBody),
        (status = 413, description = "Body or decoded payload too large", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
    ))]
pub(super) async fn send(
    State(state): State<AppState>,
    Caller(sender): Caller,
    headers: HeaderMap,
    ApiJson(SendBody {
        encrypted_data,
        convo_id,
        recipients: listed,
    }): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    let policy = &state.relay.policy;
    let idempotency_key = idempotency_key(&headers)?;
    check_convo_id(&convo_id)?;
    if listed.is_empty() {
        return Err(ApiError::InvalidRequest(
            "recipients must list at least one DID".into(),
        ));
    }
    let mut seen = HashSet::with_capacity(listed.len());
    let mut recipients = Vec::with_capacity(listed.len());
    for (i, r) in listed.into_iter().enumerate() {
        check_did(&format!("recipients[{i}]"), &r)?;
        if seen.insert(r.clone()) {
            recipients.push(r);
        }
    }
    if recipients.len() as u64 > policy.max_recipients {
        return Err(ApiError::InvalidRequest(format!(
            "recipients lists {} DIDs; at most {} (MAX_RECIPIENTS)",
            recipients.len(),
            policy.max_recipients
        )));
    }
    let payload = decode_payload(&encrypted_data, policy.max_message_bytes)?;
    // The base64 text is a third larger than the payload: free it before the upload.
    drop(encrypted_data);

    let sent = state
        .relay
        .send(Outgoing {
            sender,
            convo_id,
            recipients,
            payload,
            idempotency_key,
        })
        .await?;
    let location = format!("/api/v1/messages/{}", sent.receipt.id);
    let mut response =
        (StatusCode::CREATED, Json(ReceiptView::from(&sent.receipt))).into_response();
    let h = response.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("uuid path is a valid header"),
    );
    if sent.replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Fetch one message (sender or recipient); does not acknowledge it.
#[utoipa::path(get, path = "/api/v1/messages/{id}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description = "Message id, lowercase hyphenated")),
    responses(
        (status = 200, description = "The message with its data", body = MessageView),
        (status = 404, description = "No such message, expired, or not the caller's", body = ErrorBody),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
    ))]
pub(super) async fn fetch(
    State(state): State<AppState>,
    Caller(caller): Caller,
    MessageId(id): MessageId,
) -> Result<Json<MessageView>, ApiError> {
    let (meta, data) = state.relay.fetch(&caller, id).await?;
    Ok(Json(MessageView::new(meta, Some(&data))))
}

/// Raw query parameters, parsed by hand so each error names its field.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PendingParams {
    /// Page size, 1 ..= 500 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// Opaque, from the previous page (anything else is 400).
    #[param(pattern = "^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    /// Only this conversation.
    #[param(min_length = 1, max_length = 256, pattern = "^[!-~]+$")]
    convo_id: Option<String>,
    /// Add `encrypted_data` to each message (default false).
    #[param(value_type = Option<bool>)]
    include_data: Option<String>,
}

/// One page of the caller's unacknowledged messages, oldest first.
#[derive(Serialize, ToSchema)]
pub(super) struct PendingPage {
    messages: Vec<MessageView>,
    cursor: Option<String>,
}

/// List what the caller has not acknowledged yet, oldest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/messages/pending", tag = "messages", security(("bearer" = [])),
    params(PendingParams),
    responses(
        (status = 200, description = "A page; `cursor` is null on the last", body = PendingPage),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
    ))]
pub(super) async fn pending(
    State(state): State<AppState>,
    Caller(caller): Caller,
    query: Result<Query<PendingParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PendingPage>, ApiError> {
    let Query(p) = query.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = match p.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::InvalidRequest(format!("limit must be an integer from 1 to {MAX_PAGE}"))
            })?,
    };
    let after = match p.cursor.as_deref() {
        None => Cursor::START,
        Some(s) => Cursor::decode(s).ok_or_else(|| {
            ApiError::InvalidRequest(
                "cursor is not one this server returned; omit it to start from the oldest".into(),
            )
        })?,
    };
    if let Some(c) = &p.convo_id {
        check_convo_id(c)?;
    }
    let include_data = match p.include_data.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "include_data must be true or false".into(),
            ));
        }
    };
    let page = state
        .relay
        .pending(&caller, p.convo_id.as_deref(), after, limit, include_data)
        .await?;
    Ok(Json(PendingPage {
        messages: page
            .messages
            .into_iter()
            .map(|(m, d)| MessageView::new(m, d.as_ref()))
            .collect(),
        cursor: page.next.map(|c| c.encode()),
    }))
}

/// Acknowledge delivery (recipients only); twice is fine while the message exists.
#[utoipa::path(post, path = "/api/v1/messages/{id}/ack", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description = "Message id, lowercase hyphenated")),
    responses(
        (status = 204, description = "Acknowledged"),
        (status = 404, description = "No such message, expired, or the caller is not a recipient", body = ErrorBody),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
    ))]
pub(super) async fn ack_one(
    State(state): State<AppState>,
    Caller(caller): Caller,
    MessageId(id): MessageId,
) -> Result<StatusCode, ApiError> {
    let acked = state.relay.ack(&caller, &[id]).await?;
    if acked.is_empty() {
        Err(ApiError::NotFound)
    } else {
        Ok(StatusCode::NO_CONTENT)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AckBody {
    /// 1 ..= 500 message ids, lowercase hyphenated.
    #[schema(min_items = 1, max_items = 500, value_type = Vec<MessageIdText>)]
    ids: Vec<String>,
}

/// Which ids were acknowledged, and which are not the caller's to acknowledge.
#[derive(Serialize, ToSchema)]
pub(super) struct AckResult {
    acked: Vec<Uuid>,
    not_found: Vec<Uuid>,
}

/// Acknowledge many messages at once.
#[utoipa::path(post, path = "/api/v1/messages/ack", tag = "messages", security(("bearer" = [])),
    request_body(content = AckBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Per-id result, in request order", body = AckResult),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not `Content-Type: application/json`", body = ErrorBody),
    ))]
pub(super) async fn ack_many(
    State(state): State<AppState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<AckBody>,
) -> Result<Json<AckResult>, ApiError> {
    if body.ids.is_empty() || body.ids.len() > MAX_ACK_IDS {
        return Err(ApiError::InvalidRequest(format!(
            "ids must list 1 to {MAX_ACK_IDS} message ids"
        )));
    }
    let mut ids = Vec::with_capacity(body.ids.len());
    let mut seen = HashSet::with_capacity(body.ids.len());
    for (i, raw) in body.ids.iter().enumerate() {
        let id = super::parse_id(raw).ok_or_else(|| {
            ApiError::InvalidRequest(format!("ids[{i}] must be a lowercase hyphenated UUID"))
        })?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    let acked: HashSet<Uuid> = state.relay.ack(&caller, &ids).await?.into_iter().collect();
    let (acked, not_found) = ids.into_iter().partition(|id| acked.contains(id));
    Ok(Json(AckResult { acked, not_found }))
}

/// Withdraw a message (sender only): gone for everyone, with its blob.
#[utoipa::path(delete, path = "/api/v1/messages/{id}", tag = "messages", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, pattern = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description = "Message id, lowercase hyphenated")),
    responses(
        (status = 204, description = "Withdrawn"),
        (status = 404, description = "No such message, expired, or not sent by the caller", body = ErrorBody),
        (status = 400, description = "A field fails validation (`invalid_request`) or the body is not the JSON asked for (`invalid_json`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 429, description = "Per-caller rate limit exceeded; see Retry-After", body = ErrorBody),
        (status = 503, description = "Database or blob store unavailable, or the request timed out; see Retry-After", body = ErrorBody),
    ))]
pub(super) async fn withdraw(
    State(state): State<AppState>,
    Caller(caller): Caller,
    MessageId(id): MessageId,
) -> Result<StatusCode, ApiError> {
    state.relay.withdraw(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
