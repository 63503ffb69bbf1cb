create table conversations (
    convo_id text primary key,
    last_seq bigint not null
);

create table messages (
    id uuid primary key,
    convo_id text not null,
    seq bigint not null,
    sender text not null,
    blob_key text not null unique,
    size integer not null,
    created_at timestamptz not null,
    expires_at timestamptz not null,
    unique (convo_id, seq)
);

create index messages_expires_at on messages (expires_at);

create table recipients (
    message_id uuid not null references messages (id) on delete cascade,
    recipient text not null,
    -- copied from the message so one recipient's pending list is one index range
    created_at timestamptz not null,
    acked_at timestamptz,
    primary key (message_id, recipient)
);

-- Answers "pending for one recipient, oldest first" without touching other users' rows.
create index recipients_pending on recipients (recipient, created_at, message_id)
    where acked_at is null;

create table idempotency_keys (
    sender text not null,
    key text not null,
    fingerprint text not null,
    message_id uuid not null,
    convo_id text not null,
    seq bigint not null,
    recipients text[] not null,
    size integer not null,
    created_at timestamptz not null,
    expires_at timestamptz not null,
    keep_until timestamptz not null,
    primary key (sender, key)
);

create index idempotency_keys_keep_until on idempotency_keys (keep_until);

-- Blobs whose rows are gone; emptied by the request that deleted them or by clean-up.
create table blob_deletions (
    blob_key text primary key,
    queued_at timestamptz not null
);
