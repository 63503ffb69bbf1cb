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
use uuid::Uuid;

use super::{ApiJson, AppState, Caller, MessageId, check_did};
use crate::did;
use crate::error::ApiError;
use crate::relay::{Outgoing, Policy};
use crate::store::{Cursor, MessageMeta, Receipt};

const MAX_CONVO_ID: usize = 256;
const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_PAGE: i64 = 500;
const DEFAULT_PAGE: i64 = 100;
const MAX_ACK_IDS: usize = 500;

/// Standard alphabet; padding optional, as API.md promises.
const BASE64_IN: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
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

#[derive(Serialize)]
struct ReceiptView<'a> {
    id: Uuid,
    convo_id: &'a str,
    seq: i64,
    sender: &'a str,
    recipients: &'a [String],
    size: i64,
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

#[derive(Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SendBody {
    encrypted_data: String,
    convo_id: String,
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

pub(super) async fn send(
    State(state): State<AppState>,
    Caller(sender): Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    let policy = &state.relay.policy;
    let idempotency_key = idempotency_key(&headers)?;
    check_convo_id(&body.convo_id)?;
    if body.recipients.is_empty() {
        return Err(ApiError::InvalidRequest(
            "recipients must list at least one DID".into(),
        ));
    }
    let mut seen = HashSet::with_capacity(body.recipients.len());
    let mut recipients = Vec::with_capacity(body.recipients.len());
    for (i, r) in body.recipients.into_iter().enumerate() {
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
    let payload = decode_payload(&body.encrypted_data, policy.max_message_bytes)?;

    let sent = state
        .relay
        .send(Outgoing {
            sender,
            convo_id: body.convo_id,
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

pub(super) async fn fetch(
    State(state): State<AppState>,
    Caller(caller): Caller,
    MessageId(id): MessageId,
) -> Result<Json<MessageView>, ApiError> {
    let (meta, data) = state.relay.fetch(&caller, id).await?;
    Ok(Json(MessageView::new(meta, Some(&data))))
}

/// Raw query parameters, parsed by hand so each error names its field.
#[derive(Deserialize)]
pub(super) struct PendingParams {
    limit: Option<String>,
    cursor: Option<String>,
    convo_id: Option<String>,
    include_data: Option<String>,
}

#[derive(Serialize)]
pub(super) struct PendingPage {
    messages: Vec<MessageView>,
    cursor: Option<String>,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AckBody {
    ids: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct AckResult {
    acked: Vec<Uuid>,
    not_found: Vec<Uuid>,
}

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

pub(super) async fn withdraw(
    State(state): State<AppState>,
    Caller(caller): Caller,
    MessageId(id): MessageId,
) -> Result<StatusCode, ApiError> {
    state.relay.withdraw(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
