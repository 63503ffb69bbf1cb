//! JWT authentication, black-box over real HTTP (API.md "Authentication"): what is
//! accepted, what is refused with 401 `unauthorized` + `WWW-Authenticate: Bearer`, and
//! which key configurations stop the server at start-up.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use catbird_server::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::common::{Backend, Data, Reply, SECRET, TestServer, now, token_with};

/// Any authenticated route does; this one needs no body and answers 200 when auth passes.
const PENDING: &str = "/api/v1/messages/pending";

/// The default `JWT_LEEWAY_SECONDS`, which `Data::config` keeps.
const LEEWAY: i64 = 30;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Claims that pass every check, for `sub`.
fn good_claims(sub: &str) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + 3600})
}

/// A server with the harness's HS256 secret. `Data` is returned too: it owns the folder.
async fn hs256_server() -> (Data, TestServer) {
    let data = Data::new(Backend::Sqlite).await;
    let server = TestServer::start(data.config()).await;
    (data, server)
}

/// GET the pending list with this exact `Authorization` value (`None`: no header).
async fn pending_with(server: &TestServer, authorization: Option<&str>) -> Reply {
    let mut req = server.http.get(server.url(PENDING));
    if let Some(value) = authorization {
        req = req.header("Authorization", value);
    }
    Reply::from(req.send().await.unwrap()).await
}

async fn pending_bearer(server: &TestServer, token: &str) -> Reply {
    pending_with(server, Some(&format!("Bearer {token}"))).await
}

/// API.md: a refused token is 401 `unauthorized` with `WWW-Authenticate: Bearer`.
/// `why` names the case, since one test checks several.
fn assert_unauthorized(reply: Reply, why: &str) {
    assert_eq!(
        reply.status.as_u16(),
        401,
        "{why}: expected 401, body: {}",
        reply.body
    );
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer"),
        "{why}: WWW-Authenticate"
    );
    reply.expect(401, Some("unauthorized"));
}

fn assert_accepted(reply: Reply, why: &str) {
    assert_eq!(
        reply.status.as_u16(),
        200,
        "{why}: expected 200, body: {}",
        reply.body
    );
    assert!(
        reply.body["messages"].is_array(),
        "{why}: body: {}",
        reply.body
    );
}

fn b64url_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

// ---------------------------------------------------------------------------------
// HS256 (JWT_SECRET)
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_hs256_token_is_accepted() {
    let (_data, server) = hs256_server().await;
    let token = token_with(good_claims("did:plc:alice"), SECRET);
    assert_accepted(pending_bearer(&server, &token).await, "valid HS256 token");
    // The harness's own helper signs the same way; it must agree.
    let user = server.user("did:plc:alice");
    assert_accepted(user.pending("").await, "harness user");
}

/// The caller is the token's `sub`, nothing else: bob sees what was sent to him, carol
/// does not, with tokens that differ only in `sub`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_is_the_callers_identity() {
    let (_data, server) = hs256_server().await;
    let alice = server.user("did:plc:alice");
    let sent = alice
        .send("convo-auth", &["did:plc:bob"], b"hello bob")
        .await;
    let id = sent["id"].as_str().unwrap();
    assert_eq!(sent["sender"], "did:plc:alice");

    let bob = token_with(good_claims("did:plc:bob"), SECRET);
    let page = pending_bearer(&server, &bob).await.expect(200, None).body;
    let ids: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id]);

    let carol = token_with(good_claims("did:plc:carol"), SECRET);
    let page = pending_bearer(&server, &carol).await.expect(200, None).body;
    assert_eq!(page["messages"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_authorization_header_is_401() {
    let (_data, server) = hs256_server().await;
    assert_unauthorized(pending_with(&server, None).await, "no header");
}

/// Every `/api/v1/*` route needs the token, and auth is checked before the body or the
/// path is looked at (otherwise an anonymous caller could probe validation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_requires_a_token() {
    let (_data, server) = hs256_server().await;
    let id = uuid::Uuid::new_v4();
    let body = json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": ["did:plc:bob"]});
    let routes = [
        (Method::POST, "/api/v1/messages".to_owned(), Some(body)),
        (Method::GET, PENDING.to_owned(), None),
        (
            Method::POST,
            "/api/v1/messages/ack".to_owned(),
            Some(json!({"ids": [id]})),
        ),
        (Method::GET, format!("/api/v1/messages/{id}"), None),
        (Method::DELETE, format!("/api/v1/messages/{id}"), None),
        (Method::POST, format!("/api/v1/messages/{id}/ack"), None),
    ];
    for (method, path, body) in routes {
        let mut req = server.http.request(method.clone(), server.url(&path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let reply = Reply::from(req.send().await.unwrap()).await;
        assert_unauthorized(reply, &format!("{method} {path} without a token"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_bearer_scheme_is_401() {
    let (_data, server) = hs256_server().await;
    // A valid token under the wrong scheme must still be refused: the scheme matters.
    let token = token_with(good_claims("did:plc:alice"), SECRET);
    for value in [
        "Basic YWxpY2U6cGFzc3dvcmQ=".to_owned(),
        format!("Token {token}"),
        format!("Bearer{token}"),
        token.clone(),
        "Bearer".to_owned(),
        "Bearer    ".to_owned(),
    ] {
        assert_unauthorized(
            pending_with(&server, Some(&value)).await,
            &format!("Authorization: {value:?}"),
        );
    }
    // Control: the same token under the right scheme passes.
    assert_accepted(pending_bearer(&server, &token).await, "control");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_token_is_401() {
    let (_data, server) = hs256_server().await;
    for garbage in [
        "garbage",
        "not.a.jwt",
        "a.b.c.d",
        "..",
        "eyJhbGciOiJIUzI1NiJ9.%%%.xyz",
    ] {
        assert_unauthorized(
            pending_bearer(&server, garbage).await,
            &format!("token {garbage:?}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_beyond_leeway_is_401() {
    let (_data, server) = hs256_server().await;
    let token = token_with(
        json!({"sub": "did:plc:alice", "iat": now() - 7200, "exp": now() - LEEWAY - 60}),
        SECRET,
    );
    assert_unauthorized(pending_bearer(&server, &token).await, "expired");
}

/// `exp` slightly in the past but inside JWT_LEEWAY_SECONDS: clock skew is tolerated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expired_within_leeway_is_accepted() {
    let (_data, server) = hs256_server().await;
    let token = token_with(
        json!({"sub": "did:plc:alice", "exp": now() - LEEWAY / 3}),
        SECRET,
    );
    assert_accepted(
        pending_bearer(&server, &token).await,
        "expired 10 s ago, leeway 30 s",
    );
}

/// The leeway is the configured one, not a constant: with 0 the same token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leeway_follows_configuration() {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.jwt_leeway_seconds = 0;
    let server = TestServer::start(config).await;
    let token = token_with(json!({"sub": "did:plc:alice", "exp": now() - 10}), SECRET);
    assert_unauthorized(
        pending_bearer(&server, &token).await,
        "expired 10 s ago, leeway 0",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_in_the_future_is_401() {
    let (_data, server) = hs256_server().await;
    let token = token_with(
        json!({"sub": "did:plc:alice", "nbf": now() + LEEWAY + 300, "exp": now() + 3600}),
        SECRET,
    );
    assert_unauthorized(pending_bearer(&server, &token).await, "nbf in 330 s");
    // Within the leeway `nbf` is tolerated, so the refusal above is about `nbf` itself.
    let token = token_with(
        json!({"sub": "did:plc:alice", "nbf": now() + LEEWAY / 3, "exp": now() + 3600}),
        SECRET,
    );
    assert_accepted(pending_bearer(&server, &token).await, "nbf in 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iat_in_the_future_beyond_leeway_is_401() {
    let (_data, server) = hs256_server().await;
    let token = token_with(
        json!({"sub": "did:plc:alice", "iat": now() + LEEWAY + 300, "exp": now() + 7200}),
        SECRET,
    );
    assert_unauthorized(pending_bearer(&server, &token).await, "iat in 330 s");
    let token = token_with(
        json!({"sub": "did:plc:alice", "iat": now() + LEEWAY / 3, "exp": now() + 3600}),
        SECRET,
    );
    assert_accepted(pending_bearer(&server, &token).await, "iat in 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_exp_is_401() {
    let (_data, server) = hs256_server().await;
    let token = token_with(json!({"sub": "did:plc:alice", "iat": now()}), SECRET);
    assert_unauthorized(pending_bearer(&server, &token).await, "no exp");
    // `exp` of the wrong type is no better than none.
    let token = token_with(json!({"sub": "did:plc:alice", "exp": "tomorrow"}), SECRET);
    assert_unauthorized(pending_bearer(&server, &token).await, "exp is a string");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_that_is_not_a_did_is_401() {
    let (_data, server) = hs256_server().await;
    for sub in [
        json!("alice"),
        json!("did:plc:"),
        json!("DID:plc:alice"),
        json!("did:PLC:alice"),
        json!("did:plc:ali ce"),
        json!(""),
        json!(42),
        json!(format!("did:plc:{}", "a".repeat(2041))),
    ] {
        let token = token_with(json!({"sub": sub, "exp": now() + 3600}), SECRET);
        assert_unauthorized(pending_bearer(&server, &token).await, &format!("sub {sub}"));
    }
    let token = token_with(json!({"exp": now() + 3600}), SECRET);
    assert_unauthorized(pending_bearer(&server, &token).await, "no sub");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_401() {
    let (_data, server) = hs256_server().await;
    let other = "another-secret-that-is-also-32-bytes-or-more";
    let token = token_with(good_claims("did:plc:alice"), other);
    assert_unauthorized(pending_bearer(&server, &token).await, "wrong secret");
}

/// Claims changed after signing (here: `sub` swapped) must fail the signature check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_payload_is_401() {
    let (_data, server) = hs256_server().await;
    let token = token_with(good_claims("did:plc:alice"), SECRET);
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url_json(&good_claims("did:plc:mallory")),
        parts[2]
    );
    assert_unauthorized(pending_bearer(&server, &forged).await, "payload swapped");
}

/// The unsecured JWT of RFC 7519 §6: `alg: none` and an empty signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_is_401() {
    let (_data, server) = hs256_server().await;
    let payload = b64url_json(&good_claims("did:plc:alice"));
    let valid = token_with(good_claims("did:plc:alice"), SECRET);
    let valid_signature = valid.rsplit('.').next().unwrap();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64url_json(&json!({"alg": alg, "typ": "JWT"}));
        let unsigned = format!("{header}.{payload}.");
        assert_unauthorized(
            pending_bearer(&server, &unsigned).await,
            &format!("alg {alg}, no signature"),
        );
        // Even carrying a genuine HS256 signature, the header's algorithm is not trusted.
        let resigned = format!("{header}.{payload}.{valid_signature}");
        assert_unauthorized(
            pending_bearer(&server, &resigned).await,
            &format!("alg {alg}, borrowed signature"),
        );
    }
}

/// The algorithm is pinned to HS256: another HMAC with the very same secret is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hmac_algorithms_are_401() {
    let (_data, server) = hs256_server().await;
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token =
            jsonwebtoken::encode(&Header::new(alg), &good_claims("did:plc:alice"), &key).unwrap();
        assert_unauthorized(pending_bearer(&server, &token).await, &format!("{alg:?}"));
    }
}

/// A secret of exactly 32 bytes is the shortest accepted (the boundary of the
/// start-up check below), and it works end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_of_32_bytes_is_accepted() {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    let secret = "0123456789abcdef0123456789abcdef";
    assert_eq!(secret.len(), 32);
    config.jwt_secret = Some(secret.to_owned());
    let server = TestServer::start(config).await;
    let token = token_with(good_claims("did:plc:alice"), secret);
    assert_accepted(pending_bearer(&server, &token).await, "32-byte secret");
}

// ---------------------------------------------------------------------------------
// Audience and issuer
// ---------------------------------------------------------------------------------

const AUD: &str = "catbird-relay";
const ISS: &str = "https://auth.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_and_issuer_are_required_and_must_match() {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.jwt_audience = Some(AUD.to_owned());
    config.jwt_issuer = Some(ISS.to_owned());
    let server = TestServer::start(config).await;
    let exp = now() + 3600;
    let sub = "did:plc:alice";

    let refused = [
        ("no aud", json!({"sub": sub, "exp": exp, "iss": ISS})),
        (
            "wrong aud",
            json!({"sub": sub, "exp": exp, "iss": ISS, "aud": "someone-else"}),
        ),
        ("no iss", json!({"sub": sub, "exp": exp, "aud": AUD})),
        (
            "wrong iss",
            json!({"sub": sub, "exp": exp, "aud": AUD, "iss": "https://evil.example.com"}),
        ),
        ("neither", json!({"sub": sub, "exp": exp})),
    ];
    for (why, claims) in refused {
        let token = token_with(claims, SECRET);
        assert_unauthorized(pending_bearer(&server, &token).await, why);
    }

    let token = token_with(
        json!({"sub": sub, "exp": exp, "aud": AUD, "iss": ISS}),
        SECRET,
    );
    assert_accepted(pending_bearer(&server, &token).await, "right aud and iss");
}

/// Without JWT_AUDIENCE / JWT_ISSUER, `aud` and `iss` are not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aud_and_iss_are_ignored_when_not_configured() {
    let (_data, server) = hs256_server().await;
    let token = token_with(
        json!({"sub": "did:plc:alice", "exp": now() + 3600, "aud": "anything", "iss": "anyone"}),
        SECRET,
    );
    assert_accepted(
        pending_bearer(&server, &token).await,
        "unconfigured aud/iss",
    );
}

// ---------------------------------------------------------------------------------
// Public keys (JWT_PUBLIC_KEY_FILE)
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ec,
    Ed,
}

const KINDS: [KeyKind; 3] = [KeyKind::Rsa, KeyKind::Ec, KeyKind::Ed];

impl KeyKind {
    /// The algorithm API.md pins for this key type.
    fn alg(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::Ec => Algorithm::ES256,
            KeyKind::Ed => Algorithm::EdDSA,
        }
    }

    fn public_file(self) -> &'static str {
        match self {
            KeyKind::Rsa => "rsa_public.pem",
            KeyKind::Ec => "ec_public.pem",
            KeyKind::Ed => "ed25519_public.pem",
        }
    }

    fn private_file(self) -> &'static str {
        match self {
            KeyKind::Rsa => "rsa_private.pem",
            KeyKind::Ec => "ec_private.pem",
            KeyKind::Ed => "ed25519_private.pem",
        }
    }

    fn signing_key(self) -> EncodingKey {
        let pem = read_fixture(self.private_file());
        match self {
            KeyKind::Rsa => EncodingKey::from_rsa_pem(&pem),
            KeyKind::Ec => EncodingKey::from_ec_pem(&pem),
            KeyKind::Ed => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.private_file()))
    }

    /// A token signed with this kind's private key, as an identity provider would.
    fn sign(self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(self.alg()), claims, &self.signing_key()).unwrap()
    }
}

/// A server that only verifies, with `kind`'s public key.
async fn public_key_server(kind: KeyKind) -> (Data, TestServer) {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.jwt_secret = None;
    config.jwt_public_key_file = Some(fixture(kind.public_file()));
    let server = TestServer::start(config).await;
    (data, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_token_is_accepted_with_an_rsa_public_key() {
    let (_data, server) = public_key_server(KeyKind::Rsa).await;
    let token = KeyKind::Rsa.sign(&good_claims("did:plc:alice"));
    assert_accepted(pending_bearer(&server, &token).await, "RS256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_token_is_accepted_with_a_p256_public_key() {
    let (_data, server) = public_key_server(KeyKind::Ec).await;
    let token = KeyKind::Ec.sign(&good_claims("did:plc:alice"));
    assert_accepted(pending_bearer(&server, &token).await, "ES256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_token_is_accepted_with_an_ed25519_public_key() {
    let (_data, server) = public_key_server(KeyKind::Ed).await;
    let token = KeyKind::Ed.sign(&good_claims("did:plc:alice"));
    assert_accepted(pending_bearer(&server, &token).await, "EdDSA");
}

/// Public-key tokens go through the same claim checks, and carry the identity: bob's
/// RS256 token sees what alice's RS256 token sent him.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_get_the_same_claim_checks() {
    let (_data, server) = public_key_server(KeyKind::Rsa).await;
    let rsa = KeyKind::Rsa;

    let alice = rsa.sign(&good_claims("did:plc:alice"));
    let body = json!({"encrypted_data": "aGk=", "convo_id": "c1", "recipients": ["did:plc:bob"]});
    let sent = Reply::from(
        server
            .http
            .post(server.url("/api/v1/messages"))
            .bearer_auth(&alice)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
    .expect(201, None);
    assert_eq!(sent.body["sender"], "did:plc:alice");
    let bob = rsa.sign(&good_claims("did:plc:bob"));
    let page = pending_bearer(&server, &bob).await.expect(200, None).body;
    assert_eq!(page["messages"][0]["id"], sent.body["id"]);

    let refused = [
        (
            "expired",
            json!({"sub": "did:plc:bob", "exp": now() - LEEWAY - 60}),
        ),
        ("no exp", json!({"sub": "did:plc:bob"})),
        ("sub not a DID", json!({"sub": "bob", "exp": now() + 3600})),
        (
            "nbf in the future",
            json!({"sub": "did:plc:bob", "exp": now() + 3600, "nbf": now() + 600}),
        ),
    ];
    for (why, claims) in refused {
        assert_unauthorized(pending_bearer(&server, &rsa.sign(&claims)).await, why);
    }
}

/// A forged payload under a genuine RSA/EC/Ed25519 signature is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_public_key_tokens_are_401() {
    for kind in KINDS {
        let (_data, server) = public_key_server(kind).await;
        let token = kind.sign(&good_claims("did:plc:alice"));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64url_json(&good_claims("did:plc:mallory")),
            parts[2]
        );
        assert_unauthorized(
            pending_bearer(&server, &forged).await,
            &format!("{kind:?}: forged payload"),
        );
        // Control: the untouched token passes on this server.
        assert_accepted(
            pending_bearer(&server, &token).await,
            &format!("{kind:?}: control"),
        );
    }
}

/// The classic confusion attack: the verifier is handed an HS256 token whose HMAC key is
/// the (public!) PEM file. A server that took the algorithm from the token would accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_signed_with_the_public_key_is_401() {
    for kind in KINDS {
        let (_data, server) = public_key_server(kind).await;
        let pem = read_fixture(kind.public_file());
        // Both the exact bytes and the trimmed text, as attackers try both.
        let trimmed = String::from_utf8(pem.clone()).unwrap().trim().to_owned();
        for secret in [pem.as_slice(), trimmed.as_bytes()] {
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &good_claims("did:plc:alice"),
                &EncodingKey::from_secret(secret).unwrap(),
            )
            .unwrap();
            assert_unauthorized(
                pending_bearer(&server, &token).await,
                &format!("{kind:?} server, HS256 keyed with the public PEM"),
            );
        }
        // Nor does a public-key server fall back to any HMAC secret.
        let token = token_with(good_claims("did:plc:alice"), SECRET);
        assert_unauthorized(
            pending_bearer(&server, &token).await,
            &format!("{kind:?} server, HS256 with the test secret"),
        );
    }
}

/// Each server accepts only its own key's algorithm: validly signed tokens of the other
/// two kinds (ES256 against RS256, …) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_key_types_are_401() {
    for server_kind in KINDS {
        let (_data, server) = public_key_server(server_kind).await;
        for token_kind in KINDS.into_iter().filter(|k| *k != server_kind) {
            let token = token_kind.sign(&good_claims("did:plc:alice"));
            assert_unauthorized(
                pending_bearer(&server, &token).await,
                &format!("{token_kind:?} token against {server_kind:?} server"),
            );
        }
    }
}

/// RSA keys sign other RSA algorithms too; only RS256 is pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_rsa_algorithms_are_401() {
    let (_data, server) = public_key_server(KeyKind::Rsa).await;
    let key = KeyKind::Rsa.signing_key();
    for alg in [Algorithm::RS512, Algorithm::PS256] {
        let token =
            jsonwebtoken::encode(&Header::new(alg), &good_claims("did:plc:alice"), &key).unwrap();
        assert_unauthorized(pending_bearer(&server, &token).await, &format!("{alg:?}"));
    }
}

// ---------------------------------------------------------------------------------
// Start-up refusals: a key or secret that cannot be used stops the server
// ---------------------------------------------------------------------------------

/// `run` must fail before serving; the error is returned as `{e:#}` (what main prints).
/// Bounded so a server that wrongly starts makes the test fail instead of hanging.
async fn startup_error(config: Config) -> String {
    startup_outcome(config)
        .await
        .unwrap_or_else(|why| panic!("{why}"))
}

/// `Ok(error message)` when `run` refused to start, `Err(what happened instead)`.
async fn startup_outcome(config: Config) -> Result<String, &'static str> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = catbird_server::run(config, listener, std::future::pending());
    // Key checks come before anything slow, so a refusal is immediate; 10 s is only
    // the bound for the failure case (a server that starts never returns).
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(())) => Err("run returned Ok with an unusable key configuration"),
        Ok(Err(e)) => Ok(format!("{e:#}")),
        Err(_) => Err("the server started (still running after 10 s) with an unusable key"),
    }
}

fn key_file_config(data: &Data, path: PathBuf) -> Config {
    let mut config = data.config();
    config.jwt_secret = None;
    config.jwt_public_key_file = Some(path);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_that_is_not_a_key_stops_startup() {
    let data = Data::new(Backend::Sqlite).await;
    let cases: [(&str, &[u8]); 3] = [
        ("text.pem", b"this is not a key\n"),
        (
            "broken.pem",
            b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
        ),
        ("empty.pem", b""),
    ];
    for (name, content) in cases {
        let path = data.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let message = startup_error(key_file_config(&data, path)).await;
        assert!(
            message.contains("JWT_PUBLIC_KEY_FILE"),
            "{name}: error must name JWT_PUBLIC_KEY_FILE: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_key_file_stops_startup() {
    let data = Data::new(Backend::Sqlite).await;
    let path = data.dir.path().join("does-not-exist.pem");
    let message = startup_error(key_file_config(&data, path)).await;
    assert!(
        message.contains("JWT_PUBLIC_KEY_FILE"),
        "error must name JWT_PUBLIC_KEY_FILE: {message}"
    );
}

/// A private key where the public one belongs is an operator mistake; every token would
/// then fail, so it must be caught at start-up like any unusable key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_as_public_key_file_stops_startup() {
    let data = Data::new(Backend::Sqlite).await;
    // All three kinds are tried before failing, so the report says which ones slip by.
    let mut failures = Vec::new();
    for kind in KINDS {
        let config = key_file_config(&data, fixture(kind.private_file()));
        match startup_outcome(config).await {
            Ok(message) if message.contains("JWT_PUBLIC_KEY_FILE") => {}
            Ok(message) => failures.push(format!(
                "{kind:?}: error does not name JWT_PUBLIC_KEY_FILE: {message}"
            )),
            Err(why) => failures.push(format!("{kind:?}: {why}")),
        }
    }
    assert!(
        failures.is_empty(),
        "private key files accepted as JWT_PUBLIC_KEY_FILE:\n{}",
        failures.join("\n")
    );
}

/// API.md supports P-256 (ES256) only among EC curves; a P-384 key cannot verify ES256
/// tokens, so it must stop start-up instead of refusing every token later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_ec_curve_stops_startup() {
    let data = Data::new(Backend::Sqlite).await;
    let message = startup_error(key_file_config(&data, fixture("ec_p384_public.pem"))).await;
    assert!(
        message.contains("JWT_PUBLIC_KEY_FILE"),
        "P-384 key: error must name JWT_PUBLIC_KEY_FILE: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_jwt_secret_stops_startup() {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    let secret = "only-31-bytes-of-secret-materia";
    assert_eq!(secret.len(), 31);
    config.jwt_secret = Some(secret.to_owned());
    let message = startup_error(config).await;
    assert!(
        message.contains("JWT_SECRET"),
        "error must name JWT_SECRET: {message}"
    );
    // The message is printed and logged: it must not echo the secret itself.
    assert!(
        !message.contains(secret),
        "error leaks the secret: {message}"
    );
}

/// Two key sources are ambiguous (which algorithm?): refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_and_public_key_together_stop_startup() {
    let data = Data::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.jwt_public_key_file = Some(fixture(KeyKind::Rsa.public_file()));
    let message = startup_error(config).await;
    assert!(
        message.contains("JWT_SECRET") && message.contains("JWT_PUBLIC_KEY_FILE"),
        "error must name both variables: {message}"
    );
}
