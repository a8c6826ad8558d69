//! Who may call a node, and how calls travel: mutual TLS with node
//! identities by default, plain text only when asked for with `--insecure`.
//!
//! - Every program holds a [`Security`]: the cluster's CA and its own
//!   certificate and key ([`Security::from_dir`], the files
//!   `console certs init` writes), or [`Security::Insecure`].
//! - A node's **identity** is the first DNS name among its certificate's
//!   subject alternative names ([`identity_of_certificate`]); `console certs
//!   init` puts the role name there ([`role`]). A client verifies a server
//!   against the server's role name, whatever address it dials, so that a
//!   certificate of one role cannot stand in for another.
//! - Servers ask for a client certificate but do not require one at the TLS
//!   handshake: a caller without one may ask `grpc.health.v1` (container
//!   healthchecks) and nothing else. Every other call needs a certificate of
//!   the cluster's CA, checked by rustls at the handshake (a certificate of
//!   another CA, or an expired one, never gets a connection), and then the
//!   node's [`AccessPolicy`], decided by [`AuthorizeLayer`] before the
//!   handler runs, so that a refused call has no side effect.
//! - Handlers that decide per object (the array's LUN masking) read the
//!   [`Caller`] the layer put in the request's extensions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{
    Certificate, CertificateDer, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// The role names: each program's identity in the certificates `console
/// certs init` writes, and the TLS server name its clients verify.
pub mod role {
    pub const ARRAY: &str = "array-node";
    pub const DB: &str = "db-server";
    pub const BACKUP: &str = "backup-server";
    pub const CONSOLE: &str = "console";
}

/// The CA certificate's file name in a certificate directory.
pub const CA_FILE: &str = "ca.pem";

/// The health service, the one any TLS peer may call without a certificate.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// How a program proves who it is and checks its peers: the command-line
/// options every program flattens in.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Directory of certificates as `console certs init DIR` writes it:
    /// ca.pem (the cluster's CA) and this program's IDENTITY.pem and
    /// IDENTITY.key. Every call is then mutual TLS.
    #[arg(long, env = "SPLITMIRROR_TLS_DIR", global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Which certificate of --tls-dir is this program's (default: its role:
    /// array-node, db-server, backup-server or console).
    #[arg(long, env = "SPLITMIRROR_IDENTITY", global = true, value_name = "NAME")]
    pub identity: Option<String>,
    /// Plain text instead of TLS: nothing is encrypted, no caller is
    /// authenticated and every caller may do everything (no LUN masking).
    /// For tests on loopback only; logs a warning. Takes precedence over
    /// --tls-dir.
    #[arg(long, env = "SPLITMIRROR_INSECURE", global = true)]
    pub insecure: bool,
}

/// Why a program's credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "no certificates: give --tls-dir DIR (create one with `console certs init DIR`) or, \
         for plain text without authentication, --insecure"
    )]
    NoCredentials,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the certificate names no DNS identity ({reason})")]
    NoIdentity { path: PathBuf, reason: String },
    #[error("setting up TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
}

/// This program's credentials and how it checks its peers.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS with the cluster's CA.
    Mtls(Arc<Credentials>),
    /// Plain text, no authentication (`--insecure`).
    Insecure,
}

/// The CA and this program's certificate and key, as PEM.
pub struct Credentials {
    /// The identity in this program's certificate (its first DNS name).
    pub identity: String,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// The security the options ask for; `default_identity` is the
    /// program's role. Logs a warning for `--insecure`.
    pub fn from_args(args: &SecurityArgs, default_identity: &str) -> Result<Self, SecurityError> {
        if args.insecure {
            tracing::warn!(
                "--insecure: calls travel as plain text and no caller is authenticated; \
                 anyone who can reach this program's ports may read, write and control everything"
            );
            return Ok(Self::Insecure);
        }
        let dir = args.tls_dir.as_ref().ok_or(SecurityError::NoCredentials)?;
        let identity = args.identity.as_deref().unwrap_or(default_identity);
        Self::from_dir(dir, identity)
    }

    /// Mutual TLS with `DIR/ca.pem`, `DIR/NAME.pem` and `DIR/NAME.key`.
    pub fn from_dir(dir: &Path, name: &str) -> Result<Self, SecurityError> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|source| SecurityError::Read { path, source })
        };
        let ca_pem = read(CA_FILE)?;
        let cert_pem = read(&format!("{name}.pem"))?;
        let key_pem = read(&format!("{name}.key"))?;
        let cert_path = dir.join(format!("{name}.pem"));
        let der = first_pem_certificate(&cert_pem).ok_or_else(|| SecurityError::NoCertificate {
            path: cert_path.clone(),
        })?;
        let identity = identity_of_certificate(&CertificateDer::from(der)).map_err(|reason| {
            SecurityError::NoIdentity {
                path: cert_path,
                reason,
            }
        })?;
        Ok(Self::Mtls(Arc::new(Credentials {
            identity,
            ca_pem,
            cert_pem,
            key_pem,
        })))
    }

    /// Whether this is plain text without authentication.
    pub fn is_insecure(&self) -> bool {
        matches!(self, Self::Insecure)
    }

    /// This program's identity (none with `--insecure`).
    pub fn identity(&self) -> Option<&str> {
        match self {
            Self::Mtls(credentials) => Some(&credentials.identity),
            Self::Insecure => None,
        }
    }

    /// The URL scheme of calls: `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Mtls(_) => "https",
            Self::Insecure => "http",
        }
    }

    /// `target` (`host:port` or a URL) as a URL of this security's scheme.
    pub fn url(&self, target: &str) -> String {
        let host_port = target
            .split_once("://")
            .map_or(target, |(_, rest)| rest)
            .trim_end_matches('/');
        format!("{}://{host_port}", self.scheme())
    }

    /// The server side: this program's certificate, and client certificates
    /// of the cluster's CA asked for (not required at the handshake, see the
    /// module documentation).
    pub fn server_tls(&self) -> Option<ServerTlsConfig> {
        match self {
            Self::Mtls(credentials) => Some(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(
                        &credentials.cert_pem,
                        &credentials.key_pem,
                    ))
                    .client_ca_root(Certificate::from_pem(&credentials.ca_pem))
                    .client_auth_optional(true),
            ),
            Self::Insecure => None,
        }
    }

    /// The client side, for calls to a node of `server_role`: the server
    /// must present a certificate of the cluster's CA naming that role.
    pub fn client_tls(&self, server_role: &str) -> Option<ClientTlsConfig> {
        match self {
            Self::Mtls(credentials) => Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
                    .identity(Identity::from_pem(
                        &credentials.cert_pem,
                        &credentials.key_pem,
                    ))
                    .domain_name(server_role),
            ),
            Self::Insecure => None,
        }
    }

    /// An endpoint to `target` with TLS for `server_role` applied (and the
    /// windows and timeouts of [`crate::node::endpoint`]).
    pub fn endpoint(
        &self,
        target: &str,
        server_role: &str,
    ) -> Result<Endpoint, crate::node::NodeError> {
        let endpoint = crate::node::endpoint(&self.url(target))?;
        match self.client_tls(server_role) {
            Some(tls) => {
                endpoint
                    .tls_config(tls)
                    .map_err(|source| crate::node::NodeError::Address {
                        target: target.to_string(),
                        source,
                    })
            }
            None => Ok(endpoint),
        }
    }
}

/// The DER bytes of the first certificate in a PEM file.
fn first_pem_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = text.find(begin)? + begin.len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    let base64: String = text[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    decode_base64(&base64)
}

/// Standard base64 (RFC 4648, with padding), as PEM holds it. Written here
/// because it is twenty lines and only reads this program's own files.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for group in bytes.chunks(4) {
        let mut word = 0u32;
        for (i, &c) in group.iter().enumerate() {
            word |= value(c)? << (18 - 6 * i);
        }
        let produced = match group.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&word.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
}

/// A certificate's identity: the first DNS name among its subject
/// alternative names.
pub fn identity_of_certificate(certificate: &CertificateDer<'_>) -> Result<String, String> {
    let parsed = webpki::EndEntityCert::try_from(certificate).map_err(|e| e.to_string())?;
    parsed
        .valid_dns_names()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "no DNS name among its subject alternative names".to_string())
}

/// Who made a call, as the server stack established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A peer with a certificate of the cluster's CA: its identity.
    Identified(String),
    /// A TLS peer without a certificate: it may only ask for health.
    Anonymous,
    /// The node runs with `--insecure`: nobody is authenticated and every
    /// call is allowed.
    Unauthenticated,
}

impl Caller {
    /// The caller of a request (the layer put it there; a request without
    /// it is treated as anonymous, so that a missing layer fails closed).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// The identity, when the caller has one.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Self::Identified(identity) => Some(identity),
            Self::Anonymous | Self::Unauthenticated => None,
        }
    }

    fn from_extensions(extensions: &http::Extensions, insecure: bool) -> Caller {
        if insecure {
            return Caller::Unauthenticated;
        }
        let certificates = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        match certificates.as_deref().and_then(|chain| chain.first()) {
            Some(leaf) => match identity_of_certificate(leaf) {
                Ok(identity) => Caller::Identified(identity),
                Err(reason) => {
                    tracing::warn!("a client certificate of the CA has no identity: {reason}");
                    Caller::Anonymous
                }
            },
            None => Caller::Anonymous,
        }
    }
}

/// Which identities may call which of a node's methods. Every method needs
/// an identified caller; the control methods need one of the control
/// identities. Decisions per object (the array's LUs) are the handlers'.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    control_methods: Arc<[&'static str]>,
    control_identities: Arc<[String]>,
}

impl AccessPolicy {
    /// Every identified caller may call every method.
    pub fn any_identified() -> Self {
        Self {
            control_methods: Arc::from([]),
            control_identities: Arc::from([]),
        }
    }

    /// `control_methods` (full gRPC paths, `/package.Service/Method`) only
    /// for `control_identities`; the rest for every identified caller.
    pub fn with_control(
        control_methods: &[&'static str],
        control_identities: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            control_methods: Arc::from(control_methods),
            control_identities: control_identities.into_iter().collect(),
        }
    }

    /// The control methods, for tests that check each names a real method.
    pub fn control_methods(&self) -> &[&'static str] {
        &self.control_methods
    }

    /// Whether `caller` may call the method at `path`; the refusal says why.
    pub fn decide(&self, path: &str, caller: &Caller) -> Result<(), tonic::Status> {
        if path.starts_with(HEALTH_PREFIX) {
            return Ok(());
        }
        let identity = match caller {
            Caller::Unauthenticated => return Ok(()),
            Caller::Anonymous => {
                return Err(tonic::Status::unauthenticated(format!(
                    "{path} needs a client certificate of the cluster's CA \
                     (without one, only grpc.health.v1 answers)"
                )));
            }
            Caller::Identified(identity) => identity,
        };
        if self.control_methods.contains(&path) && !self.control_identities.contains(identity) {
            return Err(tonic::Status::permission_denied(format!(
                "{identity} may not call {path}: only {}",
                self.control_identities.join(", ")
            )));
        }
        Ok(())
    }
}

/// The server layer that establishes the [`Caller`] of every call, puts it
/// in the request's extensions and refuses what the [`AccessPolicy`]
/// forbids, before the call reaches a handler.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    policy: AccessPolicy,
    insecure: bool,
}

impl AuthorizeLayer {
    pub fn new(policy: AccessPolicy, security: &Security) -> Self {
        Self {
            policy,
            insecure: security.is_insecure(),
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            policy: self.policy.clone(),
            insecure: self.insecure,
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    policy: AccessPolicy,
    insecure: bool,
}

impl<S> tower::Service<http::Request<Body>> for Authorize<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let caller = Caller::from_extensions(request.extensions(), self.insecure);
        match self.policy.decide(request.uri().path(), &caller) {
            Ok(()) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => {
                tracing::info!(
                    path = request.uri().path(),
                    ?caller,
                    "refused: {}",
                    status.message()
                );
                Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_what_pem_holds() {
        assert_eq!(decode_base64("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGVsbG8h").as_deref(), Some(&b"hello!"[..]));
        assert_eq!(decode_base64("aGVsbA==").as_deref(), Some(&b"hell"[..]));
        assert_eq!(decode_base64("a*==").as_deref(), None);
    }

    #[test]
    fn the_policy_lets_health_through_and_control_only_to_control_identities() {
        let policy = AccessPolicy::with_control(
            &["/splitmirror.db.v1.DbService/Suspend"],
            ["console".to_string()],
        );
        let health = "/grpc.health.v1.Health/Check";
        let suspend = "/splitmirror.db.v1.DbService/Suspend";
        let status = "/splitmirror.db.v1.DbService/Status";
        let console = Caller::Identified("console".into());
        let backup = Caller::Identified("backup-server".into());
        assert!(policy.decide(health, &Caller::Anonymous).is_ok());
        assert_eq!(
            policy
                .decide(status, &Caller::Anonymous)
                .map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        assert!(policy.decide(status, &backup).is_ok());
        assert!(policy.decide(suspend, &console).is_ok());
        assert_eq!(
            policy.decide(suspend, &backup).map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(policy.decide(suspend, &Caller::Unauthenticated).is_ok());
    }

    #[test]
    fn url_keeps_host_and_port_and_takes_the_scheme_of_the_security() {
        let insecure = Security::Insecure;
        assert_eq!(insecure.url("127.0.0.1:5"), "http://127.0.0.1:5");
        assert_eq!(insecure.url("https://db:5/"), "http://db:5");
    }
}
