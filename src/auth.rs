//! JWT bearer authentication. The algorithm is pinned by configuration, never taken
//! from the token: `JWT_SECRET` → HS256; `JWT_PUBLIC_KEY_FILE` → RS256, ES256 or EdDSA
//! by key type. With neither, a random secret is generated once into `data/jwt_secret`.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::did;

/// Where the generated development secret lives (relative to the working directory).
pub const GENERATED_SECRET_FILE: &str = "data/jwt_secret";

/// Shortest accepted HS256 secret: the hash's own size, as RFC 7518 §3.2 asks.
const MIN_SECRET_BYTES: usize = 32;

pub struct Auth {
    algorithm: Algorithm,
    decoding: DecodingKey,
    /// Present for HS256 only: the server can mint tokens with its own secret.
    encoding: Option<EncodingKey>,
    validation: Validation,
    leeway: u64,
    audience: Option<String>,
    issuer: Option<String>,
    /// Set when the secret came from [`GENERATED_SECRET_FILE`] (development mode).
    pub generated_secret: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// A NumericDate may have a fraction (RFC 7519 §2).
    iat: Option<f64>,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Auth {
    pub fn from_config(config: &Config) -> Result<Self, anyhow::Error> {
        let (algorithm, decoding, encoding, generated_secret) = match (
            &config.jwt_secret,
            &config.jwt_public_key_file,
        ) {
            (Some(_), Some(_)) => {
                anyhow::bail!("JWT_SECRET and JWT_PUBLIC_KEY_FILE are both set; set only one")
            }
            (Some(secret), None) => {
                if secret.len() < MIN_SECRET_BYTES {
                    anyhow::bail!(
                        "JWT_SECRET is {} bytes; use at least {MIN_SECRET_BYTES} (for example: openssl rand -base64 32)",
                        secret.len()
                    );
                }
                let (d, e) = hmac_keys(secret.as_bytes())?;
                (Algorithm::HS256, d, Some(e), None)
            }
            (None, Some(path)) => {
                let (alg, key) = public_key(path)?;
                (alg, key, None, None)
            }
            (None, None) => {
                let path = PathBuf::from(GENERATED_SECRET_FILE);
                let secret = load_or_generate_secret(&path)?;
                let (d, e) = hmac_keys(secret.as_bytes())?;
                (Algorithm::HS256, d, Some(e), Some(path))
            }
        };

        let mut validation = Validation::new(algorithm);
        validation.leeway = config.jwt_leeway_seconds;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);

        Ok(Self {
            algorithm,
            decoding,
            encoding,
            validation,
            leeway: config.jwt_leeway_seconds,
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            generated_secret,
        })
    }

    /// The caller's DID, or why the token is refused (safe to show the client).
    pub fn verify(&self, token: &str) -> Result<String, String> {
        use jsonwebtoken::errors::ErrorKind as K;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                K::ExpiredSignature => "token expired".to_owned(),
                K::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
                K::InvalidSignature => "token signature does not verify".to_owned(),
                K::InvalidAlgorithm => format!("token algorithm must be {:?}", self.algorithm),
                K::InvalidAudience => "token audience (aud) does not match".to_owned(),
                K::InvalidIssuer => "token issuer (iss) does not match".to_owned(),
                K::MissingRequiredClaim(c) => format!("token has no `{c}` claim"),
                _ => "token is malformed".to_owned(),
            })?;
        if let Some(iat) = data.claims.iat
            && iat > (unix_now() + self.leeway) as f64
        {
            return Err("token issued in the future (iat)".to_owned());
        }
        let Some(sub) = data.claims.sub else {
            return Err("token has no `sub` claim".to_owned());
        };
        if !did::is_valid(&sub) {
            return Err(
                "token `sub` must be a DID, like did:plc:ewvi7nxzyoun6zhxrhs64oiz".to_owned(),
            );
        }
        Ok(sub)
    }

    /// Sign a token this server accepts (HS256 configurations only).
    pub fn mint(&self, sub: &str, ttl: Duration) -> Result<String, anyhow::Error> {
        if !did::is_valid(sub) {
            anyhow::bail!(
                "--sub must be a DID, like did:plc:ewvi7nxzyoun6zhxrhs64oiz (got {sub:?})"
            );
        }
        let Some(key) = &self.encoding else {
            anyhow::bail!(
                "JWT_PUBLIC_KEY_FILE is set: this server only verifies tokens; sign them with the matching private key"
            );
        };
        let now = unix_now();
        let claims = MintClaims {
            sub,
            iat: now,
            exp: now + ttl.as_secs().max(1),
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            key,
        )?)
    }
}

fn hmac_keys(secret: &[u8]) -> Result<(DecodingKey, EncodingKey), anyhow::Error> {
    Ok((
        DecodingKey::from_secret(secret)?,
        EncodingKey::from_secret(secret)?,
    ))
}

fn public_key(path: &Path) -> Result<(Algorithm, DecodingKey), anyhow::Error> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))?;
    // jsonwebtoken would take an RSA private key as a "public" one; this server must
    // never hold a signing key it does not need.
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        anyhow::bail!(
            "JWT_PUBLIC_KEY_FILE {} holds a private key; give the public key (openssl pkey -in KEY -pubout)",
            path.display()
        );
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        if !pem_der(&pem).is_some_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID)) {
            anyhow::bail!(
                "JWT_PUBLIC_KEY_FILE {} is an EC key on a curve other than P-256; ES256 needs P-256",
                path.display()
            );
        }
        return Ok((Algorithm::ES256, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((Algorithm::EdDSA, key));
    }
    anyhow::bail!(
        "JWT_PUBLIC_KEY_FILE {} is not a PEM public key of a supported type (RSA, P-256 or Ed25519)",
        path.display()
    )
}

/// DER encoding of the P-256 curve OID (1.2.840.10045.3.1.7), as it appears in an SPKI.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The DER bytes of a single-block PEM file.
fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Read the development secret, creating it (mode 0600) on first use.
fn load_or_generate_secret(path: &Path) -> Result<String, anyhow::Error> {
    let context = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot use the generated JWT secret {}: {e}",
            path.display()
        )
    };
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= MIN_SECRET_BYTES => return Ok(s.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "{} is shorter than {MIN_SECRET_BYTES} bytes; delete it to generate a new one",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(context(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(context)?;
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    let secret = URL_SAFE_NO_PAD.encode(raw);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut f) => {
            f.write_all(secret.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(context)?;
            tracing::info!(file = %path.display(), "generated a JWT secret for development");
            Ok(secret)
        }
        // Another process (`catbird-server token`, say) created it first: use theirs.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => load_or_generate_secret(path),
        Err(e) => Err(context(e)),
    }
}
