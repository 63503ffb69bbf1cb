//! Two MLS clients (OpenMLS) talking through a running catbird-server: Alice creates a
//! group, adds Bob from his KeyPackage, and sends the Welcome and "Hello, world!" through
//! the relay; Bob drains his pending queue, joins, decrypts, acknowledges and replies;
//! Alice decrypts the reply. The server only ever sees MLS ciphertext.
//!
//! ```sh
//! cargo run                       # a server on the embedded default, in one terminal
//! cargo run --example mls_chat    # in another, from the same folder
//! ```
//!
//! Tokens are minted with the server's HS256 secret: `JWT_SECRET`, or else the
//! development secret in `data/jwt_secret`. `CATBIRD_URL` picks the server (default
//! `http://127.0.0.1:3000`).

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use openmls::prelude::tls_codec::Deserialize;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use serde_json::{Value, json};

const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// One MLS client: its crypto provider, signing key, identity and relay token.
pub struct Client {
    pub did: String,
    token: String,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    group: Option<MlsGroup>,
}

impl Client {
    pub fn new(did: &str, token: String) -> anyhow::Result<Self> {
        let provider = OpenMlsRustCrypto::default();
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())?;
        signer.store(provider.storage())?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(did.as_bytes().to_vec()).into(),
            signature_key: signer.to_public_vec().into(),
        };
        Ok(Self {
            did: did.to_owned(),
            token,
            provider,
            signer,
            credential,
            group: None,
        })
    }

    /// A KeyPackage others can add this client with (a directory would publish it).
    pub fn key_package(&self) -> anyhow::Result<KeyPackage> {
        let bundle = KeyPackage::builder().build(
            CIPHERSUITE,
            &self.provider,
            &self.signer,
            self.credential.clone(),
        )?;
        Ok(bundle.key_package().clone())
    }

    /// Encrypt an application message for the group.
    fn encrypt(&mut self, text: &str) -> anyhow::Result<MlsMessageOut> {
        let group = self.group.as_mut().context("not in a group yet")?;
        Ok(group.create_message(&self.provider, &self.signer, text.as_bytes())?)
    }

    /// The conversation id: the MLS group id, hex-encoded.
    pub fn convo_id(&self) -> anyhow::Result<String> {
        Ok(hex::encode(
            self.group
                .as_ref()
                .context("not in a group yet")?
                .group_id()
                .as_slice(),
        ))
    }
}

/// The relay, seen from a client.
pub struct Relay {
    base: String,
    http: reqwest::Client,
}

impl Relay {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// POST one MLS message for `recipients`; returns the relay's receipt.
    pub async fn send(
        &self,
        from: &Client,
        recipients: &[&str],
        mls: &MlsMessageOut,
    ) -> anyhow::Result<Value> {
        let body = json!({
            "encrypted_data": STANDARD.encode(mls.to_bytes()?),
            "convo_id": from.convo_id()?,
            "recipients": recipients,
        });
        let r = self
            .http
            .post(format!("{}/api/v1/messages", self.base))
            .bearer_auth(&from.token)
            .json(&body)
            .send()
            .await?;
        if r.status() != 201 {
            bail!("send failed: {} {}", r.status(), r.text().await?);
        }
        Ok(r.json().await?)
    }

    /// Every pending message of `who`, oldest first, with its bytes.
    pub async fn drain(&self, who: &Client) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let url = format!(
                "{}/api/v1/messages/pending?include_data=true&limit=100{cursor}",
                self.base
            );
            let r = self.http.get(url).bearer_auth(&who.token).send().await?;
            if r.status() != 200 {
                bail!("pending failed: {} {}", r.status(), r.text().await?);
            }
            let page: Value = r.json().await?;
            for m in page["messages"].as_array().context("no messages array")? {
                let data = STANDARD.decode(m["encrypted_data"].as_str().context("no data")?)?;
                out.push((m["id"].as_str().context("no id")?.to_owned(), data));
            }
            match page["cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return Ok(out),
            }
        }
    }

    /// Acknowledge, only after the messages were processed (an ack may delete them).
    pub async fn ack(&self, who: &Client, ids: &[String]) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("{}/api/v1/messages/ack", self.base))
            .bearer_auth(&who.token)
            .json(&json!({ "ids": ids }))
            .send()
            .await?;
        if r.status() != 200 {
            bail!("ack failed: {} {}", r.status(), r.text().await?);
        }
        Ok(())
    }
}

/// Process what `who` received: join from a Welcome, decrypt application messages.
/// Returns the plaintexts, then acknowledges everything it processed.
pub async fn receive(relay: &Relay, who: &mut Client) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    let mut processed = Vec::new();
    for (id, bytes) in relay.drain(who).await? {
        let message = MlsMessageIn::tls_deserialize_exact(bytes.as_slice())?;
        match message.extract() {
            MlsMessageBodyIn::Welcome(welcome) => {
                let config = MlsGroupJoinConfig::builder()
                    .use_ratchet_tree_extension(true)
                    .build();
                let group = StagedWelcome::new_from_welcome(&who.provider, &config, welcome, None)?
                    .into_group(&who.provider)?;
                println!(
                    "{}: joined group {}",
                    who.did,
                    hex::encode(group.group_id().as_slice())
                );
                who.group = Some(group);
            }
            MlsMessageBodyIn::PrivateMessage(m) => {
                let provider = &who.provider;
                let group = who
                    .group
                    .as_mut()
                    .context("an application message before the Welcome")?;
                let processed = group.process_message(provider, m)?;
                if let ProcessedMessageContent::ApplicationMessage(app) = processed.into_content() {
                    let text = String::from_utf8(app.into_bytes())?;
                    println!("{}: decrypted {text:?}", who.did);
                    texts.push(text);
                }
            }
            _ => bail!("unexpected MLS message kind"),
        }
        processed.push(id);
    }
    if !processed.is_empty() {
        relay.ack(who, &processed).await?;
        println!("{}: acknowledged {} message(s)", who.did, processed.len());
    }
    Ok(texts)
}

/// The whole conversation; returns (what Bob read, what Alice read).
pub async fn converse(
    relay: &Relay,
    mut alice: Client,
    mut bob: Client,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let bob_key_package = bob.key_package()?;
    println!("{}: published a KeyPackage", bob.did);

    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .build();
    alice.group = Some(MlsGroup::new(
        &alice.provider,
        &alice.signer,
        &config,
        alice.credential.clone(),
    )?);
    println!("{}: created group {}", alice.did, alice.convo_id()?);

    let (provider, signer) = (&alice.provider, &alice.signer);
    let group = alice.group.as_mut().context("group")?;
    let (_commit, welcome, _info) =
        group.add_members(provider, signer, std::slice::from_ref(&bob_key_package))?;
    group.merge_pending_commit(provider)?;
    let receipt = relay.send(&alice, &[&bob.did], &welcome).await?;
    println!("{}: sent the Welcome (seq {})", alice.did, receipt["seq"]);

    let hello = alice.encrypt("Hello, world!")?;
    let receipt = relay.send(&alice, &[&bob.did], &hello).await?;
    println!(
        "{}: sent \"Hello, world!\" (seq {})",
        alice.did, receipt["seq"]
    );

    let bob_read = receive(relay, &mut bob).await?;

    let reply = bob.encrypt("Hello, Alice! -- Bob")?;
    let receipt = relay.send(&bob, &[&alice.did], &reply).await?;
    println!("{}: sent a reply (seq {})", bob.did, receipt["seq"]);

    let alice_read = receive(relay, &mut alice).await?;
    Ok((bob_read, alice_read))
}

/// An HS256 token for `sub`, signed with the server's secret.
pub fn mint(secret: &str, sub: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + 600});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &key,
    )?)
}

#[allow(dead_code)] // the test includes this file for `converse`, not for `main`
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::var("CATBIRD_URL").unwrap_or_else(|_| "http://127.0.0.1:3000".into());
    let secret = match std::env::var("JWT_SECRET") {
        Ok(s) => s,
        Err(_) => std::fs::read_to_string("data/jwt_secret")
            .context(
                "set JWT_SECRET, or run from the folder where the server keeps data/jwt_secret",
            )?
            .trim()
            .to_owned(),
    };
    let alice = Client::new("did:plc:alice", mint(&secret, "did:plc:alice")?)?;
    let bob = Client::new("did:plc:bob", mint(&secret, "did:plc:bob")?)?;
    let (bob_read, alice_read) = converse(&Relay::new(&base), alice, bob).await?;
    println!("\nBob read:   {bob_read:?}\nAlice read: {alice_read:?}");
    Ok(())
}
