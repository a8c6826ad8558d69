//! LUN masking over real mutual TLS: every role's certificate × every kind
//! of LU × every operation against a running array node. Exactly the cells
//! an independent model of the grants allows succeed; a masked LU answers
//! NOT_FOUND like a missing one, a visible LU used beyond its access
//! PERMISSION_DENIED; every refused write or copy leaves every byte of
//! every real LU as it was. A certificate of another CA (claiming to be
//! db-server) or an expired one (the console's) gets no connection, and a
//! caller without a certificate gets `UNAUTHENTICATED` for every call:
//! those cells are checked too, against the same bytes.

use std::collections::BTreeMap;

use array_node::ArrayTestHooks;
use array_node::access::{Access, GrantConfig};
use array_node::config::RealLuConfig;
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::client::{ArrayClient, ClientError, ErrorKind};
use splitmirror_proto::security::role;

use crate::harness::{self, start_array};

const BLOCKS: u64 = 16;
const BLOCK_BYTES: usize = 4096;

/// Mirror 0 = origin 1 + mate 2 (its snapshot held: db-server made the
/// mate read-only for itself), mirror 3 = origin 4 + mate 5
/// (synchronized), plain LUs 8 and 9 (db-server may write both by
/// [[grant]], the console may read 9), and LU 42, which does not exist.
const LUS: [u32; 9] = [0, 1, 2, 3, 4, 5, 8, 9, 42];

/// The real LUs whose bytes are compared around every refused write.
const REAL_LUS: [u32; 6] = [1, 2, 4, 5, 8, 9];

/// What a copy from each LU goes to: the LU of the same geometry it would
/// be copied to in practice (the other side, the other mirror).
fn counterpart(lu: u32) -> u32 {
    match lu {
        0 => 3,
        3 => 0,
        1 => 2,
        2 => 1,
        4 => 5,
        5 => 4,
        8 => 9,
        9 => 8,
        other => other + 1,
    }
}

fn kind(lu: u32) -> &'static str {
    match lu {
        0 => "mirror (snapshot held)",
        3 => "mirror (synchronized)",
        1 | 4 => "origin",
        2 => "mate under snapshot",
        5 => "mate synchronized",
        8 | 9 => "plain",
        _ => "unknown",
    }
}

/// The model: the grants, written out by hand from the design (defaults,
/// the [[grant]] entries, and the snapshot's SetAccess), and the rule that
/// a mirror LU gives the least of its own, its origin's and its mate's.
struct Model {
    grants: BTreeMap<(&'static str, u32), Access>,
}

impl Model {
    fn new() -> Self {
        let mut grants = BTreeMap::new();
        for lu in [0, 1, 3, 4, 5, 8, 9] {
            grants.insert((role::DB, lu), Access::ReadWrite);
        }
        grants.insert((role::DB, 2), Access::Read);
        grants.insert((role::BACKUP, 2), Access::Read);
        grants.insert((role::BACKUP, 5), Access::Read);
        grants.insert((role::CONSOLE, 9), Access::Read);
        Self { grants }
    }

    fn access(&self, identity: &'static str, lu: u32) -> Access {
        let footprint: &[u32] = match lu {
            0 => &[0, 1, 2],
            3 => &[3, 4, 5],
            42 | 43 => return Access::None,
            _ => std::slice::from_ref(&lu),
        };
        footprint
            .iter()
            .map(|&l| {
                self.grants
                    .get(&(identity, l))
                    .copied()
                    .unwrap_or(Access::None)
            })
            .min()
            .expect("an LU")
    }

    /// The outcome of needing `needs` on `lu`: `None` allowed.
    fn require(&self, identity: &'static str, lu: u32, needs: Access) -> Option<ErrorKind> {
        match self.access(identity, lu) {
            Access::None => Some(ErrorKind::NotFound),
            has if has < needs => Some(ErrorKind::PermissionDenied),
            _ => None,
        }
    }

    fn expect(&self, identity: &'static str, op: Op, lu: u32) -> Option<ErrorKind> {
        match op {
            Op::Read | Op::Checksum | Op::Flush | Op::ModeSense => {
                self.require(identity, lu, Access::Read)
            }
            Op::Write => self.require(identity, lu, Access::ReadWrite),
            Op::Copy => self
                .require(identity, lu, Access::Read)
                .or_else(|| self.require(identity, counterpart(lu), Access::ReadWrite)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Copy,
    Checksum,
    Flush,
    ModeSense,
}

const OPS: [Op; 6] = [
    Op::Read,
    Op::Write,
    Op::Copy,
    Op::Checksum,
    Op::Flush,
    Op::ModeSense,
];

async fn run(client: &ArrayClient, op: Op, lu: u32) -> Result<(), ClientError> {
    match op {
        Op::Read => client.read(lu, 0, 1).await.map(drop),
        Op::Write => client.write(lu, 3, vec![0xEE; BLOCK_BYTES]).await.map(drop),
        Op::Copy => client
            .copy_range(lu, counterpart(lu), 0, BLOCKS)
            .await
            .map(drop),
        Op::Checksum => client.checksums(lu, 0, BLOCKS, 4).await.map(drop),
        Op::Flush => client.flush(lu).await,
        Op::ModeSense => client.mode_sense(lu).await.map(drop),
    }
}

/// A client of the array that trusts the CA but presents no certificate.
async fn anonymous_client(
    url: &str,
) -> pb::array_service_client::ArrayServiceClient<tonic::transport::Channel> {
    let ca = std::fs::read(harness::certs_dir().join("ca.pem")).expect("ca.pem");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name(role::ARRAY);
    let url = splitmirror_proto::security::Security::Insecure
        .url(url)
        .replacen("http://", "https://", 1);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS")
        .connect()
        .await
        .expect("a TLS connection without a client certificate");
    pb::array_service_client::ArrayServiceClient::new(channel)
}

/// [`run`] on a generated client: the gRPC code of a refusal.
async fn run_raw(
    client: &pb::array_service_client::ArrayServiceClient<tonic::transport::Channel>,
    op: Op,
    lu: u32,
) -> Result<(), tonic::Code> {
    let mut client = client.clone();
    let answer = match op {
        Op::Read => client
            .read(pb::ReadRequest {
                lu,
                lba: 0,
                blocks: 1,
            })
            .await
            .map(drop),
        Op::Write => client
            .write(pb::WriteRequest {
                lu,
                lba: 3,
                data: vec![0xEE; BLOCK_BYTES],
                ..Default::default()
            })
            .await
            .map(drop),
        Op::Copy => client
            .copy_range(pb::CopyRangeRequest {
                src_lu: lu,
                dst_lu: counterpart(lu),
                lba: 0,
                blocks: BLOCKS,
                min_bytes_per_s: None,
            })
            .await
            .map(drop),
        Op::Checksum => client
            .checksum_range(pb::ChecksumRangeRequest {
                lu,
                lba: 0,
                blocks: BLOCKS,
                chunk_blocks: 4,
            })
            .await
            .map(drop),
        Op::Flush => client.flush(pb::FlushRequest { lu }).await.map(drop),
        Op::ModeSense => client
            .mode_sense(pb::ModeSenseRequest { lu })
            .await
            .map(drop),
    };
    answer.map_err(|status| status.code())
}

/// Every real LU's digest, as db-server (which may read them all) sees it.
async fn digests(owner: &ArrayClient) -> Vec<Vec<[u8; 32]>> {
    let mut all = Vec::new();
    for lu in REAL_LUS {
        all.push(owner.checksums(lu, 0, BLOCKS, 1).await.expect("digest"));
    }
    all
}

fn config() -> array_node::ArrayConfig {
    let mut config = harness::small_array(BLOCKS * BLOCK_BYTES as u64);
    for id in [8, 9] {
        config.lus.push(RealLuConfig {
            id,
            block_size_bytes: BLOCK_BYTES as u32,
            block_count: BLOCKS,
        });
    }
    let grant = |identity: &str, lu, access| GrantConfig {
        identity: identity.into(),
        lu,
        access,
    };
    config.grants = vec![
        grant(role::DB, 8, Access::ReadWrite),
        grant(role::DB, 9, Access::ReadWrite),
        grant(role::CONSOLE, 9, Access::Read),
    ];
    config.validate().expect("valid config");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_gets_exactly_what_it_was_granted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(dir.path(), config(), ArrayTestHooks::default()).await;
    let client = |identity: &str| {
        ArrayClient::new(&node.url(), &harness::security(identity)).expect("array address")
    };
    let owner = client(role::DB);
    // Distinct bytes everywhere, so that a write that should not happen
    // would show.
    for lu in [0, 3, 8, 9] {
        let data: Vec<u8> = (0..BLOCKS as usize * BLOCK_BYTES)
            .map(|i| (i as u8).wrapping_add(lu as u8 * 41))
            .collect();
        owner.write(lu, 0, data).await.expect("fill");
    }
    // The snapshot of pair 0: db-server makes the mate read-only for itself.
    let (previous, now) = owner
        .set_access(
            role::DB,
            2,
            Some(pb::Access::Read),
            "snapshot in the matrix test",
        )
        .await
        .expect("set access");
    assert_eq!((previous, now), (pb::Access::ReadWrite, pb::Access::Read));
    // db-server still learns both pairs.
    let pairs = owner.list_pairs().await.expect("list pairs");
    assert_eq!(
        pairs.iter().map(|p| p.mirror_lu).collect::<Vec<_>>(),
        vec![0, 3]
    );

    let model = Model::new();
    let mut cells = 0;
    let mut failures = Vec::new();
    for identity in [role::DB, role::BACKUP, role::CONSOLE, role::ARRAY] {
        let caller = client(identity);
        // ListLus shows exactly the LUs the model makes visible.
        let listed: Vec<(u32, pb::Access)> = caller
            .list_lus()
            .await
            .expect("list LUs")
            .iter()
            .map(|lu| (lu.id, lu.access()))
            .collect();
        let visible: Vec<(u32, pb::Access)> = LUS
            .iter()
            .filter_map(|&lu| match model.access(identity, lu) {
                Access::None => None,
                Access::Read => Some((lu, pb::Access::Read)),
                Access::ReadWrite => Some((lu, pb::Access::ReadWrite)),
            })
            .collect();
        assert_eq!(listed, visible, "ListLus for {identity}");
        for lu in LUS {
            for op in OPS {
                cells += 1;
                let before = digests(&owner).await;
                let outcome = run(&caller, op, lu).await;
                let expected = model.expect(identity, op, lu);
                let got = outcome.as_ref().err().map(|e| e.kind);
                if got != expected {
                    failures.push(format!(
                        "{identity} {op:?} LU {lu} ({}): expected {expected:?}, got {outcome:?}",
                        kind(lu)
                    ));
                }
                if let Err(error) = &outcome {
                    if error.kind == ErrorKind::NotFound {
                        // The same words as for an LU that does not exist.
                        let named = if op == Op::Copy && model.access(identity, lu) != Access::None
                        {
                            counterpart(lu)
                        } else {
                            lu
                        };
                        assert_eq!(error.message, format!("LU {named} does not exist"));
                    }
                    if matches!(op, Op::Write | Op::Copy) {
                        assert_eq!(
                            digests(&owner).await,
                            before,
                            "a refused {op:?} by {identity} of LU {lu} changed bytes"
                        );
                    }
                }
            }
        }
        // Control: only the owner may change masking.
        cells += 1;
        let set = caller
            .set_access(role::BACKUP, 4, Some(pb::Access::Read), "matrix")
            .await;
        let expected = (identity != role::DB).then_some(ErrorKind::PermissionDenied);
        if set.as_ref().err().map(|e| e.kind) != expected {
            failures.push(format!(
                "{identity} SetAccess: expected {expected:?}, got {set:?}"
            ));
        }
        if set.is_ok() {
            owner
                .set_access(role::BACKUP, 4, None, "matrix: back to configured")
                .await
                .expect("unset");
        }
    }
    // Refused before the array sees the call: a certificate of another CA
    // (claiming db-server, who may write everything), an expired one of
    // this CA (the console's), and no certificate at all.
    let no_certificate = anonymous_client(&node.url()).await;
    for (who, caller) in [
        ("other-ca", Some(client("other-ca"))),
        ("expired", Some(client("expired"))),
        ("no certificate", None),
    ] {
        for lu in LUS {
            for op in OPS {
                cells += 1;
                let before = digests(&owner).await;
                let refused = match &caller {
                    // The handshake fails (the transport reports it), or
                    // the certificate is not sent and the call is refused
                    // as one without: either way, nothing is done.
                    Some(caller) => run(caller, op, lu).await.is_err(),
                    None => {
                        run_raw(&no_certificate, op, lu).await == Err(tonic::Code::Unauthenticated)
                    }
                };
                if !refused {
                    failures.push(format!(
                        "{who} {op:?} LU {lu} ({}) was not refused",
                        kind(lu)
                    ));
                }
                if matches!(op, Op::Write | Op::Copy) {
                    assert_eq!(
                        digests(&owner).await,
                        before,
                        "a refused {op:?} by {who} of LU {lu} changed bytes"
                    );
                }
            }
        }
        cells += 1;
        let set = match &caller {
            Some(caller) => caller
                .set_access(role::BACKUP, 4, Some(pb::Access::ReadWrite), "matrix")
                .await
                .is_ok(),
            None => {
                let mut raw = no_certificate.clone();
                raw.set_access(pb::SetAccessRequest {
                    identity: role::BACKUP.into(),
                    lu: 4,
                    access: Some(pb::Access::ReadWrite as i32),
                    purpose: "matrix".into(),
                })
                .await
                .is_ok()
            }
        };
        if set {
            failures.push(format!("{who} SetAccess was not refused"));
        }
    }
    println!(
        "LUN masking matrix: {cells} cells checked, {} wrong",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The grants the owner lists include the snapshot's, with its purpose.
    let grants = owner.list_access().await.expect("list access");
    let mate = grants
        .iter()
        .find(|g| g.identity == role::DB && g.lu == 2)
        .expect("the snapshot's grant");
    assert_eq!(
        (mate.access(), mate.source(), mate.purpose.as_str()),
        (
            pb::Access::Read,
            pb::GrantSource::Set,
            "snapshot in the matrix test"
        )
    );
    let own = client(role::BACKUP)
        .list_access()
        .await
        .expect("list access");
    assert!(own.iter().all(|g| g.identity == role::BACKUP), "{own:?}");
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_access_outlives_a_restart_of_the_array() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(dir.path(), config(), ArrayTestHooks::default()).await;
    let owner = ArrayClient::new(&node.url(), &harness::security(role::DB)).expect("address");
    owner
        .set_access(role::BACKUP, 0, Some(pb::Access::ReadWrite), "restore")
        .await
        .expect("grant");
    owner
        .set_access(role::BACKUP, 1, Some(pb::Access::ReadWrite), "restore")
        .await
        .expect("grant");
    owner
        .set_access(role::BACKUP, 2, Some(pb::Access::ReadWrite), "restore")
        .await
        .expect("grant");
    node.shutdown().await.expect("shutdown");

    let node = start_array(dir.path(), config(), ArrayTestHooks::default()).await;
    let backup = ArrayClient::new(&node.url(), &harness::security(role::BACKUP)).expect("address");
    backup
        .write(0, 0, vec![7; BLOCK_BYTES])
        .await
        .expect("the restore grant survived the restart");
    let other = backup.write(3, 0, vec![7; BLOCK_BYTES]).await;
    assert_eq!(other.map_err(|e| e.kind), Err(ErrorKind::NotFound));
    node.shutdown().await.expect("shutdown");

    // A damaged file stops the array from starting, with an error naming it.
    let path = dir.path().join(array_node::access::ACCESS_FILE);
    let text = std::fs::read_to_string(&path).expect("read access.json");
    std::fs::write(&path, text.replace("read-write", "read")).expect("damage");
    let listener = splitmirror_proto::node::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = array_node::spawn(
        array_node::ArrayNodeConfig {
            data_dir: dir.path().to_path_buf(),
            array: config(),
            hooks: ArrayTestHooks::default(),
            security: harness::security(role::ARRAY),
        },
        listener,
    )
    .await
    .err()
    .expect("a damaged access.json refuses to start");
    let message = refused.to_string();
    assert!(
        message.contains("access.json") && message.contains("checksum"),
        "{message}"
    );
}
