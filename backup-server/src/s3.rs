//! The chunk store on an S3-compatible object store ([`S3Blobs`]): AWS S3,
//! Garage, MinIO, s3s-fs, anything that speaks the S3 REST API with SigV4.
//!
//! Built on `object_store`'s S3 client with ring as the only crypto (for
//! SigV4 and for TLS), so that no C crypto library is compiled. Its retries
//! are bounded tightly ([`RETRY_TIMEOUT`]): a backup job whose store is
//! unreachable must fail with `UNAVAILABLE` in seconds, not after minutes
//! of backoff.

use std::sync::{Arc, Once};
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::blobs::{BlobError, Blobs, ObjectMeta};
use crate::source::BoxFuture;

/// Where an S3 store is and how to reach it. The bucket and the prefix come
/// from the store's URL (`s3://BUCKET/PREFIX`, [`parse_s3_url`]).
///
/// Credentials are never flags (a secret on a command line is visible to
/// every user of the machine): they come from `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, or, for programs that
/// embed the server (the tests), from [`S3Args::credentials`].
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// The S3 endpoint of an `s3://` store, e.g. `http://127.0.0.1:3900` for
    /// Garage or MinIO; unset means AWS itself. Requests to a custom
    /// endpoint use path-style addressing (`ENDPOINT/BUCKET/KEY`), which
    /// MinIO, Garage and s3s need; plain `http://` endpoints are allowed.
    /// Credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and (for
    /// temporary credentials) AWS_SESSION_TOKEN; without them and without an
    /// endpoint, the EC2 instance's role.
    #[arg(long = "s3-endpoint", value_name = "URL", env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    /// The region of an `s3://` store's bucket (what the SigV4 signature
    /// names; Garage's default is `garage`). Unset: AWS_DEFAULT_REGION,
    /// then `us-east-1`.
    #[arg(long = "s3-region", value_name = "REGION", env = "AWS_REGION")]
    pub region: Option<String>,
    /// Address buckets as `BUCKET.ENDPOINT` (virtual-hosted style) even
    /// with `--s3-endpoint`; without an endpoint (AWS) it is always so.
    #[arg(long = "s3-virtual-hosted-style")]
    pub virtual_hosted_style: bool,
    /// Credentials given by an embedding program instead of the
    /// environment (never a flag).
    #[arg(skip)]
    pub credentials: Option<S3Credentials>,
}

/// An access key and its secret. `Debug` does not show the secret.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Credentials {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`;
    /// `None` when neither the key nor the secret is set.
    fn from_env() -> Result<Option<Self>, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Some(Self {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY".into()),
            (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set without AWS_ACCESS_KEY_ID".into()),
        }
    }
}

/// Objects larger than this go up as a multipart upload, in parts of
/// [`PART_SIZE_BYTES`]; smaller ones in one PUT. A single PUT of a large
/// object restarts from zero on any error and holds one connection for
/// the whole transfer.
pub const MULTIPART_THRESHOLD_BYTES: usize = 16 * 1024 * 1024;
/// The part size of a multipart upload (S3's minimum is 5 MiB).
const PART_SIZE_BYTES: usize = 8 * 1024 * 1024;
/// How many parts of one object are uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

/// How long object_store keeps retrying a failed request (connection
/// refused, timeout, a 5xx) before the error reaches the store. With
/// [`CONNECT_TIMEOUT`], an endpoint where nothing answers fails in about
/// 10 to 15 seconds.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RETRIES: usize = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// A TCP (and TLS) connection that is not up by then is a failed attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One request, body included: a part or a single PUT of at most 16 MiB
/// needs about 0.6 MB/s to finish in time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An S3 bucket, or a prefix ("folder") in one, as an object store: key
/// `K` is the object `PREFIX/K`.
#[derive(Debug, Clone)]
pub struct S3Blobs {
    store: Arc<AmazonS3>,
    bucket: String,
    /// Without slashes at either end; empty for the bucket's root.
    prefix: String,
}

/// `s3://BUCKET/PREFIX` as (bucket, prefix): the prefix may be empty and
/// loses its slashes at either end; the bucket may not be empty. `None`
/// when `text` is not such a URL.
pub fn parse_s3_url(text: &str) -> Option<(String, String)> {
    let rest = text.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Installs ring as the process's rustls crypto provider, once: reqwest is
/// built without one, and https endpoints need it. A provider installed
/// earlier by someone else is kept.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means a provider is already installed: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Connects to `bucket` (nothing is sent yet: the first operation shows
/// whether the store answers and accepts the credentials). `prefix` may
/// be empty; keys are stored as `prefix/key`.
pub fn connect(bucket: &str, prefix: &str, args: &S3Args) -> Result<S3Blobs, BlobError> {
    S3Blobs::connect(bucket, prefix, args)
}

impl S3Blobs {
    /// Connects to `bucket`: see [`connect`].
    pub fn connect(bucket: &str, prefix: &str, args: &S3Args) -> Result<Self, BlobError> {
        let prefix = prefix.trim_matches('/').to_string();
        let location = location_of(bucket, &prefix);
        let invalid = |message: String| BlobError::Failed {
            doing: format!("opening {location}"),
            message,
        };
        if bucket.is_empty() {
            return Err(invalid("the bucket name is empty".into()));
        }
        // The prefix must be a valid object_store path (no empty or `..`
        // segments), or every key would be refused later.
        Path::parse(&prefix)
            .map_err(|e| invalid(format!("the prefix {prefix:?} is invalid: {e}")))?;
        install_crypto_provider();

        let region = args
            .region
            .clone()
            .filter(|r| !r.is_empty())
            .or_else(|| {
                std::env::var("AWS_DEFAULT_REGION")
                    .ok()
                    .filter(|r| !r.is_empty())
            })
            .unwrap_or_else(|| "us-east-1".to_string());
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: FIRST_BACKOFF,
                max_backoff: MAX_BACKOFF,
                base: 2.0,
            },
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let endpoint = args.endpoint.clone().filter(|e| !e.is_empty());
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let client = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_allow_http(allow_http);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_retry(retry)
            .with_client_options(client)
            .with_virtual_hosted_style_request(endpoint.is_none() || args.virtual_hosted_style);

        let credentials = match &args.credentials {
            Some(credentials) => Some(credentials.clone()),
            None => S3Credentials::from_env().map_err(|e| BlobError::PermissionDenied {
                doing: format!("opening {location}"),
                message: e,
            })?,
        };
        match credentials {
            Some(credentials) => {
                builder = builder
                    .with_access_key_id(credentials.access_key_id)
                    .with_secret_access_key(credentials.secret_access_key);
                if let Some(token) = credentials.session_token {
                    builder = builder.with_token(token);
                }
            }
            // On AWS, object_store asks the instance metadata service for the
            // role's credentials. Other S3 servers have no such service: asking
            // would only time out, so say what is missing now.
            None if endpoint.is_some() => {
                return Err(BlobError::PermissionDenied {
                    doing: format!("opening {location}"),
                    message: "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                        .into(),
                });
            }
            None => {}
        }
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .build()
            .map_err(|e| map_error(format!("opening {location}"), "", e))?;
        Ok(S3Blobs {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

fn location_of(bucket: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

impl S3Blobs {
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The object's path in the bucket, or `Failed` when the key is not a
    /// valid object path (empty segments, `..`).
    fn path(&self, doing: &str, key: &str) -> Result<Path, BlobError> {
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(&full).map_err(|e| BlobError::Failed {
            doing: doing.to_string(),
            message: format!("invalid key: {e}"),
        })
    }

    /// The key of an object the bucket listed, relative to the prefix.
    fn relative_key(&self, path: &Path) -> String {
        let full: &str = path.as_ref();
        if self.prefix.is_empty() {
            return full.to_string();
        }
        full.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(full)
            .to_string()
    }

    async fn put_multipart(
        &self,
        doing: &str,
        key: &str,
        path: &Path,
        data: Vec<u8>,
    ) -> Result<(), BlobError> {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|e| map_error(doing.to_string(), key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE_BYTES);
        // A `Vec` becomes one shared buffer, sliced into parts without a
        // copy; at most PARTS_IN_FLIGHT parts are sent at once.
        for buffer in PutPayload::from(data) {
            let mut offset = 0;
            while offset < buffer.len() {
                if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    // Nothing partial may remain: the parts sent so far
                    // are dropped with the upload.
                    if let Err(abort) = writer.abort().await {
                        tracing::warn!("aborting the multipart upload of {key}: {abort}");
                    }
                    return Err(map_error(doing.to_string(), key, e));
                }
                let end = (offset + PART_SIZE_BYTES).min(buffer.len());
                writer.put(buffer.slice(offset..end));
                offset = end;
            }
        }
        // `finish` aborts the upload itself when a part or the completion
        // fails.
        writer
            .finish()
            .await
            .map_err(|e| map_error(doing.to_string(), key, e))?;
        Ok(())
    }
}

impl Blobs for S3Blobs {
    fn location(&self) -> String {
        location_of(&self.bucket, &self.prefix)
    }

    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), BlobError>> {
        Box::pin(async move {
            let doing = format!("writing {key} to {}", self.location());
            let path = self.path(&doing, key)?;
            if data.len() > MULTIPART_THRESHOLD_BYTES {
                return self.put_multipart(&doing, key, &path, data).await;
            }
            self.store
                .put(&path, PutPayload::from(data))
                .await
                .map_err(|e| map_error(doing, key, e))?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, BlobError>> {
        Box::pin(async move {
            let doing = format!("reading {key} from {}", self.location());
            let path = self.path(&doing, key)?;
            let result = self
                .store
                .get(&path)
                .await
                .map_err(|e| map_error(doing.clone(), key, e))?;
            let bytes = result.bytes().await.map_err(|e| map_error(doing, key, e))?;
            Ok(bytes.to_vec())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>, BlobError>> {
        Box::pin(async move {
            let doing = format!("listing {prefix} in {}", self.location());
            let path = self.path(&doing, prefix)?;
            // object_store lists below `path/`: a folder, never `path2/…`.
            let listed: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(|e| match map_error(doing.clone(), prefix, e) {
                    // Listing a prefix with no objects is an empty answer;
                    // a 404 here means the bucket itself is missing.
                    BlobError::NotFound(_) => BlobError::Failed {
                        doing: doing.clone(),
                        message: format!("the bucket {} does not exist", self.bucket),
                    },
                    other => other,
                })?;
            let mut found: Vec<ObjectMeta> = listed
                .into_iter()
                .map(|meta| ObjectMeta {
                    key: self.relative_key(&meta.location),
                    size_bytes: meta.size,
                    modified_unix_ms: u64::try_from(meta.last_modified.timestamp_millis())
                        .unwrap_or(0),
                })
                .collect();
            found.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(found)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BlobError>> {
        Box::pin(async move {
            let doing = format!("removing {key} from {}", self.location());
            let path = self.path(&doing, key)?;
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_error(doing, key, e)),
            }
        })
    }
}

/// What the store can do about an `object_store` error, decided on its
/// variant and on the HTTP failure inside it:
///
/// - `NotFound` (a 404) → [`BlobError::NotFound`];
/// - `PermissionDenied` (403: a wrong secret, an unknown key, a policy)
///   and `Unauthenticated` (401) → [`BlobError::PermissionDenied`];
/// - a transport failure (connection refused, a timeout, a reset) or a 5xx
///   that outlasted object_store's retries → [`BlobError::Unavailable`];
/// - anything else (a 400, a malformed answer, a bad configuration) →
///   [`BlobError::Failed`].
///
/// Some of object_store's paths (listing) do not sort an HTTP status into
/// these variants and answer `Generic`; then the status decides the same
/// way ([`generic_status`]).
fn map_error(doing: String, key: &str, error: object_store::Error) -> BlobError {
    let message = error.to_string();
    let status = generic_status(&error);
    match error {
        object_store::Error::NotFound { .. } => BlobError::NotFound(key.to_string()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            BlobError::PermissionDenied { doing, message }
        }
        _ if matches!(status, Some(401 | 403)) => BlobError::PermissionDenied { doing, message },
        _ if matches!(status, Some(404)) => BlobError::NotFound(key.to_string()),
        _ if matches!(status, Some(500..=599)) || is_transport_failure(&error) => {
            BlobError::Unavailable { doing, message }
        }
        _ => BlobError::Failed { doing, message },
    }
}

/// Whether a request never got an answer (connection refused, a timeout, a
/// reset), found by type: an [`HttpError`] in the source chain.
fn is_transport_failure(error: &object_store::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            return match http.kind() {
                HttpErrorKind::Connect
                | HttpErrorKind::Request
                | HttpErrorKind::Timeout
                | HttpErrorKind::Interrupted => true,
                // A malformed answer, or a kind added later: not known to
                // pass by waiting.
                _ => false,
            };
        }
        current = e.source();
    }
    false
}

/// The HTTP status of a `Generic` error that is a failed response. It is
/// not reachable by type — object_store keeps its `RetryError` private —
/// so this one place reads it from the text object_store writes for it
/// ("Server returned non-2xx status code: 403 Forbidden: …"). The tests
/// `a_5xx_after_retries_is_unavailable` here and the wrong-secret listing
/// against s3s-fs pin that text.
fn generic_status(error: &object_store::Error) -> Option<u16> {
    if !matches!(error, object_store::Error::Generic { .. }) {
        return None;
    }
    status_in_text(&error.to_string())
}

fn status_in_text(text: &str) -> Option<u16> {
    const MARKER: &str = "status code: ";
    let at = text.find(MARKER)? + MARKER.len();
    let status: u16 = text.get(at..at + 3)?.parse().ok()?;
    (100..=599).contains(&status).then_some(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_s3_url_is_a_bucket_and_an_optional_prefix() {
        let parsed = |text| parse_s3_url(text);
        assert_eq!(parsed("s3://backups"), Some(("backups".into(), "".into())));
        assert_eq!(parsed("s3://backups/"), Some(("backups".into(), "".into())));
        assert_eq!(
            parsed("s3://backups/site-a"),
            Some(("backups".into(), "site-a".into()))
        );
        assert_eq!(
            parsed("s3://backups/site-a/db/"),
            Some(("backups".into(), "site-a/db".into()))
        );
        assert_eq!(parsed("s3://"), None);
        assert_eq!(parsed("s3:///prefix"), None);
        assert_eq!(parsed("/var/backups"), None);
        assert_eq!(parsed("S3://backups"), None);
        assert_eq!(parsed("https://backups/x"), None);
    }

    #[test]
    fn the_location_names_the_bucket_and_prefix() {
        let args = S3Args {
            endpoint: Some("http://127.0.0.1:1".into()),
            credentials: Some(S3Credentials {
                access_key_id: "k".into(),
                secret_access_key: "s".into(),
                session_token: None,
            }),
            ..S3Args::default()
        };
        let blobs = connect("b", "/p/q/", &args).expect("connect");
        assert_eq!(blobs.location(), "s3://b/p/q");
        assert_eq!(blobs.relative_key(&Path::from("p/q/chunks/a")), "chunks/a");
        let root = connect("b", "", &args).expect("connect");
        assert_eq!(root.location(), "s3://b");
        assert!(connect("b", "a//b", &args).is_err(), "empty segment");
    }

    #[test]
    fn the_secret_is_not_in_debug_output() {
        let credentials = S3Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
        };
        let shown = format!("{credentials:?}");
        assert!(shown.contains("AKID"));
        assert!(!shown.contains("secret\""), "{shown}");
        assert!(!shown.contains("very-secret") && !shown.contains("token-secret"));
    }

    #[test]
    fn errors_map_by_variant() {
        let source = || -> Box<dyn std::error::Error + Send + Sync> { "x".into() };
        let e = object_store::Error::NotFound {
            path: "p/k".into(),
            source: source(),
        };
        assert!(matches!(map_error("d".into(), "k", e), BlobError::NotFound(k) if k == "k"));
        for e in [
            object_store::Error::PermissionDenied {
                path: "p".into(),
                source: source(),
            },
            object_store::Error::Unauthenticated {
                path: "p".into(),
                source: source(),
            },
        ] {
            assert!(matches!(
                map_error("d".into(), "k", e),
                BlobError::PermissionDenied { .. }
            ));
        }
        // What object_store's listing answers for a refused request: a
        // Generic error with the status in its text.
        let generic = |text: String| object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        };
        let status = |code: &str| {
            generic(format!(
                "Error performing GET http://h/b in 1ms - Server returned non-2xx status code: {code}: <Error/>"
            ))
        };
        let mapped = |e| map_error("d".into(), "k", e);
        assert!(matches!(
            mapped(generic("x".into())),
            BlobError::Failed { .. }
        ));
        assert!(matches!(
            mapped(status("403 Forbidden")),
            BlobError::PermissionDenied { .. }
        ));
        assert!(matches!(
            mapped(status("401 Unauthorized")),
            BlobError::PermissionDenied { .. }
        ));
        assert!(matches!(
            mapped(status("503 Service Unavailable")),
            BlobError::Unavailable { .. }
        ));
        assert!(matches!(
            mapped(status("404 Not Found")),
            BlobError::NotFound(_)
        ));
        assert!(matches!(
            mapped(status("400 Bad Request")),
            BlobError::Failed { .. }
        ));
        assert_eq!(status_in_text("status code: 5"), None);
    }

    /// A server that answers every request with 503: after object_store's
    /// retries, the store says Unavailable (this pins the one place where
    /// the status is read from object_store's text).
    #[tokio::test]
    async fn a_5xx_after_retries_is_unavailable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = vec![0; 64 * 1024];
                    let _ = socket.read(&mut request).await;
                    let _ = socket
                        .write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        let args = S3Args {
            endpoint: Some(format!("http://{addr}")),
            credentials: Some(S3Credentials {
                access_key_id: "k".into(),
                secret_access_key: "s".into(),
                session_token: None,
            }),
            ..S3Args::default()
        };
        let blobs = connect("bucket", "p", &args).expect("connect");
        let started = std::time::Instant::now();
        let got = blobs.get("chunks/a").await;
        server.abort();
        assert!(matches!(got, Err(BlobError::Unavailable { .. })), "{got:?}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}
