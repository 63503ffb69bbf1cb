//! `MessageStore` conformance: the same behaviour, asserted the same way, on SQLite and
//! PostgreSQL. A difference between the two is a bug.

use std::sync::Arc;
use std::time::Duration;

use catbird_server::store::{
    Collected, Cursor, Idempotency, InsertOutcome, MessageStore, NewMessage, PendingQuery, Receipt,
    StoreError,
};
use uuid::Uuid;

use crate::common::{Backend, Data};

crate::on_both!(
    insert_then_get_respects_access,
    seq_counts_per_conversation,
    idempotency_key_taken_writes_nothing,
    concurrent_inserts_fail_alone,
    pending_orders_pages_and_filters,
    ack_deletes_delivered_and_queues_blob,
    ack_without_delete_keeps_until_collect,
    delete_message_is_for_the_sender_only,
    expiry_hides_then_collect_removes,
    migrate_twice_and_ping,
);

async fn open(b: Backend) -> (Data, Arc<dyn MessageStore>) {
    let data = Data::new(b).await;
    let store = catbird_server::open_store(&data.config()).await.unwrap();
    (data, store)
}

fn new_message(convo: &str, sender: &str, recipients: &[&str]) -> NewMessage {
    NewMessage {
        id: Uuid::new_v4(),
        convo_id: convo.to_owned(),
        sender: sender.to_owned(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        blob_key: Uuid::new_v4().to_string(),
        size: 42,
        ttl: Duration::from_secs(3600),
        idempotency: None,
    }
}

async fn insert(store: &dyn MessageStore, m: &NewMessage) -> Receipt {
    match store.insert_message(m).await.unwrap() {
        InsertOutcome::Created(r) => r,
        other => panic!("expected Created, got {other:?}"),
    }
}

fn pending<'a>(recipient: &'a str, after: Cursor, limit: i64) -> PendingQuery<'a> {
    PendingQuery {
        recipient,
        convo_id: None,
        after,
        limit,
    }
}

async fn insert_then_get_respects_access(b: Backend) {
    let (_d, store) = open(b).await;
    let m = new_message("c", "did:plc:a", &["did:plc:b", "did:plc:c"]);
    let r = insert(&*store, &m).await;
    assert_eq!((r.id, r.seq, r.size), (m.id, 1, 42));
    assert_eq!(r.recipients, m.recipients);
    assert_eq!(
        r.created_at.timestamp_subsec_nanos() % 1_000_000,
        0,
        "millisecond precision"
    );
    assert_eq!(r.expires_at - r.created_at, chrono::Duration::hours(1));
    for who in ["did:plc:a", "did:plc:b", "did:plc:c"] {
        let got = store.get_message(m.id, who).await.unwrap().expect(who);
        assert_eq!(
            (
                got.id,
                got.blob_key.as_str(),
                got.created_at,
                got.expires_at
            ),
            (m.id, m.blob_key.as_str(), r.created_at, r.expires_at)
        );
    }
    assert_eq!(store.get_message(m.id, "did:plc:z").await.unwrap(), None);
    assert_eq!(
        store
            .get_message(Uuid::new_v4(), "did:plc:a")
            .await
            .unwrap(),
        None
    );
}

async fn seq_counts_per_conversation(b: Backend) {
    let (_d, store) = open(b).await;
    let mut seqs = Vec::new();
    for convo in ["x", "y", "x", "x", "y"] {
        seqs.push(
            insert(&*store, &new_message(convo, "did:plc:a", &["did:plc:b"]))
                .await
                .seq,
        );
    }
    assert_eq!(seqs, [1, 1, 2, 3, 2]);
}

async fn idempotency_key_taken_writes_nothing(b: Backend) {
    let (_d, store) = open(b).await;
    let mut first = new_message("c", "did:plc:a", &["did:plc:b"]);
    first.idempotency = Some(Idempotency {
        key: "k".into(),
        fingerprint: "f1".into(),
    });
    let receipt = insert(&*store, &first).await;
    let prior = store
        .find_idempotent("did:plc:a", "k")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (prior.fingerprint.as_str(), &prior.receipt),
        ("f1", &receipt)
    );
    assert!(
        store
            .find_idempotent("did:plc:other", "k")
            .await
            .unwrap()
            .is_none()
    );

    let mut second = new_message("c", "did:plc:a", &["did:plc:b"]);
    second.idempotency = Some(Idempotency {
        key: "k".into(),
        fingerprint: "f2".into(),
    });
    match store.insert_message(&second).await.unwrap() {
        InsertOutcome::KeyTaken(p) => {
            assert_eq!((p.fingerprint.as_str(), p.receipt), ("f1", receipt))
        }
        other => panic!("expected KeyTaken, got {other:?}"),
    }
    assert_eq!(
        store
            .pending(&pending("did:plc:b", Cursor::START, 10))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        insert(&*store, &new_message("c", "did:plc:a", &["did:plc:b"]))
            .await
            .seq,
        2,
        "seq not consumed"
    );
}

/// Concurrent sends (on SQLite: written by shared group commits) where some fail (a
/// blob key already used) or find their idempotency key taken by another of them: each
/// gets its own outcome, and the others are stored with gapless seqs.
async fn concurrent_inserts_fail_alone(b: Backend) {
    let (_d, store) = open(b).await;
    let key = |k: &str, f: &str| {
        Some(Idempotency {
            key: k.into(),
            fingerprint: f.into(),
        })
    };
    // Pairs: (plain, same blob key) and (key kN, same key kN).
    let mut messages = Vec::new();
    for i in 0..16 {
        let mut m = new_message("c", "did:plc:a", &["did:plc:b"]);
        let mut twin = new_message("c", "did:plc:a", &["did:plc:b"]);
        if i % 2 == 0 {
            twin.blob_key = m.blob_key.clone();
        } else {
            m.idempotency = key(&format!("k{i}"), "f");
            twin.idempotency = key(&format!("k{i}"), "f");
        }
        messages.push(m);
        messages.push(twin);
    }
    let outcomes = futures::future::join_all(messages.iter().map(|m| {
        let store = store.clone();
        async move { store.insert_message(m).await }
    }))
    .await;

    let mut seqs = Vec::new();
    for (i, pair) in outcomes.chunks(2).enumerate() {
        let created: Vec<&Receipt> = pair
            .iter()
            .filter_map(|o| match o {
                Ok(InsertOutcome::Created(r)) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 1, "pair {i}: exactly one stored: {pair:?}");
        seqs.push(created[0].seq);
        let other = pair
            .iter()
            .find(|o| !matches!(o, Ok(InsertOutcome::Created(_))))
            .unwrap();
        if i % 2 == 0 {
            assert!(
                matches!(other, Err(StoreError::Other(_))),
                "pair {i}: {other:?}"
            );
        } else {
            match other {
                Ok(InsertOutcome::KeyTaken(p)) => assert_eq!(&&p.receipt, &created[0]),
                o => panic!("pair {i}: expected KeyTaken, got {o:?}"),
            }
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=16).collect::<Vec<i64>>(), "gapless");
    let listed = store
        .pending(&pending("did:plc:b", Cursor::START, 100))
        .await
        .unwrap();
    assert_eq!(listed.len(), 16);
}

async fn pending_orders_pages_and_filters(b: Backend) {
    let (_d, store) = open(b).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let convo = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(
            insert(&*store, &new_message(convo, "did:plc:a", &["did:plc:b"]))
                .await
                .id,
        );
        tokio::time::sleep(Duration::from_millis(2)).await; // distinct timestamps: order = send order
    }
    insert(
        &*store,
        &new_message("even", "did:plc:a", &["did:plc:other"]),
    )
    .await;

    let mut seen = Vec::new();
    let mut after = Cursor::START;
    loop {
        let page = store
            .pending(&pending("did:plc:b", after, 3))
            .await
            .unwrap();
        seen.extend(page.iter().map(|m| m.id));
        match page.last() {
            Some(last) if page.len() == 3 => after = Cursor::after(last),
            _ => break,
        }
    }
    assert_eq!(seen, ids);
    let odd = store
        .pending(&PendingQuery {
            convo_id: Some("odd"),
            ..pending("did:plc:b", Cursor::START, 10)
        })
        .await
        .unwrap();
    assert_eq!(
        odd.iter().map(|m| m.id).collect::<Vec<_>>(),
        [ids[1], ids[3], ids[5]]
    );
    assert!(
        store
            .pending(&pending("did:plc:nobody", Cursor::START, 10))
            .await
            .unwrap()
            .is_empty()
    );
    let round_trip = Cursor::decode(
        &Cursor::after(
            &store
                .pending(&pending("did:plc:b", Cursor::START, 1))
                .await
                .unwrap()[0],
        )
        .encode(),
    );
    assert_eq!(
        store
            .pending(&pending("did:plc:b", round_trip.unwrap(), 10))
            .await
            .unwrap()
            .len(),
        6
    );
}

async fn ack_deletes_delivered_and_queues_blob(b: Backend) {
    let (_d, store) = open(b).await;
    let m = new_message("c", "did:plc:a", &["did:plc:b", "did:plc:c"]);
    insert(&*store, &m).await;
    let out = store
        .ack("did:plc:b", &[m.id, Uuid::new_v4()], true)
        .await
        .unwrap();
    assert_eq!((out.acked, out.freed_blobs), (vec![m.id], vec![]));
    assert!(
        store
            .pending(&pending("did:plc:b", Cursor::START, 10))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .ack("did:plc:z", &[m.id], true)
            .await
            .unwrap()
            .acked
            .is_empty(),
        "strangers cannot ack"
    );
    let out = store.ack("did:plc:c", &[m.id], true).await.unwrap();
    assert_eq!(
        (out.acked, out.freed_blobs),
        (vec![m.id], vec![m.blob_key.clone()])
    );
    assert_eq!(store.get_message(m.id, "did:plc:a").await.unwrap(), None);
    assert_eq!(
        store.queued_blob_deletions(10).await.unwrap(),
        vec![m.blob_key.clone()]
    );
    store
        .forget_blob_deletions(std::slice::from_ref(&m.blob_key))
        .await
        .unwrap();
    assert!(store.queued_blob_deletions(10).await.unwrap().is_empty());
}

async fn ack_without_delete_keeps_until_collect(b: Backend) {
    let (_d, store) = open(b).await;
    let m = new_message("c", "did:plc:a", &["did:plc:b"]);
    insert(&*store, &m).await;
    let out = store.ack("did:plc:b", &[m.id], false).await.unwrap();
    assert_eq!((out.acked, out.freed_blobs), (vec![m.id], vec![]));
    assert!(
        store
            .get_message(m.id, "did:plc:b")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.collect(false, 100).await.unwrap(),
        Collected::default()
    );
    assert_eq!(
        store.collect(true, 100).await.unwrap(),
        Collected {
            delivered: 1,
            ..Default::default()
        }
    );
    assert_eq!(store.get_message(m.id, "did:plc:b").await.unwrap(), None);
    assert_eq!(
        store.queued_blob_deletions(10).await.unwrap(),
        vec![m.blob_key]
    );
}

async fn delete_message_is_for_the_sender_only(b: Backend) {
    let (_d, store) = open(b).await;
    let m = new_message("c", "did:plc:a", &["did:plc:b"]);
    insert(&*store, &m).await;
    assert_eq!(store.delete_message(m.id, "did:plc:b").await.unwrap(), None);
    assert_eq!(
        store.delete_message(m.id, "did:plc:a").await.unwrap(),
        Some(m.blob_key.clone())
    );
    assert_eq!(store.delete_message(m.id, "did:plc:a").await.unwrap(), None);
    assert!(
        store
            .pending(&pending("did:plc:b", Cursor::START, 10))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.queued_blob_deletions(10).await.unwrap(),
        vec![m.blob_key]
    );
}

async fn expiry_hides_then_collect_removes(b: Backend) {
    let (_d, store) = open(b).await;
    let mut m = new_message("c", "did:plc:a", &["did:plc:b"]);
    m.ttl = Duration::from_millis(50);
    m.idempotency = Some(Idempotency {
        key: "k".into(),
        fingerprint: "f".into(),
    });
    insert(&*store, &m).await;
    let live = new_message("c", "did:plc:a", &["did:plc:b"]);
    insert(&*store, &live).await;
    tokio::time::sleep(Duration::from_millis(120)).await;

    assert_eq!(store.get_message(m.id, "did:plc:b").await.unwrap(), None);
    let ids: Vec<Uuid> = store
        .pending(&pending("did:plc:b", Cursor::START, 10))
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, [live.id]);
    assert!(
        store
            .ack("did:plc:b", &[m.id], true)
            .await
            .unwrap()
            .acked
            .is_empty()
    );
    assert_eq!(store.delete_message(m.id, "did:plc:a").await.unwrap(), None);

    let c = store.collect(true, 100).await.unwrap();
    assert_eq!(
        c,
        Collected {
            expired: 1,
            ..Default::default()
        },
        "the idempotency key outlives the message"
    );
    assert_eq!(
        store.queued_blob_deletions(10).await.unwrap(),
        vec![m.blob_key]
    );
    assert!(
        store
            .get_message(live.id, "did:plc:b")
            .await
            .unwrap()
            .is_some(),
        "live messages untouched"
    );
    assert!(
        store
            .find_idempotent("did:plc:a", "k")
            .await
            .unwrap()
            .is_some()
    );
}

async fn migrate_twice_and_ping(b: Backend) {
    let (data, store) = open(b).await;
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    let again = catbird_server::open_store(&data.config()).await.unwrap();
    again.ping().await.unwrap();
}
