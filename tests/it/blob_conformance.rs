//! `BlobStore` conformance, run on every implementation.

use std::sync::Arc;

use bytes::Bytes;
use catbird_server::blob::{BlobError, BlobStore, FsBlobStore};
use uuid::Uuid;

/// The suite; `keys_under` is the prefix every key must carry.
pub async fn conformance(store: Arc<dyn BlobStore>, keys_under: &str) {
    store.ping().await.unwrap();

    // Round trips, including the smallest payload and one of 1 MiB.
    let mut keys = Vec::new();
    for data in [
        vec![0u8],
        b"hello".to_vec(),
        (0..1 << 20).map(|i| (i % 253) as u8).collect(),
    ] {
        let key = store.put(Bytes::from(data.clone())).await.unwrap();
        let id = key
            .strip_prefix(keys_under)
            .unwrap_or_else(|| panic!("{key} not under {keys_under:?}"));
        assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 4, "{key}");
        assert_eq!(store.get(&key).await.unwrap(), data);
        keys.push(key);
    }
    let unique: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "every put gets a fresh key");

    // Missing objects.
    let missing = format!("{keys_under}{}", Uuid::new_v4());
    assert!(matches!(
        store.get(&missing).await,
        Err(BlobError::NotFound(_))
    ));

    // Deleting reports every key gone, including ones that were already missing.
    let mut doomed = keys[..2].to_vec();
    doomed.push(missing);
    let mut gone = store.delete_many(&doomed).await.unwrap();
    gone.sort();
    doomed.sort();
    assert_eq!(gone, doomed);
    for k in &keys[..2] {
        assert!(matches!(store.get(k).await, Err(BlobError::NotFound(_))));
    }
    assert_eq!(
        store.get(&keys[2]).await.unwrap().len(),
        1 << 20,
        "others untouched"
    );
    assert_eq!(
        store.delete_many(&keys[..2]).await.unwrap().len(),
        2,
        "deleting twice is fine"
    );
    assert!(store.delete_many(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn filesystem() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Arc::new(FsBlobStore::open(dir.path()).unwrap()), "").await;
    // The one blob the suite keeps is the only file: `ab/<uuid starting with ab>`,
    // nothing else left behind.
    let mut files = Vec::new();
    for shard in std::fs::read_dir(dir.path()).unwrap() {
        let shard = shard.unwrap();
        for file in std::fs::read_dir(shard.path()).unwrap() {
            let file = file.unwrap();
            files.push((
                shard.file_name(),
                file.file_name(),
                file.metadata().unwrap().len(),
            ));
        }
    }
    assert_eq!(files.len(), 1, "{files:?}");
    let (shard, name, len) = &files[0];
    let name = name.to_str().unwrap();
    assert!(Uuid::parse_str(name).is_ok() && name.starts_with(shard.to_str().unwrap()));
    assert_eq!(*len, 1 << 20);
}

#[tokio::test]
async fn filesystem_rejects_keys_that_are_not_uuids() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), b"x").unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    for key in ["../secret", "secret", "/etc/passwd", ""] {
        assert!(
            matches!(store.get(key).await, Err(BlobError::NotFound(_))),
            "{key}"
        );
    }
    assert!(dir.path().join("secret").exists());
}
