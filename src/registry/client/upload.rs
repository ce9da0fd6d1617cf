//! Pushes: blobs (HEAD first, then a cross-repository mount, then an upload) and manifests.
//!
//! - A blob the repository already has is not sent again (`HEAD /v2/R/blobs/D`).
//! - A blob known to be in another repository of the same registry is mounted
//!   (`POST /v2/R/blobs/uploads/?mount=D&from=OTHER`); a registry that cannot mount answers
//!   `202` with an upload session, which is then used as if it had been asked for.
//! - Small blobs go in one request (`POST`, then `PUT ?digest=` with the bytes); larger ones in
//!   chunks (`PATCH` with `Content-Range`, then `PUT ?digest=`), so memory stays bounded
//!   whatever the blob's size. A failed upload starts over with a new session.

use std::io::Read as _;
use std::path::Path;

use indicatif::ProgressBar;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};

use super::Session;
use crate::registry::retry::Failure;
use crate::registry::RegistryError;

/// Blobs up to this size are uploaded in one request.
pub(crate) const MONOLITHIC_MAX: u64 = 16 << 20;
/// The chunk size of larger uploads (raised to the registry's `OCI-Chunk-Min-Length`).
pub(crate) const CHUNK_SIZE: u64 = 16 << 20;
/// Largest chunk size accepted from a registry's `OCI-Chunk-Min-Length`.
const MAX_CHUNK_SIZE: u64 = 256 << 20;

/// How a blob reached the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobPush {
    /// The repository had it.
    Existed,
    /// Mounted from another repository of the registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// An upload session: where to send the next request.
struct Upload {
    location: Url,
    chunk: u64,
}

impl Session {
    fn blob_path(&self, digest: &Digest) -> String {
        format!("/v2/{}/blobs/{digest}", self.repository)
    }

    /// Whether the repository has the blob (`HEAD`).
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let path = self.blob_path(digest);
        let mut retry = self.retrier(format!("checking for blob {digest}"), &path);
        loop {
            let attempt = async {
                let url = self.url(&path)?;
                let resp = self
                    .request(Method::HEAD, url, &path, &HeaderMap::new(), None)
                    .await?;
                match resp.status() {
                    s if s.is_success() => Ok(true),
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(self.status_failure(resp, &path).await),
                }
            };
            match attempt.await {
                Ok(v) => return Ok(v),
                Err(f) => retry.wait(f).await?,
            }
        }
    }

    /// Makes sure the repository has the blob at `file` (`digest`, `size` bytes): skipped if
    /// it is there, mounted from one of `mount_from` if the registry can, else uploaded.
    pub async fn push_blob(
        &self,
        digest: &Digest,
        size: u64,
        file: &Path,
        mount_from: &[String],
        bar: &ProgressBar,
    ) -> Result<BlobPush, RegistryError> {
        if self.has_blob(digest).await? {
            tracing::debug!(%digest, repository = %self.repository, "the blob is there");
            return Ok(BlobPush::Existed);
        }
        let uploads = format!("/v2/{}/blobs/uploads/", self.repository);
        let what = format!("blob {digest}");
        let mut retry = self.retrier(format!("uploading {what}"), &uploads);
        let mut mounts = mount_from
            .iter()
            .filter(|r| **r != self.repository)
            .collect::<Vec<_>>()
            .into_iter();
        loop {
            let from = mounts.next();
            let attempt = async {
                let upload = match self.start_upload(&uploads, digest, from).await? {
                    None => return Ok(BlobPush::Mounted),
                    Some(u) => u,
                };
                self.send_blob(upload, &uploads, digest, size, file, bar)
                    .await
                    .map(|()| BlobPush::Uploaded)
            };
            match attempt.await {
                Ok(outcome) => {
                    if outcome == BlobPush::Mounted {
                        tracing::debug!(%digest, from = ?from, "mounted");
                    }
                    return Ok(outcome);
                }
                Err(f) => {
                    bar.set_position(0);
                    retry.wait(f).await?
                }
            }
        }
    }

    /// `POST`s an upload (a mount when `from` is given): `None` when the blob was mounted.
    async fn start_upload(
        &self,
        uploads: &str,
        digest: &Digest,
        from: Option<&String>,
    ) -> Result<Option<Upload>, Failure> {
        let mut url = self.url(uploads)?;
        if let Some(from) = from {
            url.query_pairs_mut()
                .append_pair("mount", digest.as_ref())
                .append_pair("from", from);
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self
            .request(
                Method::POST,
                url,
                uploads,
                &headers,
                Some(bytes::Bytes::new()),
            )
            .await?;
        match resp.status() {
            StatusCode::CREATED if from.is_some() => Ok(None),
            StatusCode::ACCEPTED => {
                let chunk = resp
                    .headers()
                    .get("oci-chunk-min-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(CHUNK_SIZE, |min| min.clamp(CHUNK_SIZE, MAX_CHUNK_SIZE));
                Ok(Some(Upload {
                    location: self.location(&resp, uploads)?,
                    chunk,
                }))
            }
            _ => Err(self.status_failure(resp, uploads).await),
        }
    }

    /// The `Location` of an upload answer, resolved against the registry.
    fn location(&self, resp: &Response, path: &str) -> Result<Url, Failure> {
        let bad = |why: &str| {
            Failure::Fatal(RegistryError::Status {
                registry: self.registry.clone(),
                path: path.to_string(),
                status: resp.status(),
                detail: format!(": {why}"),
            })
        };
        let value = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| bad("the answer has no upload location"))?;
        let url = resp
            .url()
            .join(value)
            .map_err(|_| bad("the upload location is not a URL"))?;
        // The session's credentials go to the registry only: an upload elsewhere would need
        // its own, which the registry does not give.
        if url.origin().ascii_serialization() != self.origin {
            return Err(bad("the upload location is on another host"));
        }
        Ok(url)
    }

    /// Sends the blob's bytes into an upload session and closes it with its digest.
    async fn send_blob(
        &self,
        mut upload: Upload,
        path: &str,
        digest: &Digest,
        size: u64,
        file: &Path,
        bar: &ProgressBar,
    ) -> Result<(), Failure> {
        let io_err = |source: std::io::Error| {
            Failure::Fatal(RegistryError::Cache(Box::new(
                crate::cache::CacheError::Io {
                    path: file.to_path_buf(),
                    source,
                },
            )))
        };
        let mut f = std::fs::File::open(file).map_err(io_err)?;
        let read = |f: &mut std::fs::File, n: u64| -> Result<bytes::Bytes, Failure> {
            let mut buf = Vec::with_capacity(n as usize);
            f.by_ref().take(n).read_to_end(&mut buf).map_err(io_err)?;
            if buf.len() as u64 != n {
                return Err(io_err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than its recorded size",
                )));
            }
            Ok(buf.into())
        };
        let octets = HeaderValue::from_static("application/octet-stream");
        let mut last: Option<bytes::Bytes> = None;
        if size <= MONOLITHIC_MAX {
            last = Some(read(&mut f, size)?);
        } else {
            let mut offset = 0;
            while offset < size {
                let n = upload.chunk.min(size - offset);
                let chunk = read(&mut f, n)?;
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, octets.clone());
                headers.insert(
                    "content-range",
                    HeaderValue::from_str(&format!("{offset}-{}", offset + n - 1)).expect("ASCII"),
                );
                let resp = self
                    .request(
                        Method::PATCH,
                        upload.location.clone(),
                        path,
                        &headers,
                        Some(chunk),
                    )
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.status_failure(resp, path).await);
                }
                upload.location = self.location(&resp, path)?;
                offset += n;
                bar.set_position(offset);
            }
        }
        let mut url = upload.location.clone();
        url.query_pairs_mut().append_pair("digest", digest.as_ref());
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, octets);
        let body = last.unwrap_or_default();
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        let resp = self
            .request(Method::PUT, url, path, &headers, Some(body))
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.status_failure(resp, path).await);
        }
        bar.set_position(size);
        Ok(())
    }

    /// Puts a manifest under `reference` (a tag or its digest) and returns its digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let mut h = crate::cache::Hasher::sha256();
        h.update(bytes);
        let digest = h.finish();
        let path = format!("/v2/{}/manifests/{reference}", self.repository);
        let mut retry = self.retrier(format!("putting the manifest {reference}"), &path);
        let body = bytes::Bytes::copy_from_slice(bytes);
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|_| RegistryError::Status {
                registry: self.registry.clone(),
                path: path.clone(),
                status: StatusCode::BAD_REQUEST,
                detail: ": invalid media type".into(),
            })?,
        );
        loop {
            let attempt = async {
                let url = self.url(&path)?;
                let resp = self
                    .request(Method::PUT, url, &path, &headers, Some(body.clone()))
                    .await?;
                if !resp.status().is_success() {
                    return Err(self.status_failure(resp, &path).await);
                }
                Ok(resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string))
            };
            match attempt.await {
                Ok(announced) => {
                    if let Some(a) = announced.filter(|a| *a != digest.to_string()) {
                        return Err(RegistryError::DigestMismatch {
                            what: format!(
                                "the pushed manifest {reference} (by the registry's answer)"
                            ),
                            expected: digest.to_string(),
                            actual: a,
                        });
                    }
                    return Ok(digest);
                }
                Err(f) => retry.wait(f).await?,
            }
        }
    }
}
