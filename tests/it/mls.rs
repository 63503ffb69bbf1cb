//! Real MLS traffic through the relay: the `mls_chat` example's conversation, run
//! against the test server, and the plaintext is nowhere in the database or the blob
//! store (only ciphertext crosses the server).

#[path = "../../examples/mls_chat.rs"]
#[allow(dead_code)]
mod mls_chat;

use crate::common::{Backend, Data, Db, SECRET, TestServer};

const HELLO: &str = "Hello, world!";
const REPLY: &str = "Hello, Alice! -- Bob";

crate::on_all_backends!(alice_and_bob_talk_through_the_relay);

async fn alice_and_bob_talk_through_the_relay(b: Backend) {
    if b == Backend::Postgres {
        return; // the embedded default and the production shape
    }
    let data = Data::new(b).await;
    let mut c = data.config();
    c.delete_on_delivery = false; // keep every blob, to search it afterwards
    let s = TestServer::start(c).await;
    let alice = mls_chat::Client::new(
        "did:plc:alice",
        mls_chat::mint(SECRET, "did:plc:alice").unwrap(),
    )
    .unwrap();
    let bob = mls_chat::Client::new(
        "did:plc:bob",
        mls_chat::mint(SECRET, "did:plc:bob").unwrap(),
    )
    .unwrap();
    let (bob_read, alice_read) = mls_chat::converse(&mls_chat::Relay::new(&s.base), alice, bob)
        .await
        .unwrap();
    assert_eq!(bob_read, [HELLO]);
    assert_eq!(alice_read, [REPLY]);

    // Welcome, "Hello, world!" and the reply: three blobs, none holding plaintext.
    let blobs = data.blob_files();
    assert_eq!(blobs.len(), 3);
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    for path in &blobs {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !contains(&bytes, HELLO) && !contains(&bytes, REPLY),
            "plaintext in {}",
            path.display()
        );
    }
    match data.db().await {
        Db::Sqlite(_) => {
            for f in std::fs::read_dir(data.dir.path())
                .unwrap()
                .flatten()
                .filter(|f| f.path().is_file())
            {
                let bytes = std::fs::read(f.path()).unwrap();
                assert!(
                    !contains(&bytes, HELLO) && !contains(&bytes, REPLY),
                    "plaintext in {}",
                    f.path().display()
                );
            }
        }
        Db::Pg(mut conn) => {
            for table in [
                "messages",
                "recipients",
                "conversations",
                "idempotency_keys",
                "blob_deletions",
            ] {
                let sql = sqlx::AssertSqlSafe(format!(
                    "select coalesce(string_agg(t::text, ' '), '') from {table} t"
                ));
                let dump: String = sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap();
                assert!(
                    !dump.contains(HELLO) && !dump.contains(REPLY),
                    "plaintext in {table}"
                );
            }
        }
    }
}
