//! The project's own tests: one binary (links once), one module per concern.

mod common;
mod s3_server;

mod api;
mod auth;
mod blob_conformance;
mod crash;
mod faults;
mod hardening;
mod limits;
mod mls;
mod observability;
mod openapi;
mod process;
mod r2;
mod soak;
mod store_conformance;
