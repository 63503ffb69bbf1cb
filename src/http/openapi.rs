//! The OpenAPI 3.1 description, generated from the handlers' own annotations
//! (utoipa): a route exists only together with its description, so they cannot drift.
//! Served at `GET /api/v1/openapi.json`.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "catbird-server",
        description = "Relay for end-to-end-encrypted (MLS) chat messages between AT Protocol DIDs. \
                       The server stores and forwards ciphertext; it never sees plaintext.",
    ),
    modifiers(&Bearer),
    tags(
        (name = "messages", description = "Store, list, fetch, acknowledge and withdraw encrypted messages"),
        (name = "operations", description = "Liveness, readiness and metrics (no authentication)"),
    ),
    components(schemas(crate::error::ErrorBody)),
)]
pub struct ApiDoc;

/// The `bearer` security scheme: a JWT whose `sub` is the caller's DID.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        scheme.description = Some(
            "JWT with `exp` and a DID as `sub`; algorithm pinned by server configuration".into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}
