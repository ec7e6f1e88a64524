//! The S3 client of the archive and the hub's S3 import: aws-sdk-s3 with a custom endpoint and
//! region, path-style or virtual-hosted addressing — MinIO, Wasabi, AWS, s3s-fs, moto.
//!
//! - Every call is retried with exponential backoff and jitter (the SDK's standard retry
//!   mode: connection errors, timeouts, 5xx and throttling such as 503 SlowDown), up to
//!   [`MAX_ATTEMPTS`] attempts; connecting times out after 5 s, one attempt after 2 minutes.
//! - Uploads are signed over the body's SHA-256 (computed once) and carry it as
//!   `x-amz-checksum-sha256`, so a server that keeps checksums checks it too; multipart
//!   uploads declare SHA-256 and carry it per part. Archive segments are the exception
//!   ([`S3Client::put_segment`]): their SHA-256 is in the signed manifest, so on the wire
//!   they carry a CRC32C the server checks instead, and an unsigned payload.
//! - HTTPS is hyper + rustls (ring) with the system's root certificates.
//!
//! This module is the crate's only HTTP code; callers see [`S3Client`] and [`S3Error`].

use std::fmt;
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation, SharedCredentialsProvider,
    SharedHttpClient, StalledStreamProtectionConfig, retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::target::{CredentialSource, Target};

/// The SDK itself, for callers that need a call this module does not wrap (the benchmark's
/// raw baseline).
pub use aws_sdk_s3 as sdk;

/// Attempts per call (the first one and four retries).
pub const MAX_ATTEMPTS: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

/// What can go wrong talking to S3. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("s3 target {target} is unreachable: {message}")]
    Unreachable { target: String, message: String },
    #[error("s3 target {target} answered {status} for {op} {key}: {message}")]
    Status { target: String, op: &'static str, key: String, status: u16, message: String },
    #[error("s3 target {target}: {message}")]
    Invalid { target: String, message: String },
}

impl S3Error {
    /// Access denied or bad signature: the credentials are refused.
    pub fn is_auth(&self) -> bool {
        matches!(self, S3Error::Status { status: 401 | 403, .. })
    }
}

/// One uploaded part of a multipart upload, as [`S3Client::multipart_complete`] needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub number: u32,
    pub etag: String,
    /// Base64 SHA-256 of the part (`x-amz-checksum-sha256`).
    pub sha256: String,
}

/// A client for one target. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct S3Client {
    target: Target,
    client: aws_sdk_s3::Client,
}

impl fmt::Debug for S3Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Client").field("target", &self.target.name).finish()
    }
}

/// An HTTPS client with its own connection pool (one per [`S3Client`]: pooled connections
/// belong to the runtime that opened them, and a process may run more than one).
fn http_client() -> SharedHttpClient {
    use aws_smithy_http_client::{Builder, tls};
    Builder::new().tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring)).build_https()
}

/// The SDK's default credential chain (environment, profile files, web identity, ECS, EC2
/// instance metadata), built on first use: building it needs a runtime, [`S3Client::new`]
/// does not.
#[derive(Debug)]
struct DefaultChain {
    http: SharedHttpClient,
    region: Region,
    chain: tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>,
}

impl aws_credential_types::provider::ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let chain = self
                .chain
                .get_or_init(|| async {
                    let config = aws_config::provider_config::ProviderConfig::default()
                        .with_http_client(self.http.clone())
                        .with_region(Some(self.region.clone()));
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .configure(config)
                        .region(self.region.clone())
                        .build()
                        .await
                })
                .await;
            chain.provide_credentials().await
        })
    }
}

/// Signs the payload with a SHA-256 computed before (no second pass over the body).
#[derive(Debug)]
struct PrecomputedPayload(String);

impl PrecomputedPayload {
    fn new(sha256: &[u8; 32]) -> PrecomputedPayload {
        PrecomputedPayload(crate::hex(sha256))
    }
}

impl Intercept for PrecomputedPayload {
    fn name(&self) -> &'static str {
        "cim-archive precomputed payload hash"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(aws_runtime::auth::PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// Leaves the payload out of the signature (`x-amz-content-sha256: UNSIGNED-PAYLOAD`): the
/// body is checked by its transport checksum instead (see [`S3Client::put_segment`]).
#[derive(Debug)]
struct UnsignedPayload;

impl Intercept for UnsignedPayload {
    fn name(&self) -> &'static str {
        "cim-archive unsigned payload"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(aws_runtime::auth::PayloadSigningOverride::UnsignedPayload);
        Ok(())
    }
}

/// CRC32C (Castagnoli) of `bytes`, as S3's `x-amz-checksum-crc32c` carries it (after base64
/// of its 4 big-endian bytes): SSE 4.2 / ARMv8 instructions, many GB/s.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// The `x-amz-checksum-crc32c` header value of a CRC32C.
fn crc32c_header(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

fn b64(sha256: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha256)
}

impl S3Client {
    /// Builds the client; connects nothing (the first call does).
    pub fn new(mut target: Target) -> Result<S3Client, S3Error> {
        // The key prefix is a folder: empty or ending in `/`.
        target.prefix = match target.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let invalid = |m: String| S3Error::Invalid { target: target.name.clone(), message: m };
        target.check_addressing().map_err(invalid)?;
        let region = Region::new(target.region.clone());
        let http = http_client();
        let credentials = match target.credentials.source() {
            CredentialSource::Keys { access_key, secret_key, session_token } => {
                SharedCredentialsProvider::new(aws_credential_types::Credentials::new(
                    access_key,
                    secret_key,
                    session_token.clone(),
                    None,
                    "cim-archive-target",
                ))
            }
            CredentialSource::DefaultChain => SharedCredentialsProvider::new(DefaultChain {
                http: http.clone(),
                region: region.clone(),
                chain: tokio::sync::OnceCell::new(),
            }),
        };
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .endpoint_url(target.endpoint.clone())
            .region(region)
            .force_path_style(target.path_style)
            .credentials_provider(credentials)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            // Checksums are ours (SHA-256 set explicitly on uploads); the SDK's default CRC32
            // in aws-chunked trailers is not understood by every S3-compatible server.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled().grace_period(Duration::from_secs(30)).build(),
            )
            .build();
        Ok(S3Client { client: aws_sdk_s3::Client::from_conf(config), target })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The SDK client (addressing, credentials, retries and timeouts as configured here).
    pub fn sdk(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Creates the bucket if it does not exist yet.
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        let bucket = &self.target.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) => match self.error("head-bucket", "", e) {
                S3Error::Status { .. } => {}
                other => return Err(other),
            },
        }
        let mut create = self.client.create_bucket().bucket(bucket);
        if self.target.region != "us-east-1" {
            use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.target.region.as_str()))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            Err(e) => match self.error("create-bucket", "", e) {
                S3Error::Status { status: 409, .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Uploads `body`, signed over its SHA-256 (one pass), which it also carries as its
    /// checksum.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let sha: [u8; 32] = Sha256::digest(&body).into();
        self.client
            .put_object()
            .bucket(&self.target.bucket)
            .key(key)
            .content_length(body.len() as i64)
            .checksum_sha256(b64(&sha))
            .body(ByteStream::from(body))
            .customize()
            .interceptor(PrecomputedPayload::new(&sha))
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    /// Uploads an archive segment: an unsigned payload (`UNSIGNED-PAYLOAD`) with its CRC32C as
    /// `x-amz-checksum-crc32c`, which the server checks on receipt (s3s-fs, MinIO, AWS). A
    /// segment's authenticity is the SHA-256 of its bytes in its signed manifest, checked
    /// whenever it is read back; signing the payload (or sending its SHA-256) would only make
    /// the server hash every segment once or twice more for the same assurance, on the cores
    /// that also serve JetStream (docs/storage-manager.md, "The S3 client").
    pub async fn put_segment(&self, key: &str, body: Bytes, crc32c: u32) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.target.bucket)
            .key(key)
            .content_length(body.len() as i64)
            .checksum_crc32_c(crc32c_header(crc32c))
            .body(ByteStream::from(body))
            .customize()
            .interceptor(UnsignedPayload)
            .send()
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    /// The object, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, S3Error> {
        let out = match self.client.get_object().bucket(&self.target.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) => return self.none_if_missing("get", key, e),
        };
        let body = out.body.collect().await.map_err(|e| self.unreachable(&e))?;
        Ok(Some(body.into_bytes()))
    }

    /// Reads the object as it streams in (memory stays at one network chunk) and returns its
    /// size and SHA-256, or `None` when it does not exist.
    pub async fn get_sha256(&self, key: &str) -> Result<Option<(u64, [u8; 32])>, S3Error> {
        let mut out = match self.client.get_object().bucket(&self.target.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) => return self.none_if_missing("get", key, e),
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = out.body.next().await {
            let chunk = chunk.map_err(|e| self.unreachable(&e))?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(Some((size, hasher.finalize().into())))
    }

    /// Size of the object (its `Content-Length`), or `None` when it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, S3Error> {
        match self.client.head_object().bucket(&self.target.bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => self.none_if_missing("head", key, e),
        }
    }

    /// Removes the object (no error when it is not there).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        match self.client.delete_object().bucket(&self.target.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => self.none_if_missing("delete", key, e).map(|_: Option<()>| ()),
        }
    }

    /// Every key under `prefix` that sorts after `start_after`, in key order (all pages).
    pub async fn list(&self, prefix: &str, start_after: Option<&str>) -> Result<Vec<String>, S3Error> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self.client.list_objects_v2().bucket(&self.target.bucket).prefix(prefix);
            req = match &token {
                Some(t) => req.continuation_token(t),
                None => req.set_start_after(start_after.map(str::to_string)),
            };
            let out = req.send().await.map_err(|e| self.error("list", prefix, e))?;
            keys.extend(out.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            token = out.next_continuation_token().map(str::to_string);
            if !out.is_truncated().unwrap_or(false) || token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// Starts a multipart upload (parts carry SHA-256 checksums); returns its upload id.
    pub async fn multipart_start(&self, key: &str) -> Result<String, S3Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.target.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| self.error("multipart-start", key, e))?;
        out.upload_id().map(str::to_string).ok_or_else(|| S3Error::Invalid {
            target: self.target.name.clone(),
            message: format!("multipart-start {key}: no upload id in the answer"),
        })
    }

    /// Uploads part `number` (from 1).
    pub async fn multipart_part(&self, key: &str, upload_id: &str, number: u32, body: Bytes) -> Result<Part, S3Error> {
        let sha: [u8; 32] = Sha256::digest(&body).into();
        let out = self
            .client
            .upload_part()
            .bucket(&self.target.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(body.len() as i64)
            .checksum_sha256(b64(&sha))
            .body(ByteStream::from(body))
            .customize()
            .interceptor(PrecomputedPayload::new(&sha))
            .send()
            .await
            .map_err(|e| self.error("multipart-part", key, e))?;
        Ok(Part { number, etag: out.e_tag().unwrap_or_default().to_string(), sha256: b64(&sha) })
    }

    pub async fn multipart_complete(&self, key: &str, upload_id: &str, parts: &[Part]) -> Result<(), S3Error> {
        let parts = parts
            .iter()
            .map(|p| {
                CompletedPart::builder().part_number(p.number as i32).e_tag(&p.etag).checksum_sha256(&p.sha256).build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.target.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| self.error("multipart-complete", key, e))?;
        Ok(())
    }

    pub async fn multipart_abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.target.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => self.none_if_missing("multipart-abort", key, e).map(|_: Option<()>| ()),
        }
    }

    /// `Ok(None)` for a missing object (404 other than a missing bucket), else the error.
    fn none_if_missing<T, E>(
        &self,
        op: &'static str,
        key: &str,
        e: SdkError<E, aws_smithy_runtime_api::http::Response>,
    ) -> Result<Option<T>, S3Error>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if let SdkError::ServiceError(se) = &e
            && se.raw().status().as_u16() == 404
            && se.err().code() != Some("NoSuchBucket")
        {
            return Ok(None);
        }
        Err(self.error(op, key, e))
    }

    fn unreachable(&self, e: &dyn std::error::Error) -> S3Error {
        S3Error::Unreachable { target: self.target.name.clone(), message: self.describe(e) }
    }

    /// The error chain as one line, with DNS failures named as such.
    fn describe(&self, e: &dyn std::error::Error) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut cur: Option<&dyn std::error::Error> = Some(e);
        while let Some(err) = cur {
            let s = err.to_string();
            if !parts.iter().any(|p| p.contains(&s)) {
                parts.push(s);
            }
            cur = err.source();
        }
        let text = parts.join(": ");
        let lower = text.to_lowercase();
        if lower.contains("dns error")
            || lower.contains("failed to lookup address")
            || lower.contains("name or service not known")
        {
            format!("cannot resolve host {}: {text}", self.target.request_host())
        } else {
            text
        }
    }

    fn error<E>(&self, op: &'static str, key: &str, e: SdkError<E, aws_smithy_runtime_api::http::Response>) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let target = self.target.name.clone();
        match e {
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let err = se.err();
                let message = match (err.code(), err.message()) {
                    (Some(c), Some(m)) => format!("{c}: {m}"),
                    (Some(c), None) => c.to_string(),
                    (None, Some(m)) => m.to_string(),
                    (None, None) => "no error details".to_string(),
                };
                S3Error::Status { target, op, key: key.to_string(), status, message }
            }
            SdkError::TimeoutError(_) => {
                S3Error::Unreachable { target, message: format!("{op} {key}: timed out ({MAX_ATTEMPTS} attempts)") }
            }
            SdkError::DispatchFailure(d) => {
                let message = match d.as_connector_error() {
                    Some(c) => self.describe(c),
                    None => format!("{op} {key}: dispatch failure"),
                };
                S3Error::Unreachable { target, message }
            }
            e @ SdkError::ResponseError(_) => {
                S3Error::Unreachable { target, message: format!("{op} {key}: bad response: {}", self.describe(&e)) }
            }
            other => S3Error::Invalid { target, message: format!("{op} {key}: {}", self.describe(&other)) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Credentials;

    fn target(endpoint: &str, path_style: bool) -> Target {
        Target {
            name: "t".into(),
            endpoint: endpoint.into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            prefix: String::new(),
            path_style,
            credentials: Credentials::new("ak", "sk"),
            signing_key_file: None,
        }
    }

    #[test]
    fn crc32c_is_the_castagnoli_checksum_s3_expects() {
        // RFC 3720 (iSCSI), B.4: 32 bytes of zeros, and the check value of "123456789".
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // S3's documented header for an empty body.
        assert_eq!(crc32c_header(crc32c(b"")), "AAAAAA==");
    }

    #[test]
    fn virtual_hosted_addressing_of_an_ip_endpoint_is_refused() {
        let e = S3Client::new(target("http://127.0.0.1:9000", false)).unwrap_err();
        assert!(e.to_string().contains("path-style"), "{e}");
        assert!(S3Client::new(target("http://127.0.0.1:9000", true)).is_ok());
    }

    #[tokio::test]
    async fn a_failed_dns_lookup_says_so() {
        // `.invalid` never resolves (RFC 6761).
        let c = S3Client::new(target("http://nas.invalid:9000", true)).unwrap();
        let e = c.head("k").await.unwrap_err();
        assert!(matches!(e, S3Error::Unreachable { .. }), "{e:?}");
        assert!(e.to_string().contains("cannot resolve host nas.invalid"), "{e}");
        let c = S3Client::new(target("http://nas.invalid:9000", false)).unwrap();
        let e = c.head("k").await.unwrap_err();
        assert!(e.to_string().contains("cannot resolve host b.nas.invalid"), "{e}");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_not_an_answer() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = S3Client::new(target(&format!("http://127.0.0.1:{port}"), true)).unwrap();
        let e = c.get("k").await.unwrap_err();
        assert!(matches!(e, S3Error::Unreachable { .. }) && !e.is_auth(), "{e:?}");
    }
}
