//! Certificates for mutual TLS: a certificate authority and one
//! certificate per node role (`console certs init DIR`, the demo, the tests
//! and the compose init service).
//!
//! A node's identity is the FIRST DNS subject-alternative name of its
//! certificate. Servers are verified against their role name: a client sets
//! the TLS server name to the role (for example `array-node`) whatever
//! address it dials, so one certificate serves a node however it is reached.
//! `localhost`, 127.0.0.1 and ::1 are in every certificate as well, and
//! `extra_sans` adds the names and addresses of a real LAN, so that tools
//! which check the dialled address (grpcurl) accept the certificate too.
//!
//! Every leaf certificate carries both the serverAuth and the clientAuth
//! extended key usage: every node is a server to some and a client of
//! others, with one identity.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// The four node roles, each of which gets a certificate from [`init`]
/// whose identity (first DNS name) is the role name.
pub const ROLES: [&str; 4] = ["array-node", "db-server", "backup-server", "console"];

/// The file name stem of the certificate authority: `ca.pem` and `ca.key`.
pub const CA_NAME: &str = "ca";

/// The common name of the authority [`init`] creates.
pub const CA_COMMON_NAME: &str = "splitmirror CA";

/// How long certificates from [`init`] are valid unless told otherwise:
/// 825 days, the longest lifetime browsers accepted for TLS server
/// certificates when this default was chosen in the wider world.
pub const DEFAULT_VALIDITY_DAYS: u32 = 825;

/// How long the authority of [`Authority::new`] is valid: ten years, so
/// that it outlives the certificates it issues with the default validity.
pub const CA_VALIDITY_DAYS: u32 = 3650;

/// How far in the past a normal validity window starts, so that a node whose
/// clock is slightly behind the one that issued the certificate still
/// accepts it.
const CLOCK_SKEW_ALLOWANCE: time::Duration = time::Duration::hours(1);

/// The path of the certificate (PEM) named `name` in `dir`: `DIR/NAME.pem`.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// The path of the private key (PKCS#8 PEM) named `name` in `dir`:
/// `DIR/NAME.key`.
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From one hour ago (clock skew between nodes) for this many days.
    FromNow { days: u32 },
    /// An explicit window, for example one wholly in the past so that a test
    /// holds an expired certificate ([`Validity::long_expired`]).
    Window {
        not_before: SystemTime,
        not_after: SystemTime,
    },
}

impl Default for Validity {
    fn default() -> Self {
        Validity::FromNow {
            days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

impl Validity {
    /// A window that ended long ago: 2000-01-01 to 2001-01-01 (UTC). A
    /// certificate issued with it is refused by every peer as expired.
    pub fn long_expired() -> Self {
        Validity::Window {
            not_before: rcgen::date_time_ymd(2000, 1, 1).into(),
            not_after: rcgen::date_time_ymd(2001, 1, 1).into(),
        }
    }

    /// The window as dates, checked: at least one day long for
    /// [`Validity::FromNow`], not_after after not_before for a window.
    fn resolve(self) -> Result<(OffsetDateTime, OffsetDateTime), CertsError> {
        match self {
            Validity::FromNow { days } => {
                if days == 0 {
                    return Err(CertsError::ValidityTooShort);
                }
                let not_before = OffsetDateTime::now_utc() - CLOCK_SKEW_ALLOWANCE;
                let not_after = not_before
                    .checked_add(time::Duration::days(i64::from(days)))
                    .ok_or(CertsError::ValidityTooLong { days })?;
                Ok((not_before, not_after))
            }
            Validity::Window {
                not_before,
                not_after,
            } => {
                if not_after <= not_before {
                    return Err(CertsError::EmptyValidityWindow);
                }
                Ok((not_before.into(), not_after.into()))
            }
        }
    }
}

/// What went wrong making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{name:?} cannot be a DNS name in a certificate (letters, digits, '-' and '.' only)")]
    InvalidDnsName { name: String },
    #[error("a certificate must be valid for at least one day")]
    ValidityTooShort,
    #[error("a validity of {days} days ends beyond the year 9999")]
    ValidityTooLong { days: u32 },
    #[error("the validity window ends before it starts")]
    EmptyValidityWindow,
    #[error("generating the key pair for {identity}: {source}")]
    GenerateKey {
        identity: String,
        source: rcgen::Error,
    },
    #[error("signing the certificate of {identity}: {source}")]
    Sign {
        identity: String,
        source: rcgen::Error,
    },
    #[error(
        "{} already exists; refusing to replace existing certificates unless forced",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("creating the directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// PKCS#8 PEM. Not shown by `Debug`.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<private key>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes `DIR/NAME.pem` and `DIR/NAME.key` (mode 0600 on unix), each
    /// through a temporary file in DIR that is synced and renamed over the
    /// final name, so that a reader never sees half a key. Replaces files
    /// of those names. Answers the two paths, certificate first.
    pub fn write(&self, dir: &Path, name: &str) -> Result<[PathBuf; 2], CertsError> {
        let paths = self.write_unsynced_dir(dir, name)?;
        sync_dir(dir)?;
        Ok(paths)
    }

    fn write_unsynced_dir(&self, dir: &Path, name: &str) -> Result<[PathBuf; 2], CertsError> {
        let key = key_path(dir, name);
        write_file_atomically(&key, self.key_pem.as_bytes(), FileKind::PrivateKey)?;
        let cert = cert_path(dir, name);
        write_file_atomically(&cert, self.cert_pem.as_bytes(), FileKind::Public)?;
        Ok([cert, key])
    }
}

/// An in-memory certificate authority (ECDSA P-256) that issues the node
/// certificates.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("ca_cert_pem", &self.issuer.pem())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new authority with a fresh key and a self-signed certificate
    /// named `common_name`, valid from one hour ago for
    /// [`CA_VALIDITY_DAYS`]: longer than any certificate it issues with the
    /// default validity.
    pub fn new(common_name: &str) -> Result<Self, CertsError> {
        Self::with_validity(
            common_name,
            Validity::FromNow {
                days: CA_VALIDITY_DAYS,
            },
        )
    }

    /// A new authority whose own certificate is valid for `validity`
    /// (a certificate it issues is refused once the authority's has
    /// expired, whatever its own dates say).
    pub fn with_validity(common_name: &str, validity: Validity) -> Result<Self, CertsError> {
        let identity = format!("the authority {common_name:?}");
        let key = KeyPair::generate().map_err(|source| CertsError::GenerateKey {
            identity: identity.clone(),
            source,
        })?;
        let (not_before, not_after) = validity.resolve()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer = CertifiedIssuer::self_signed(params, key)
            .map_err(|source| CertsError::Sign { identity, source })?;
        Ok(Authority { issuer })
    }

    /// The authority's certificate, PEM: what every node trusts.
    pub fn ca_cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The authority's private key, PKCS#8 PEM.
    pub fn ca_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for `identity` with a fresh key. Its
    /// subject-alternative names are, in this order: DNS `identity` (the
    /// first DNS name is the identity), DNS `localhost`, IP 127.0.0.1, IP
    /// ::1, then each of `extra_sans` — an IP address if it parses as one,
    /// a DNS name otherwise; a name already in the list is not repeated.
    pub fn issue(
        &self,
        identity: &str,
        extra_sans: &[String],
        validity: Validity,
    ) -> Result<IssuedCert, CertsError> {
        let (not_before, not_after) = validity.resolve()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_only(identity);
        params.subject_alt_names = subject_alt_names(identity, extra_sans)?
            .into_iter()
            .map(SanType::from)
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;

        let key = KeyPair::generate().map_err(|source| CertsError::GenerateKey {
            identity: identity.to_owned(),
            source,
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertsError::Sign {
                identity: identity.to_owned(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What [`init`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// Names and addresses added to every role certificate after the fixed
    /// ones (see [`Authority::issue`]), e.g. a host's LAN address.
    pub extra_sans: Vec<String>,
    /// How long the role certificates are valid, from one hour ago.
    pub validity_days: u32,
    /// Replace certificates already in the directory.
    pub force: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            extra_sans: Vec::new(),
            validity_days: DEFAULT_VALIDITY_DAYS,
            force: false,
        }
    }
}

/// What [`init`] wrote, for the CLI to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitReport {
    /// Every file written, in the order written.
    pub files: Vec<PathBuf>,
    /// One entry per role, in the order of [`ROLES`].
    pub identities: Vec<IdentityReport>,
}

/// One issued certificate, as [`init`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityReport {
    /// The identity: the first DNS name.
    pub identity: String,
    /// Every subject-alternative name in order, `DNS:name` or `IP:address`
    /// (the notation of `openssl x509 -text`).
    pub sans: Vec<String>,
    pub not_after: SystemTime,
    /// `not_after` for people: `YYYY-MM-DD HH:MM:SS UTC`.
    pub not_after_utc: String,
}

/// Creates `dir` if needed and writes into it a new certificate authority
/// (`ca.pem`, `ca.key`) and, for each of [`ROLES`], `ROLE.pem` and
/// `ROLE.key`. Keys are mode 0600 on unix; every file goes through a
/// synced temporary file renamed over its final name.
///
/// Without `force`, when any of those ten files exists it refuses (naming
/// the file) before writing anything, so that an existing authority — whose
/// certificates nodes may already be using — is never replaced by mistake.
pub fn init(dir: &Path, options: &InitOptions) -> Result<InitReport, CertsError> {
    let names: Vec<&str> = std::iter::once(CA_NAME).chain(ROLES).collect();
    if !options.force {
        for name in &names {
            for path in [cert_path(dir, name), key_path(dir, name)] {
                // symlink_metadata: a dangling link is still in the way.
                if fs::symlink_metadata(&path).is_ok() {
                    return Err(CertsError::AlreadyExists { path });
                }
            }
        }
    }

    // Everything is made in memory first, so that an error in signing
    // leaves the directory untouched.
    // The authority lives at least as long as the certificates it issues.
    let authority = Authority::with_validity(
        CA_COMMON_NAME,
        Validity::FromNow {
            days: options.validity_days.max(CA_VALIDITY_DAYS),
        },
    )?;
    // One window for all four, so that the report is exact for each.
    let (not_before, not_after) = Validity::FromNow {
        days: options.validity_days,
    }
    .resolve()?;
    let validity = Validity::Window {
        not_before: not_before.into(),
        not_after: not_after.into(),
    };
    let mut issued = Vec::with_capacity(ROLES.len());
    let mut identities = Vec::with_capacity(ROLES.len());
    for role in ROLES {
        issued.push(authority.issue(role, &options.extra_sans, validity)?);
        identities.push(IdentityReport {
            identity: role.to_owned(),
            sans: subject_alt_names(role, &options.extra_sans)?
                .iter()
                .map(ToString::to_string)
                .collect(),
            not_after: not_after.into(),
            not_after_utc: format_utc(not_after),
        });
    }

    fs::create_dir_all(dir).map_err(|source| CertsError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let ca = IssuedCert {
        cert_pem: authority.ca_cert_pem(),
        key_pem: authority.ca_key_pem(),
    };
    let mut files = Vec::with_capacity(names.len() * 2);
    files.extend(ca.write_unsynced_dir(dir, CA_NAME)?);
    for (role, cert) in ROLES.iter().zip(&issued) {
        files.extend(cert.write_unsynced_dir(dir, role)?);
    }
    sync_dir(dir)?;
    Ok(InitReport { files, identities })
}

/// One subject-alternative name, before it becomes an rcgen [`SanType`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum San {
    Dns(String),
    Ip(IpAddr),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => write!(f, "DNS:{name}"),
            San::Ip(address) => write!(f, "IP:{address}"),
        }
    }
}

impl From<San> for SanType {
    fn from(san: San) -> Self {
        match san {
            San::Dns(name) => SanType::DnsName(
                name.try_into()
                    .expect("DNS names are checked to be ASCII before they get here"),
            ),
            San::Ip(address) => SanType::IpAddress(address),
        }
    }
}

/// The names of a certificate for `identity`, in the order documented on
/// [`Authority::issue`].
fn subject_alt_names(identity: &str, extra_sans: &[String]) -> Result<Vec<San>, CertsError> {
    let mut sans = vec![
        San::Dns(checked_dns_name(identity)?),
        San::Dns("localhost".to_owned()),
        San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for extra in extra_sans {
        let san = match extra.parse::<IpAddr>() {
            Ok(address) => San::Ip(address),
            Err(_) => San::Dns(checked_dns_name(extra)?),
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// `name` if rustls would accept it as a server name: dot-separated labels
/// of 1 to 63 ASCII letters, digits and hyphens, no hyphen at either end of
/// a label, 253 characters at most. Checked here so that a bad name fails
/// when the certificate is made rather than at the first handshake.
fn checked_dns_name(name: &str) -> Result<String, CertsError> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(name.to_owned())
    } else {
        Err(CertsError::InvalidDnsName {
            name: name.to_owned(),
        })
    }
}

fn common_name_only(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn format_utc(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

#[derive(Clone, Copy)]
enum FileKind {
    Public,
    PrivateKey,
}

/// Writes `contents` to a temporary file next to `path` (created fresh, mode
/// 0600 for a private key so that it is never readable by others, not even
/// briefly), syncs it and renames it over `path`.
fn write_file_atomically(path: &Path, contents: &[u8], kind: FileKind) -> Result<(), CertsError> {
    let write_error = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .expect("certificate paths are built from a directory and a file name")
        .to_string_lossy();
    let temporary = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // A temporary left by a crashed run of this process id is stale; it is
    // removed so that the file below is created fresh with the right mode.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(write_error(error)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match kind {
            FileKind::PrivateKey => 0o600,
            FileKind::Public => 0o644,
        });
    }
    #[cfg(not(unix))]
    let _ = kind;
    let result = options.open(&temporary).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let result = result.and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = result {
        // Best effort: the error that matters is the one reported.
        let _ = fs::remove_file(&temporary);
        return Err(write_error(error));
    }
    Ok(())
}

/// Syncs the directory so that the renames into it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), CertsError> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(|source| CertsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use tonic::transport::{
        Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig,
    };
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    fn all_file_names() -> Vec<String> {
        std::iter::once(CA_NAME)
            .chain(ROLES)
            .flat_map(|name| [format!("{name}.pem"), format!("{name}.key")])
            .collect()
    }

    fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
        all_file_names()
            .into_iter()
            .map(|name| {
                let bytes = fs::read(dir.join(&name)).expect("reading a file init wrote");
                (name, bytes)
            })
            .collect()
    }

    fn der_of(cert_pem: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(cert_pem).expect("a PEM certificate")
    }

    #[test]
    fn init_writes_ten_files_refuses_a_second_time_and_replaces_them_when_forced() {
        let root = tempfile::tempdir().expect("a temporary directory");
        let dir = root.path().join("certs");
        let report = init(&dir, &InitOptions::default()).expect("the first init");

        let mut written: Vec<String> = report
            .files
            .iter()
            .map(|path| {
                assert_eq!(path.parent(), Some(dir.as_path()));
                path.file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        written.sort();
        let mut expected = all_file_names();
        expected.sort();
        assert_eq!(written, expected);
        let mut in_dir: Vec<String> = fs::read_dir(&dir)
            .expect("listing the directory")
            .map(|entry| {
                entry
                    .expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        in_dir.sort();
        assert_eq!(in_dir, expected, "no temporary file is left behind");
        let identities: Vec<&str> = report
            .identities
            .iter()
            .map(|entry| entry.identity.as_str())
            .collect();
        assert_eq!(identities, ROLES);

        #[cfg(unix)]
        for name in all_file_names() {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(&name))
                .expect("the file's metadata")
                .permissions()
                .mode()
                & 0o777;
            if name.ends_with(".key") {
                assert_eq!(mode, 0o600, "{name} is private");
            } else {
                assert_eq!(mode & 0o022, 0, "{name}: no write for others");
            }
        }

        let before = read_all(&dir);
        let refused = init(&dir, &InitOptions::default()).expect_err("a second init");
        assert!(
            matches!(&refused, CertsError::AlreadyExists { path } if path.starts_with(&dir)),
            "{refused}"
        );
        assert!(refused.to_string().contains("already exists"), "{refused}");
        assert_eq!(read_all(&dir), before, "a refused init changes nothing");

        let forced = InitOptions {
            force: true,
            ..InitOptions::default()
        };
        init(&dir, &forced).expect("a forced init");
        let after = read_all(&dir);
        for ((name, old), (_, new)) in before.iter().zip(&after) {
            assert_ne!(old, new, "{name} is replaced by a forced init");
        }
    }

    #[test]
    fn init_refuses_before_writing_anything_when_one_file_exists() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let in_the_way = dir.path().join("backup-server.key");
        fs::write(&in_the_way, "not a key").expect("writing a file in the way");

        let refused = init(dir.path(), &InitOptions::default()).expect_err("init");
        assert!(
            matches!(&refused, CertsError::AlreadyExists { path } if *path == in_the_way),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("backup-server.key"),
            "the error names the file: {refused}"
        );
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("listing the directory")
            .collect();
        assert_eq!(left.len(), 1, "only the file in the way is there");
    }

    #[test]
    fn the_first_dns_name_of_each_role_certificate_is_the_role() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = InitOptions {
            extra_sans: vec!["nas.example.lan".to_owned(), "192.0.2.7".to_owned()],
            ..InitOptions::default()
        };
        let report = init(dir.path(), &options).expect("init");
        let now = SystemTime::now();
        for (role, entry) in ROLES.iter().zip(&report.identities) {
            let der = der_of(&fs::read(cert_path(dir.path(), role)).expect("reading"));
            let cert = webpki::EndEntityCert::try_from(&der).expect("an X.509 certificate");
            let dns_names: Vec<&str> = cert.valid_dns_names().collect();
            assert_eq!(dns_names, [*role, "localhost", "nas.example.lan"]);
            for address in ["127.0.0.1", "::1", "192.0.2.7"] {
                let name = ServerName::try_from(address).expect("an IP address");
                cert.verify_is_valid_for_subject_name(&name)
                    .unwrap_or_else(|error| panic!("{role} is valid for {address}: {error}"));
            }
            let unlisted = ServerName::try_from("192.0.2.8").expect("an IP address");
            assert!(cert.verify_is_valid_for_subject_name(&unlisted).is_err());
            assert_eq!(
                entry.sans,
                [
                    format!("DNS:{role}"),
                    "DNS:localhost".to_owned(),
                    "IP:127.0.0.1".to_owned(),
                    "IP:::1".to_owned(),
                    "DNS:nas.example.lan".to_owned(),
                    "IP:192.0.2.7".to_owned(),
                ]
            );
            let days_left = entry
                .not_after
                .duration_since(now)
                .expect("not expired")
                .as_secs()
                / 86_400;
            assert!(
                (823..=825).contains(&days_left),
                "{role}: {days_left} days left"
            );
            assert!(entry.not_after_utc.ends_with(" UTC"));
        }
    }

    #[test]
    fn bad_names_and_windows_are_refused_when_issuing() {
        let authority = Authority::new("test CA").expect("an authority");
        for name in ["", "under_score", "-lead", "trail-", "a..b", "ümlaut"] {
            let refused = authority
                .issue(name, &[], Validity::default())
                .expect_err(name);
            assert!(
                matches!(refused, CertsError::InvalidDnsName { .. }),
                "{name:?}: {refused}"
            );
        }
        let refused = authority
            .issue("db-server", &["bad name".to_owned()], Validity::default())
            .expect_err("a bad extra name");
        assert!(refused.to_string().contains("\"bad name\""), "{refused}");
        let refused = authority
            .issue("db-server", &[], Validity::FromNow { days: 0 })
            .expect_err("zero days");
        assert!(matches!(refused, CertsError::ValidityTooShort));
        let refused = authority
            .issue("db-server", &[], Validity::FromNow { days: u32::MAX })
            .expect_err("beyond 9999");
        assert!(matches!(refused, CertsError::ValidityTooLong { .. }));
        let now = SystemTime::now();
        let refused = authority
            .issue(
                "db-server",
                &[],
                Validity::Window {
                    not_before: now,
                    not_after: now - Duration::from_secs(1),
                },
            )
            .expect_err("a backwards window");
        assert!(matches!(refused, CertsError::EmptyValidityWindow));
    }

    /// A tonic-health server on loopback with `identity`'s certificate,
    /// requiring a client certificate from `ca_pem`.
    struct HealthServer {
        address: std::net::SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl HealthServer {
        async fn start(ca_pem: &str, identity: &IssuedCert) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding loopback");
            let address = listener.local_addr().expect("the bound address");
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
                .client_ca_root(Certificate::from_pem(ca_pem));
            let (_reporter, health) = tonic_health::server::health_reporter();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let router = Server::builder()
                .tls_config(tls)
                .expect("a server TLS config")
                .add_service(health);
            let task = tokio::spawn(router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ));
            HealthServer {
                address,
                stop: Some(stop),
                task,
            }
        }

        /// One health check from a client trusting `ca_pem`, presenting
        /// `client` (or no certificate), expecting the server to be
        /// `server_name`. Answers the error as text, which names the TLS
        /// alert or the verifier's complaint.
        async fn check(
            &self,
            ca_pem: &str,
            client: Option<&IssuedCert>,
            server_name: &str,
        ) -> Result<(), String> {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name(server_name);
            if let Some(client) = client {
                tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
            }
            let attempt = async {
                let channel = Channel::from_shared(format!("https://{}", self.address))
                    .map_err(|error| format!("the URI: {error}"))?
                    .tls_config(tls)
                    .map_err(|error| format!("the client TLS config: {error:?}"))?
                    .connect()
                    .await
                    .map_err(|error| format!("connecting: {error:?}"))?;
                HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|status| format!("checking: {status}"))?;
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(20), attempt)
                .await
                .map_err(|_| "no answer in 20 s".to_owned())?
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.task
                .await
                .expect("the server task")
                .expect("the server ran");
        }
    }

    #[tokio::test]
    async fn certificates_from_init_work_for_mutual_tls_and_others_are_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        init(dir.path(), &InitOptions::default()).expect("init");
        let read = |name: &str| IssuedCert {
            cert_pem: fs::read_to_string(cert_path(dir.path(), name)).expect("a certificate"),
            key_pem: fs::read_to_string(key_path(dir.path(), name)).expect("a key"),
        };
        let ca_pem = read(CA_NAME).cert_pem;
        let array_node = read("array-node");
        let db_server = read("db-server");
        let server = HealthServer::start(&ca_pem, &array_node).await;

        for role in ROLES {
            server
                .check(&ca_pem, Some(&read(role)), "array-node")
                .await
                .unwrap_or_else(|error| panic!("{role} checks the array node: {error}"));
        }

        let other_ca = Authority::new("another CA").expect("another authority");
        let stranger = other_ca
            .issue("console", &[], Validity::default())
            .expect("a certificate from another CA");
        let refused = server
            .check(&ca_pem, Some(&stranger), "array-node")
            .await
            .expect_err("a client certificate from another CA");
        assert!(refused.contains("UnknownCA"), "{refused}");
        let refused = server
            .check(&ca_pem, None, "array-node")
            .await
            .expect_err("no client certificate");
        assert!(refused.contains("CertificateRequired"), "{refused}");
        let refused = server
            .check(&ca_pem, Some(&db_server), "db-server")
            .await
            .expect_err("the array node's certificate is not db-server's");
        assert!(refused.contains("NotValidForName"), "{refused}");
        let refused = server
            .check(&other_ca.ca_cert_pem(), Some(&db_server), "array-node")
            .await
            .expect_err("a client that trusts another CA");
        assert!(refused.contains("UnknownIssuer"), "{refused}");

        server
            .check(&ca_pem, Some(&db_server), "array-node")
            .await
            .expect("the server still serves after refusals");
        server.stop().await;
    }

    #[tokio::test]
    async fn an_expired_client_certificate_is_refused() {
        let authority = Authority::new("test CA").expect("an authority");
        let ca_pem = authority.ca_cert_pem();
        let issue = |identity: &str, validity| {
            authority
                .issue(identity, &[], validity)
                .expect("a certificate")
        };
        let server = HealthServer::start(&ca_pem, &issue("array-node", Validity::default())).await;
        let fresh = issue("console", Validity::default());
        let expired = issue("console", Validity::long_expired());

        server
            .check(&ca_pem, Some(&fresh), "array-node")
            .await
            .expect("a valid certificate of the same authority");
        let refused = server
            .check(&ca_pem, Some(&expired), "array-node")
            .await
            .expect_err("an expired client certificate");
        assert!(refused.contains("CertificateExpired"), "{refused}");

        // The refusal is for the dates alone: the same authority and
        // names pass the verifier rustls uses when the certificate is
        // fresh, and the expired one fails it as expired.
        let ca_der = der_of(ca_pem.as_bytes());
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).expect("a trust anchor");
        let verify_now = |issued: &IssuedCert| {
            let der = der_of(issued.cert_pem.as_bytes());
            let cert = webpki::EndEntityCert::try_from(&der).expect("an X.509 certificate");
            cert.verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
        };
        verify_now(&fresh).expect("the fresh certificate verifies");
        let error = verify_now(&expired).expect_err("the expired certificate");
        assert!(
            matches!(error, webpki::Error::CertExpired { .. }),
            "{error:?}"
        );
        server.stop().await;
    }
}
