//! Downloads: HTTP(S) through hyper with rustls (the system's trust roots), or file://;
//! verified, resumable, placed atomically.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;

use crate::ArtifactError;

/// Reports download progress (a bar on a terminal, log lines otherwise).
pub trait Progress: Send {
    /// A transfer of `name` starts (at `offset` when resuming); `total` when known.
    fn started(&mut self, name: &str, offset: u64, total: Option<u64>);
    /// `done` bytes of the file are now on disk.
    fn advanced(&mut self, done: u64);
    /// The transfer ended (successfully or not).
    fn finished(&mut self);
}

/// No output.
impl Progress for () {
    fn started(&mut self, _: &str, _: u64, _: Option<u64>) {}
    fn advanced(&mut self, _: u64) {}
    fn finished(&mut self) {}
}

/// What [`Fetcher::download`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downloaded {
    /// The destination already had exactly these bytes; nothing was fetched.
    AlreadyPresent,
    /// Fetched, verified and placed.
    Fetched {
        /// Bytes transferred in this run.
        bytes: u64,
        /// A partial file from an earlier run was resumed.
        resumed: bool,
    },
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Fetches manifests, checksums and artifacts.
#[derive(Clone)]
pub struct Fetcher {
    client: HttpsClient,
    /// Why the system's trust roots could not be loaded (https is then refused with this;
    /// http:// and file:// mirrors still work, e.g. on a minimal host without CA files).
    roots_error: Option<String>,
    /// Deadline for the response headers, and for each gap between body chunks.
    pub timeout: Duration,
    /// Attempts per file (a failed attempt resumes from what it wrote).
    pub attempts: u32,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// The lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

enum Scheme<'a> {
    Http,
    File(&'a str),
}

fn scheme(url: &str) -> Result<Scheme<'_>, ArtifactError> {
    if let Some(path) = url.strip_prefix("file://") {
        Ok(Scheme::File(path))
    } else if url.starts_with("https://") || url.starts_with("http://") {
        Ok(Scheme::Http)
    } else {
        Err(ArtifactError::Scheme { url: url.into() })
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary file a download of `dest` goes to.
fn part_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.hybridlet-part"))
}

impl Fetcher {
    /// A fetcher trusting the system's root certificates.
    pub fn new() -> Result<Self, ArtifactError> {
        let (builder, roots_error) = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
        {
            Ok(b) => (b, None),
            Err(e) => {
                let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| ArtifactError::Fetch {
                    url: "(TLS)".into(),
                    message: e.to_string(),
                })?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                (
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config),
                    Some(format!(
                        "the system has no usable root certificates ({e}); install ca-certificates, or use an http:// or file:// mirror"
                    )),
                )
            }
        };
        let https = builder.https_or_http().enable_http1().build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            roots_error,
            timeout: Duration::from_secs(60),
            attempts: 3,
        })
    }

    /// GET `url` (following up to 5 same-scheme redirects), with an optional byte offset.
    async fn get(
        &self,
        url: &str,
        offset: u64,
    ) -> Result<(u16, http::HeaderMap, hyper::body::Incoming, String), ArtifactError> {
        if url.starts_with("https://")
            && let Some(why) = &self.roots_error
        {
            return Err(ArtifactError::Fetch {
                url: url.into(),
                message: why.clone(),
            });
        }
        let mut current = url.to_string();
        for _ in 0..6 {
            let fetch_err = |message: String| ArtifactError::Fetch {
                url: current.clone(),
                message,
            };
            let uri: http::Uri = current.parse().map_err(|e| fetch_err(format!("{e}")))?;
            let mut req = http::Request::get(uri).header(
                "user-agent",
                concat!("hybridlet/", env!("CARGO_PKG_VERSION")),
            );
            if offset > 0 {
                req = req.header("range", format!("bytes={offset}-"));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| fetch_err(e.to_string()))?;
            let resp = tokio::time::timeout(self.timeout, self.client.request(req))
                .await
                .map_err(|_| fetch_err(format!("no response within {:?}", self.timeout)))?
                .map_err(|e| fetch_err(format!("{e:#}")))?;
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let next = resp
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| fetch_err(format!("HTTP {status} without a Location")))?;
                // A relative Location is resolved against the current origin.
                let next = if next.starts_with('/') {
                    let origin_end = current
                        .find("://")
                        .and_then(|i| current[i + 3..].find('/').map(|j| i + 3 + j))
                        .unwrap_or(current.len());
                    format!("{}{next}", &current[..origin_end])
                } else {
                    next
                };
                let same_scheme = next.split("://").next() == current.split("://").next();
                if !same_scheme {
                    return Err(fetch_err(format!(
                        "redirect to another scheme ({next}) refused"
                    )));
                }
                current = next;
                continue;
            }
            let headers = resp.headers().clone();
            return Ok((status, headers, resp.into_body(), current));
        }
        Err(ArtifactError::Fetch {
            url: url.into(),
            message: "too many redirects".into(),
        })
    }

    /// The whole body of `url`, at most `limit` bytes (manifests, checksum files).
    pub async fn get_bytes(&self, url: &str, limit: usize) -> Result<Vec<u8>, ArtifactError> {
        if let Scheme::File(path) = scheme(url)? {
            let path = Path::new(path);
            return tokio::fs::read(path).await.map_err(io("reading", path));
        }
        let (status, _, mut body, final_url) = self.get(url, 0).await?;
        if status != 200 {
            return Err(ArtifactError::Status {
                url: final_url,
                status,
            });
        }
        let mut out = Vec::new();
        while let Some(frame) = tokio::time::timeout(self.timeout, body.frame())
            .await
            .map_err(|_| ArtifactError::Fetch {
                url: url.into(),
                message: format!("stalled for {:?}", self.timeout),
            })?
        {
            let frame = frame.map_err(|e| ArtifactError::Fetch {
                url: url.into(),
                message: e.to_string(),
            })?;
            if let Ok(data) = frame.into_data() {
                out.extend_from_slice(&data);
                if out.len() > limit {
                    return Err(ArtifactError::Fetch {
                        url: url.into(),
                        message: format!("larger than {limit} bytes"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The SHA-256 published at `url` (`<hex>` or `<hex>  <file name>`).
    pub async fn checksum(&self, url: &str) -> Result<String, ArtifactError> {
        let text = self.get_bytes(url, 4096).await?;
        let text = String::from_utf8_lossy(&text);
        let hex = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(hex)
        } else {
            Err(ArtifactError::BadChecksumFile { url: url.into() })
        }
    }

    /// Put the file at `url` at `dest` with `mode`, provided its SHA-256 is `expected`.
    pub async fn download(
        &self,
        url: &str,
        expected: &str,
        dest: &Path,
        mode: u32,
        progress: &mut dyn Progress,
    ) -> Result<Downloaded, ArtifactError> {
        let expected = expected.to_ascii_lowercase();
        if dest.exists() && sha256_file(dest).ok().as_deref() == Some(expected.as_str()) {
            set_mode(dest, mode)?;
            return Ok(Downloaded::AlreadyPresent);
        }
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("creating", dir))?;
        }
        let part = part_path(dest);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut last_error = None;
        let mut fetched = 0;
        let mut resumed = false;
        for _attempt in 0..self.attempts.max(1) {
            let offset = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            let result = match scheme(url)? {
                Scheme::File(path) => copy_file(Path::new(path), &part).await,
                Scheme::Http => self.fetch_into(url, &part, offset, &name, progress).await,
            };
            match result {
                Ok(n) => {
                    fetched += n;
                    resumed |= offset > 0;
                }
                Err(e @ ArtifactError::Status { .. })
                    if !matches!(
                        e,
                        ArtifactError::Status {
                            status: 500..=599,
                            ..
                        }
                    ) =>
                {
                    return Err(e); // 404 and friends: retrying cannot help
                }
                Err(e) => {
                    last_error = Some(e);
                    continue; // keep the partial file; the next attempt resumes it
                }
            }
            let actual = sha256_file(&part).map_err(io("hashing", &part))?;
            if actual != expected {
                let _ = std::fs::remove_file(&part);
                last_error = Some(ArtifactError::Checksum {
                    url: url.into(),
                    expected: expected.clone(),
                    actual,
                });
                if offset > 0 {
                    continue; // a resumed file may have mixed two versions: start over
                }
                break;
            }
            set_mode(&part, mode)?;
            std::fs::File::open(&part)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync", &part))?;
            std::fs::rename(&part, dest).map_err(io("renaming into place", dest))?;
            if let Some(dir) = dest.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io("fsync", dir))?;
            }
            return Ok(Downloaded::Fetched {
                bytes: fetched,
                resumed,
            });
        }
        Err(last_error.unwrap_or_else(|| ArtifactError::Fetch {
            url: url.into(),
            message: "no attempt was made".into(),
        }))
    }

    /// One attempt: append the body to `part` from `offset`; the bytes written.
    async fn fetch_into(
        &self,
        url: &str,
        part: &Path,
        offset: u64,
        name: &str,
        progress: &mut dyn Progress,
    ) -> Result<u64, ArtifactError> {
        let (status, headers, mut body, final_url) = self.get(url, offset).await?;
        let (mut file, start) = match status {
            206 if offset > 0 => (
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(part)
                    .await
                    .map_err(io("opening", part))?,
                offset,
            ),
            // The server sent everything (no range support): start over.
            200 => (
                tokio::fs::File::create(part)
                    .await
                    .map_err(io("creating", part))?,
                0,
            ),
            // The partial file is already complete.
            416 if offset > 0 => return Ok(0),
            _ => {
                return Err(ArtifactError::Status {
                    url: final_url,
                    status,
                });
            }
        };
        let total = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|len| len + start);
        progress.started(name, start, total);
        let mut done = start;
        let streamed = async {
            loop {
                let next = tokio::time::timeout(self.timeout, body.frame())
                    .await
                    .map_err(|_| ArtifactError::Fetch {
                        url: url.into(),
                        message: format!("stalled for {:?}", self.timeout),
                    })?;
                let Some(frame) = next else { break };
                let frame = frame.map_err(|e| ArtifactError::Fetch {
                    url: url.into(),
                    message: format!("{e:#}"),
                })?;
                if let Ok(data) = frame.into_data() {
                    file.write_all(&data).await.map_err(io("writing", part))?;
                    done += data.len() as u64;
                    progress.advanced(done);
                }
            }
            Ok(())
        }
        .await;
        // Whatever happened, every byte written so far must be on disk before anyone
        // (the next attempt, resuming) looks at the file's length: tokio's File writes
        // in the background.
        let flushed = file.flush().await.map_err(io("writing", part));
        drop(file);
        progress.finished();
        streamed?;
        flushed?;
        if let Some(total) = total
            && done < total
        {
            return Err(ArtifactError::Fetch {
                url: url.into(),
                message: format!("connection closed after {done} of {total} bytes"),
            });
        }
        Ok(done - start)
    }
}

async fn copy_file(from: &Path, part: &Path) -> Result<u64, ArtifactError> {
    tokio::fs::copy(from, part)
        .await
        .map_err(io("copying", from))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ArtifactError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", path))
}
