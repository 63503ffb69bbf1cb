//! The project's own tests: one binary (links once), one module per concern.

mod common;

mod api;
mod auth;
mod blob_conformance;
mod process;
mod store_conformance;
