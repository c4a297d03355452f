//! Where bytes come from: HTTP(S), a local directory, or a bundle file.
//!
//! The TUF workflow branches on "not found" (only that ends the root update loop), so
//! [`TransportError::NotFound`] is kept apart from every other failure.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Limits;

/// A fetch failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The resource does not exist (HTTP 404 or 410, no such file or entry).
    #[error("{url}: not found")]
    NotFound {
        /// What was asked for.
        url: String,
    },
    /// Anything else: connection, TLS, HTTP status, I/O.
    #[error("{url}: {reason}")]
    Failed {
        /// What was asked for.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// More bytes than the limit allows (endless-data attack).
    #[error("{url}: more than {limit} bytes")]
    TooLarge {
        /// What was asked for.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The server sends too slowly (slow-retrieval attack).
    #[error("{url}: slower than {min_bytes_per_sec} bytes/s")]
    SlowRetrieval {
        /// What was asked for.
        url: String,
        /// The slowest rate accepted.
        min_bytes_per_sec: u64,
    },
}

impl TransportError {
    /// Whether this is "not found".
    pub fn is_not_found(&self) -> bool {
        matches!(self, TransportError::NotFound { .. })
    }

    fn failed(url: &str, reason: impl ToString) -> Self {
        TransportError::Failed {
            url: url.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A response body.
pub struct Fetched {
    /// The bytes, from `offset` on.
    pub body: Box<dyn Read + Send>,
    /// Where the body starts in the resource: the requested offset if the source honoured
    /// it, else 0.
    pub offset: u64,
}

/// A source of metadata and targets, addressed by URL.
pub trait Transport: Send + Sync {
    /// Fetch `url` from byte `offset` on (a source may ignore the offset and start at 0).
    fn fetch(&self, url: &str, offset: u64) -> Result<Fetched, TransportError>;
}

/// HTTP(S) through reqwest with rustls (aws-lc-rs). No proxies from the environment; a few
/// redirects at most. reqwest is driven by a small runtime of its own so that every wait,
/// for the connection and for each chunk of the body, has a deadline (a stalled server
/// cannot hold the client forever).
pub struct HttpTransport {
    client: reqwest::Client,
    runtime: Arc<tokio::runtime::Runtime>,
    connect_timeout: Duration,
    stall_timeout: Duration,
    min_bytes_per_sec: u64,
}

impl HttpTransport {
    /// A client with the connect and stall timeouts of `limits`.
    pub fn new(limits: &Limits) -> Result<Self, TransportError> {
        Self::with_tls(limits, None, None)
    }

    /// As [`HttpTransport::new`], trusting only the CA certificates in `ca_pem` (a private
    /// server CA) when given, and presenting `identity_pem` (a client certificate followed by its
    /// private key, PEM) when the server asks for one (mutual TLS).
    pub fn with_tls(
        limits: &Limits,
        ca_pem: Option<&[u8]>,
        identity_pem: Option<&[u8]>,
    ) -> Result<Self, TransportError> {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            // Only the configured CA: the platform's roots do not vouch for this server.
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| TransportError::failed("server CA certificate", error_chain(&e)))?;
            builder = builder.tls_certs_only(certs);
        }
        if let Some(pem) = identity_pem {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| TransportError::failed("client certificate", error_chain(&e)))?;
            builder = builder.identity(identity);
        }
        let client = builder
            .connect_timeout(limits.connect_timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                // A few redirects, and never from https down to http.
                let downgrade =
                    attempt.previous().iter().any(|u| u.scheme() == "https") && attempt.url().scheme() != "https";
                if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else if downgrade {
                    attempt.error("redirect from https to http refused")
                } else {
                    attempt.follow()
                }
            }))
            .user_agent(concat!("tern/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TransportError::failed("http client", error_chain(&e)))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TransportError::failed("http client", e))?;
        Ok(HttpTransport {
            client,
            runtime: Arc::new(runtime),
            connect_timeout: limits.connect_timeout,
            stall_timeout: limits.stall_timeout,
            min_bytes_per_sec: limits.min_bytes_per_sec,
        })
    }
}

impl HttpTransport {
    /// POST `body` as JSON and read at most `limit` bytes of the answer, all under one
    /// deadline. Returns the status code and the body (the caller decides what a non-2xx
    /// status means: the server's error body names the refusal).
    pub fn post_json(&self, url: &str, body: Vec<u8>, limit: u64) -> Result<(u16, Vec<u8>), TransportError> {
        let req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.exchange(req, url, limit)
    }

    /// POST a JSON body with `Authorization: Bearer TOKEN`, as [`HttpTransport::post_json`].
    pub fn post_json_bearer(
        &self,
        url: &str,
        body: Vec<u8>,
        token: &str,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), TransportError> {
        let req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .bearer_auth(token)
            .body(body);
        self.exchange(req, url, limit)
    }

    /// GET, as [`HttpTransport::post_json`].
    pub fn get(&self, url: &str, limit: u64) -> Result<(u16, Vec<u8>), TransportError> {
        self.exchange(self.client.get(url), url, limit)
    }

    /// GET with `Authorization: Bearer TOKEN`, as [`HttpTransport::post_json`].
    pub fn get_bearer(&self, url: &str, token: &str, limit: u64) -> Result<(u16, Vec<u8>), TransportError> {
        let req = self.client.get(url).bearer_auth(token);
        self.exchange(req, url, limit)
    }

    fn exchange(&self, req: reqwest::RequestBuilder, url: &str, limit: u64) -> Result<(u16, Vec<u8>), TransportError> {
        let deadline = self.connect_timeout + self.stall_timeout;
        self.runtime
            .block_on(async {
                tokio::time::timeout(deadline, async {
                    let mut resp = req.send().await?;
                    let status = resp.status().as_u16();
                    let mut out = Vec::new();
                    while let Some(chunk) = resp.chunk().await? {
                        out.extend_from_slice(&chunk);
                        if out.len() as u64 > limit {
                            return Ok(Err(TransportError::TooLarge {
                                url: url.to_owned(),
                                limit,
                            }));
                        }
                    }
                    Ok::<_, reqwest::Error>(Ok((status, out)))
                })
                .await
            })
            .map_err(|_| TransportError::SlowRetrieval {
                url: url.to_owned(),
                min_bytes_per_sec: self.min_bytes_per_sec,
            })?
            .map_err(|e| TransportError::failed(url, error_chain(&e)))?
    }
}

impl Transport for HttpTransport {
    fn fetch(&self, url: &str, offset: u64) -> Result<Fetched, TransportError> {
        let mut req = self.client.get(url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let deadline = self.connect_timeout + self.stall_timeout;
        let resp = self
            .runtime
            .block_on(async { tokio::time::timeout(deadline, req.send()).await })
            .map_err(|_| TransportError::SlowRetrieval {
                url: url.to_owned(),
                min_bytes_per_sec: self.min_bytes_per_sec,
            })?
            .map_err(|e| TransportError::failed(url, error_chain(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && offset > 0 {
            // The resource changed or the partial file is stale: start from the beginning.
            return self.fetch(url, 0);
        }
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(TransportError::NotFound { url: url.to_owned() });
        }
        let start = if status == reqwest::StatusCode::PARTIAL_CONTENT {
            // Content-Range: bytes START-END/TOTAL; anything else is not the range we asked for.
            let range = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            match range {
                Some(s) if s == offset => s,
                _ => {
                    return Err(TransportError::failed(
                        url,
                        "206 response with an unexpected Content-Range",
                    ))
                }
            }
        } else if status.is_success() {
            0
        } else {
            return Err(TransportError::failed(url, format!("HTTP {status}")));
        };
        Ok(Fetched {
            body: Box::new(HttpBody {
                resp,
                runtime: self.runtime.clone(),
                stall: self.stall_timeout,
                pending: bytes::Bytes::new(),
                pos: 0,
            }),
            offset: start,
        })
    }
}

/// A response body read chunk by chunk, each chunk with a deadline.
struct HttpBody {
    resp: reqwest::Response,
    runtime: Arc<tokio::runtime::Runtime>,
    stall: Duration,
    pending: bytes::Bytes,
    pos: usize,
}

impl Read for HttpBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.pending.len() {
            let stall = self.stall;
            let resp = &mut self.resp;
            let chunk = self
                .runtime
                .block_on(async { tokio::time::timeout(stall, resp.chunk()).await })
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no data within the stall timeout"))?
                .map_err(|e| io::Error::other(error_chain(&e)))?;
            match chunk {
                None => return Ok(0),
                Some(bytes) => {
                    self.pending = bytes;
                    self.pos = 0;
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    tern_core::text::error_chain(e, 2048)
}

/// A local directory: `file:///abs/dir/` URLs or plain absolute paths.
#[derive(Debug, Default)]
pub struct FileTransport;

impl Transport for FileTransport {
    fn fetch(&self, url: &str, offset: u64) -> Result<Fetched, TransportError> {
        let path = url.strip_prefix("file://").unwrap_or(url);
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned();
        // A role named `../x` is encoded in the URL; decoded, it must not climb directories.
        if Path::new(&path)
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(TransportError::failed(url, "`..` in a file URL"));
        }
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(TransportError::NotFound { url: url.to_owned() })
            }
            Err(e) => return Err(TransportError::failed(url, e)),
        };
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| TransportError::failed(url, e))?;
        }
        Ok(Fetched {
            body: Box::new(f),
            offset,
        })
    }
}

/// A release bundle as an offline source: `tern-bundle:/path/x.tern#metadata/` and
/// `tern-bundle:/path/x.tern#targets/` as the two base URLs.
///
/// A bundle carries one version of each role under an unversioned name and payloads under
/// their plain paths, so versioned and hash-prefixed requests map onto those; the client
/// checks versions and hashes as it would for any source.
#[derive(Default)]
pub struct BundleTransport {
    opened: Mutex<Option<(PathBuf, tern_bundle::BundleIndex)>>,
}

/// The URL scheme of [`BundleTransport`].
pub const BUNDLE_SCHEME: &str = "tern-bundle:";

fn strip_hash_prefix(base: &str) -> &str {
    match base.split_once('.') {
        Some((h, rest)) if (h.len() == 64 || h.len() == 128) && h.bytes().all(|b| b.is_ascii_hexdigit()) => rest,
        _ => base,
    }
}

fn bundle_entry(inner: &str) -> Option<String> {
    if let Some(name) = inner.strip_prefix("metadata/") {
        let name = percent_encoding::percent_decode_str(name)
            .decode_utf8()
            .ok()?
            .into_owned();
        let stem = name.strip_suffix(".json")?;
        let (version, role) = match stem.split_once('.') {
            Some((v, r)) if v.parse::<u64>().is_ok() => (Some(v), r),
            _ => (None, stem),
        };
        return Some(match (role, version) {
            ("root", Some(v)) => format!("metadata/{v}.root.json"),
            (role, _) => format!("metadata/{role}.json"),
        });
    }
    let path = inner.strip_prefix("targets/")?;
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?
        .into_owned();
    let (dir, base) = match path.rsplit_once('/') {
        Some((d, b)) => (format!("{d}/"), b.to_owned()),
        None => (String::new(), path.clone()),
    };
    Some(format!("payloads/{dir}{}", strip_hash_prefix(&base)))
}

impl Transport for BundleTransport {
    fn fetch(&self, url: &str, offset: u64) -> Result<Fetched, TransportError> {
        let rest = url
            .strip_prefix(BUNDLE_SCHEME)
            .ok_or_else(|| TransportError::failed(url, "not a tern-bundle: URL"))?;
        let (file, inner) = rest
            .split_once('#')
            .ok_or_else(|| TransportError::failed(url, "expected tern-bundle:PATH#metadata/… or #targets/…"))?;
        let mut opened = self
            .opened
            .lock()
            .map_err(|_| TransportError::failed(url, "bundle index poisoned"))?;
        let path = Path::new(file);
        if opened.as_ref().map(|(p, _)| p.as_path()) != Some(path) {
            let index =
                tern_bundle::BundleIndex::open(path).map_err(|e| TransportError::failed(url, error_chain(&e)))?;
            *opened = Some((path.to_owned(), index));
        }
        let (_, index) = opened.as_ref().expect("opened above");
        let entry = bundle_entry(inner).ok_or_else(|| TransportError::NotFound { url: url.to_owned() })?;
        match index
            .read(&entry, offset)
            .map_err(|e| TransportError::failed(url, error_chain(&e)))?
        {
            Some((_, body)) => Ok(Fetched { body, offset }),
            None => Err(TransportError::NotFound { url: url.to_owned() }),
        }
    }
}

/// Dispatches on the URL: `http(s)://` to HTTP, `file://` or an absolute path to the
/// directory transport, `tern-bundle:` to the bundle transport.
pub struct AnyTransport {
    http: HttpTransport,
    file: FileTransport,
    bundle: BundleTransport,
}

impl AnyTransport {
    /// All three transports, HTTP with `limits`' timeouts.
    pub fn new(limits: &Limits) -> Result<Self, TransportError> {
        Ok(AnyTransport {
            http: HttpTransport::new(limits)?,
            file: FileTransport,
            bundle: BundleTransport::default(),
        })
    }
}

impl Transport for AnyTransport {
    fn fetch(&self, url: &str, offset: u64) -> Result<Fetched, TransportError> {
        if url.starts_with("http://") || url.starts_with("https://") {
            self.http.fetch(url, offset)
        } else if url.starts_with(BUNDLE_SCHEME) {
            self.bundle.fetch(url, offset)
        } else if url.starts_with("file://") || url.starts_with('/') {
            self.file.fetch(url, offset)
        } else {
            Err(TransportError::failed(
                url,
                "unsupported URL scheme (http, https, file, tern-bundle)",
            ))
        }
    }
}

/// Reads a body while enforcing the slow-retrieval rule.
pub(crate) struct Guarded<'a> {
    pub inner: Box<dyn Read + Send>,
    pub limits: &'a Limits,
    pub started: Instant,
    pub read: u64,
}

impl Read for Guarded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let elapsed = self.started.elapsed();
        if elapsed > self.limits.grace && n > 0 {
            let rate = self.read as f64 / elapsed.as_secs_f64();
            if rate < self.limits.min_bytes_per_sec as f64 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "slow retrieval"));
            }
        }
        Ok(n)
    }
}

/// Fetch a whole resource of at most `limit` bytes into memory.
pub(crate) fn fetch_bounded(
    transport: &dyn Transport,
    url: &str,
    limit: u64,
    limits: &Limits,
) -> Result<Vec<u8>, TransportError> {
    let fetched = transport.fetch(url, 0)?;
    let mut body = Guarded {
        inner: fetched.body,
        limits,
        started: Instant::now(),
        read: 0,
    };
    let mut buf = Vec::new();
    let read = (&mut body).take(limit.saturating_add(1)).read_to_end(&mut buf);
    match read {
        Ok(_) if buf.len() as u64 > limit => Err(TransportError::TooLarge {
            url: url.to_owned(),
            limit,
        }),
        Ok(_) => Ok(buf),
        Err(e) => Err(map_read_error(url, e, limits)),
    }
}

/// Fetch a whole resource of at most `limit` bytes into `out`, streaming, with the
/// slow-retrieval rule of `limits` (no byte for the stall timeout, or an average below the
/// minimum rate after the grace period, fails); returns the bytes written.
pub fn fetch_to(
    transport: &dyn Transport,
    url: &str,
    out: &mut dyn Write,
    limit: u64,
    limits: &Limits,
) -> Result<u64, TransportError> {
    let fetched = transport.fetch(url, 0)?;
    let mut body = Guarded {
        inner: fetched.body,
        limits,
        started: Instant::now(),
        read: 0,
    };
    match io::copy(&mut (&mut body).take(limit.saturating_add(1)), out) {
        Ok(n) if n > limit => Err(TransportError::TooLarge {
            url: url.to_owned(),
            limit,
        }),
        Ok(n) => Ok(n),
        Err(e) => Err(map_read_error(url, e, limits)),
    }
}

pub(crate) fn map_read_error(url: &str, e: io::Error, limits: &Limits) -> TransportError {
    if e.kind() == io::ErrorKind::TimedOut || e.to_string().contains("timed out") {
        TransportError::SlowRetrieval {
            url: url.to_owned(),
            min_bytes_per_sec: limits.min_bytes_per_sec,
        }
    } else {
        TransportError::failed(url, error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_names_map_to_entries() {
        assert_eq!(bundle_entry("metadata/3.root.json").unwrap(), "metadata/3.root.json");
        assert_eq!(
            bundle_entry("metadata/timestamp.json").unwrap(),
            "metadata/timestamp.json"
        );
        assert_eq!(
            bundle_entry("metadata/7.snapshot.json").unwrap(),
            "metadata/snapshot.json"
        );
        assert_eq!(
            bundle_entry("metadata/2.product-a.json").unwrap(),
            "metadata/product-a.json"
        );
        let h = "a".repeat(64);
        assert_eq!(
            bundle_entry(&format!("targets/x/{h}.app.bin")).unwrap(),
            "payloads/x/app.bin"
        );
        assert_eq!(
            bundle_entry(&format!("targets/{h}.app.bin")).unwrap(),
            "payloads/app.bin"
        );
    }
}
