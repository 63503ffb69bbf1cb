//! The OpenAPI description: served, 3.1, and exactly the router's routes: every
//! documented operation is answered, and every other method on those paths is 405.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::Value;

use crate::common::{Backend, Data, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn description_matches_the_router() {
    let data = Data::new(Backend::Sqlite).await;
    let s = TestServer::start(data.config()).await;
    let spec: Value = s
        .http
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let documented: BTreeMap<String, BTreeSet<String>> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, ops)| {
            (
                path.clone(),
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| m.to_uppercase())
                    .collect(),
            )
        })
        .collect();
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("/api/v1/messages", &["POST"][..]),
        ("/api/v1/messages/pending", &["GET"]),
        ("/api/v1/messages/ack", &["POST"]),
        ("/api/v1/messages/{id}", &["GET", "DELETE"]),
        ("/api/v1/messages/{id}/ack", &["POST"]),
        ("/healthz", &["GET"]),
        ("/readyz", &["GET"]),
        ("/metrics", &["GET"]),
    ]
    .into_iter()
    .map(|(p, ms)| (p.to_owned(), ms.iter().map(|m| m.to_string()).collect()))
    .collect();
    assert_eq!(documented, expected, "every route of API.md is described");

    let token = crate::common::token("did:plc:alice");
    for (path, methods) in &documented {
        let url = s.url(&path.replace("{id}", "6f1c0000-0000-4000-8000-000000000000"));
        for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
            let r = s
                .http
                .request(Method::from_bytes(method.as_bytes()).unwrap(), &url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            let routing_error = status == 405 || body["message"] == "route not found";
            if methods.contains(method) {
                assert!(
                    !routing_error,
                    "{method} {path} is described but not served: {status} {body}"
                );
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is not described, so it must not be served"
                );
            }
        }
        let spec_op = &spec["paths"][path];
        for op in spec_op.as_object().unwrap().values() {
            let responses = op["responses"].as_object().unwrap();
            if path.starts_with("/api/") {
                assert!(responses.contains_key("401"), "{path} documents 401");
                assert_eq!(
                    op["security"][0]["bearer"],
                    serde_json::json!([]),
                    "{path} needs the bearer token"
                );
            }
        }
    }
}
