//! The registry calls one upstream answers: blobs, manifests and tag lists.
//!
//! Each call sends its request through [`Upstream::send`] and reads the reply with the pure
//! helpers of [`super::reply`]; a reply that is not the answer asked for becomes the error
//! [`reply::classify`] picks. A blob HEAD that carries no length is retried as a one-byte range
//! GET, whose `Content-Range` gives the size.

use bytes::Bytes;
use http::header::ACCEPT;
use http::{HeaderMap, StatusCode};
use reqwest::Method;
use tokio::sync::OwnedSemaphorePermit;

use super::client::Upstream;
use super::reply::{self, Object};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, media_types};

/// Tag lists of busy repositories can be large, but 16 MiB is far past any real one.
const MAX_TAG_LIST: u64 = 16 << 20;

/// A blob response, ready to stream.
pub struct BlobResponse {
    pub body: reqwest::Response,
    /// The blob's full size, if the upstream said.
    pub total: Option<u64>,
    /// Bytes at the start of `body` to drop: an upstream that ignored our `Range` sends the
    /// blob from byte 0.
    pub skip: u64,
    /// Holds this upstream's request slot until the body is done.
    pub permit: OwnedSemaphorePermit,
}

/// What an upstream answered to a ranged read of a blob.
pub enum RangeReply {
    /// A 206 with exactly the bytes asked for, read whole.
    Bytes(Bytes),
    /// A 200: the upstream ignores `Range` and sent the whole blob, which was not read.
    WholeBlob,
}

/// A manifest fetched with GET: exact bytes plus the headers that describe them.
pub struct UpstreamManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// The upstream's `Docker-Content-Digest`, if it sent a valid one.
    pub digest_header: Option<Digest>,
}

/// What a manifest HEAD told us.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub content_type: Option<String>,
    pub size: Option<u64>,
}

impl Upstream {
    /// Starts a blob download at byte `from`. With `from > 0` it asks for `Range: bytes=from-`
    /// and checks the 206's `Content-Range`; an upstream that ignores the range sends the
    /// whole blob, and `skip` says how much of it to drop.
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobResponse> {
        let what = format!("GET blob {digest} of {name}");
        let url = self.transport.url(&format!("v2/{name}/blobs/{digest}"))?;
        let (resp, permit) = self
            .send(
                name,
                &|| {
                    let r = self.transport.http().get(url.clone());
                    if from > 0 {
                        r.header("Range", format!("bytes={from}-"))
                    } else {
                        r
                    }
                },
                &what,
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {
                let total = resp.content_length();
                Ok(BlobResponse {
                    body: resp,
                    total,
                    skip: from,
                    permit,
                })
            }
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                let Some(total) = reply::resumed_at(resp.headers(), from) else {
                    return Err(Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!(
                            "{what}: asked upstream {} for bytes {from}- and got Content-Range {:?}",
                            self.name(),
                            reply::content_range_text(resp.headers())
                        ),
                    ));
                };
                Ok(BlobResponse {
                    body: resp,
                    total,
                    skip: 0,
                    permit,
                })
            }
            _ => Err(self.status_error(resp, Object::Blob, &what).await),
        }
    }

    /// Reads bytes `start..end` of a blob of `size` bytes with `Range: bytes={start}-{end-1}`.
    /// The 206's `Content-Range` must name exactly those bytes (and the same size, if it names
    /// one), and its body is read whole (at most `end - start` bytes, each wait for bytes
    /// bounded by `idle_timeout`). A 200 is [`RangeReply::WholeBlob`], its body left unread.
    pub async fn get_blob_range(
        &self,
        name: &RepoName,
        digest: &Digest,
        (start, end): (u64, u64),
        size: u64,
    ) -> Result<RangeReply> {
        let last = end
            .checked_sub(1)
            .filter(|&last| last >= start && end <= size);
        let Some(last) = last else {
            return Err(Error::internal(format!(
                "blob {digest}: range {start}..{end} is not inside its {size} bytes"
            )));
        };
        let what = format!("GET (range {start}-{last}) blob {digest} of {name}");
        let url = self.transport.url(&format!("v2/{name}/blobs/{digest}"))?;
        let (resp, _permit) = self
            .send(
                name,
                &|| {
                    self.transport
                        .http()
                        .get(url.clone())
                        .header("Range", format!("bytes={start}-{last}"))
                },
                &what,
            )
            .await?;
        match resp.status() {
            // Dropping the response closes its connection without reading the blob.
            StatusCode::OK => Ok(RangeReply::WholeBlob),
            StatusCode::PARTIAL_CONTENT => {
                let answered = reply::answered_range(resp.headers(), start, last);
                let fits = answered.is_some_and(|total| total.is_none_or(|t| t == size));
                if !fits {
                    return Err(Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!(
                            "{what}: upstream {} answered with Content-Range {:?}, not bytes {start}-{last}/{size}",
                            self.name(),
                            reply::content_range_text(resp.headers())
                        ),
                    ));
                }
                let want = end - start;
                let bytes = self.read_answer(resp, want, &what).await?;
                let got = bytes.as_ref().map_or(want + 1, |b| b.len() as u64);
                self.received_blob_bytes(got.min(want));
                match bytes {
                    Some(bytes) if got == want => Ok(RangeReply::Bytes(bytes)),
                    _ => Err(Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!(
                            "{what}: upstream {} sent a body of {} bytes for a range of {want}",
                            self.name(),
                            if got > want {
                                "more".to_string()
                            } else {
                                got.to_string()
                            }
                        ),
                    )),
                }
            }
            _ => Err(self.status_error(resp, Object::Blob, &what).await),
        }
    }

    /// The size of a blob, without downloading it: HEAD, and if the HEAD carries no length, a
    /// one-byte range GET whose `Content-Range` names the total.
    pub async fn blob_size(&self, name: &RepoName, digest: &Digest) -> Result<u64> {
        let what = format!("HEAD blob {digest} of {name}");
        let url = self.transport.url(&format!("v2/{name}/blobs/{digest}"))?;
        let (resp, permit) = self
            .send(name, &|| self.transport.http().head(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Blob, &what).await);
        }
        if let Some(len) = reply::content_length(resp.headers()) {
            return Ok(len);
        }
        // Give the slot back before asking again.
        drop(permit);
        let what = format!("GET (range 0-0) blob {digest} of {name}");
        let (resp, _permit) = self
            .send(
                name,
                &|| {
                    self.transport
                        .http()
                        .get(url.clone())
                        .header("Range", "bytes=0-0")
                },
                &what,
            )
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => reply::range_total(resp.headers()).ok_or_else(|| {
                Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!("{what}: 206 without a usable Content-Range"),
                )
            }),
            StatusCode::OK => reply::content_length(resp.headers()).ok_or_else(|| {
                Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!("{what}: upstream gives no blob size"),
                )
            }),
            _ => Err(self.status_error(resp, Object::Blob, &what).await),
        }
    }

    /// HEAD of a manifest: learns the digest of a tag without counting as a pull on Docker
    /// Hub.
    pub async fn head_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestHead> {
        let (resp, _permit, _) = self
            .manifest_request(Method::HEAD, name, reference, accept)
            .await?;
        let h = resp.headers();
        Ok(ManifestHead {
            digest: reply::digest_header(h),
            content_type: reply::content_type(h),
            size: reply::content_length(h),
        })
    }

    /// GET of a manifest, read whole but never more than `max_size` bytes.
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
        max_size: u64,
    ) -> Result<UpstreamManifest> {
        let (resp, _permit, what) = self
            .manifest_request(Method::GET, name, reference, accept)
            .await?;
        let too_large = |n: u64| {
            Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "{what}: manifest is {n} bytes or more, over the limit of {max_size} bytes (cache.max_manifest_size)"
                ),
            )
        };
        if let Some(len) = resp.content_length()
            && len > max_size
        {
            return Err(too_large(len));
        }
        let content_type = reply::content_type(resp.headers());
        let digest_header = reply::digest_header(resp.headers());
        let bytes = self
            .read_answer(resp, max_size, &what)
            .await?
            .ok_or_else(|| too_large(max_size + 1))?;
        Ok(UpstreamManifest {
            bytes,
            content_type,
            digest_header,
        })
    }

    /// `tags/list`, passed through: body and headers (for `Link`).
    pub async fn get_tags(&self, name: &RepoName, query: &str) -> Result<(Bytes, HeaderMap)> {
        let what = format!("GET tags of {name}");
        let mut url = self.transport.url(&format!("v2/{name}/tags/list"))?;
        if !query.is_empty() {
            url.set_query(Some(query));
        }
        let (resp, _permit) = self
            .send(name, &|| self.transport.http().get(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Tags, &what).await);
        }
        let headers = resp.headers().clone();
        let body = self
            .read_answer(resp, MAX_TAG_LIST, &what)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!("{what}: tag list over 16 MiB"),
                )
            })?;
        Ok((body, headers))
    }

    /// Sends `method` (HEAD or GET) for manifest `name:reference`, accepting `accept`. Returns
    /// the 200 reply with its request slot (held until the body is read) and the request's
    /// description for later errors; any other status is the error [`reply::classify`] picks.
    async fn manifest_request(
        &self,
        method: Method,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<(reqwest::Response, OwnedSemaphorePermit, String)> {
        let what = format!("{method} manifest {name}:{reference}");
        let url = self
            .transport
            .url(&format!("v2/{name}/manifests/{reference}"))?;
        let (resp, permit) = self
            .send(
                name,
                &|| {
                    with_accept(
                        self.transport.http().request(method.clone(), url.clone()),
                        accept,
                    )
                },
                &what,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Manifest, &what).await);
        }
        Ok((resp, permit, what))
    }

    /// Turns a reply that is not the answer asked for into an error a client can act on
    /// ([`reply::classify`]). Only a 404's body is read, for its OCI error code.
    /// Reads the body of a 2xx answer whole (`None`: over `max`). A body that breaks off or
    /// stalls is a failure for the breaker, which the 2xx's headers did not count as a success.
    async fn read_answer(
        &self,
        resp: reqwest::Response,
        max: u64,
        what: &str,
    ) -> Result<Option<Bytes>> {
        let read = self.transport.read_body(resp, max, what).await;
        if let Err(e) = &read {
            super::select::after_body(self, e);
        }
        read
    }

    async fn status_error(&self, resp: reqwest::Response, object: Object, what: &str) -> Error {
        let status = resp.status();
        let retry_after = reply::retry_after(resp.headers());
        let code = if status == StatusCode::NOT_FOUND {
            // A body that cannot be read, or is too large, just has no code.
            let body = self
                .transport
                .read_body(resp, reply::MAX_ERROR_BODY, what)
                .await;
            body.ok()
                .flatten()
                .and_then(|body| reply::oci_error_code(&body))
        } else {
            None
        };
        Error::new(
            reply::classify(status, code.as_deref(), retry_after, object),
            format!("{what}: upstream {} answered {status}", self.name()),
        )
    }
}

fn with_accept(req: reqwest::RequestBuilder, accept: &[String]) -> reqwest::RequestBuilder {
    if accept.is_empty() {
        // Clients that send no Accept still expect modern manifests; this is the set Docker,
        // containerd and podman send.
        req.header(ACCEPT, media_types::DEFAULT_ACCEPT.join(", "))
    } else {
        req.header(ACCEPT, accept.join(", "))
    }
}
