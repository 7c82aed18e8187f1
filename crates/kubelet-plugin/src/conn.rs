//! The HTTP/2 connection of a plugin socket, made acceptable to every gRPC client the
//! kubelet uses, and observed for refusals below the gRPC layer.
//!
//! The kubelet's plugin watcher dials a registration socket by its bare path, and grpc-go
//! then sends that path as `:authority` (raw in old releases, percent-encoded since about
//! 1.55); grpc C-core sends the percent-encoded path for `unix:` targets. The HTTP/2 server
//! under tonic (h2, with the `http` crate's `Authority`) resets any request whose
//! authority is not a valid host, so none of these clients could register us.
//!
//! [`KubeletConnection`] sits between the socket and the HTTP/2 server and rewrites the
//! client's header blocks before the server parses them: it follows the client's HPACK
//! state, replaces an `:authority` the server would refuse (empty, a path, percent
//! signs, anything not a host) with `localhost` — which is what a Unix-socket client means
//! — and re-encodes each block as literals that leave the server's table untouched. Every
//! other byte passes through unchanged, DATA payloads without buffering. The server's
//! frames back to the client are read, not changed: a stream reset or connection close
//! with an error code is logged with the request it refused and counted.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hpack::{self, Decoder, Field, HpackError};

/// RFC 9113 §3.4.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer must accept frames of this size (the SETTINGS_MAX_FRAME_SIZE
/// minimum), so re-encoded blocks are cut to it whatever the server advertised.
const MAX_FRAME: usize = 16_384;
/// The largest header block (all its frames) and expanded header list accepted; gRPC
/// metadata is a few hundred bytes.
const MAX_BLOCK: usize = 256 * 1024;
const MAX_LIST: usize = 1024 * 1024;
/// The largest dynamic table a client may ask for. The server never advertises more than
/// the protocol default, so anything up to this is only a client being generous.
const MAX_TABLE: usize = 64 * 1024;
/// What a Unix-socket client means by its authority.
const LOCALHOST: &[u8] = b"localhost";
/// Requests remembered per connection, to name the one a reset refused.
const MAX_TRACKED: usize = 256;

/// A client's bytes that cannot be forwarded: the connection is closed with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The client did not open with the HTTP/2 connection preface (HTTP/1, TLS, noise).
    #[error("the client does not speak HTTP/2 with prior knowledge (no connection preface)")]
    NotHttp2,
    /// A header block that does not decode.
    #[error("undecodable header block on stream {stream}: {error}")]
    Hpack {
        /// The stream.
        stream: u32,
        /// Why.
        error: HpackError,
    },
    /// A header block beyond [`MAX_BLOCK`].
    #[error("header block on stream {0} is larger than {MAX_BLOCK} bytes")]
    BlockTooLarge(u32),
    /// Frames that break HTTP/2's framing rules for header blocks.
    #[error("{0}")]
    Framing(&'static str),
}

impl Malformed {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Malformed::NotHttp2 => "not_http2",
            Malformed::Hpack { .. } => "hpack",
            Malformed::BlockTooLarge(_) => "header_block_too_large",
            Malformed::Framing(_) => "framing",
        }
    }
}

/// A request's headers as the client sent them, once its block is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSeen {
    /// The HTTP/2 stream.
    pub stream: u32,
    /// `:path` (the gRPC method), lossy UTF-8.
    pub path: String,
    /// The original `:authority` when it was replaced.
    pub replaced_authority: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Preface,
    Frames,
    /// Forwarding this many more payload bytes of a frame that is not a header block.
    Passthrough(usize),
}

#[derive(Debug)]
struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The client-to-server direction: frames in, frames out, header blocks re-encoded.
#[derive(Debug)]
pub struct Inbound {
    buf: BytesMut,
    stage: Stage,
    decoder: Decoder,
    pending: Option<PendingBlock>,
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            stage: Stage::Preface,
            decoder: Decoder::new(MAX_TABLE, MAX_LIST),
            pending: None,
        }
    }
}

impl Inbound {
    /// Take `data` from the client; append what the server should read to `out` and each
    /// completed request to `seen`.
    pub fn feed(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        seen: &mut Vec<RequestSeen>,
    ) -> Result<(), Malformed> {
        self.buf.extend_from_slice(data);
        loop {
            match self.stage {
                Stage::Preface => {
                    let n = self.buf.len().min(PREFACE.len());
                    if self.buf[..n] != PREFACE[..n] {
                        return Err(Malformed::NotHttp2);
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&self.buf.split_to(n));
                    self.stage = Stage::Frames;
                }
                Stage::Passthrough(left) => {
                    if self.buf.is_empty() {
                        return Ok(());
                    }
                    let n = left.min(self.buf.len());
                    out.extend_from_slice(&self.buf.split_to(n));
                    self.stage = if n == left {
                        Stage::Frames
                    } else {
                        Stage::Passthrough(left - n)
                    };
                }
                Stage::Frames => {
                    if self.buf.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let h = &self.buf[..FRAME_HEADER];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    match kind {
                        HEADERS | CONTINUATION => {
                            if len > MAX_BLOCK {
                                return Err(Malformed::BlockTooLarge(stream));
                            }
                            if self.buf.len() < FRAME_HEADER + len {
                                return Ok(());
                            }
                            self.buf.advance(FRAME_HEADER);
                            let payload = self.buf.split_to(len);
                            self.header_frame(kind, flags, stream, &payload, out, seen)?;
                        }
                        PUSH_PROMISE => {
                            return Err(Malformed::Framing("a client may not send PUSH_PROMISE"));
                        }
                        _ => {
                            if self.pending.is_some() {
                                return Err(Malformed::Framing(
                                    "a header block was interrupted by another frame (CONTINUATION expected)",
                                ));
                            }
                            out.extend_from_slice(&self.buf.split_to(FRAME_HEADER));
                            self.stage = Stage::Passthrough(len);
                        }
                    }
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
        seen: &mut Vec<RequestSeen>,
    ) -> Result<(), Malformed> {
        let mut pending = if kind == HEADERS {
            if self.pending.is_some() {
                return Err(Malformed::Framing(
                    "a header block was interrupted by HEADERS (CONTINUATION expected)",
                ));
            }
            let mut fragment = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&pad, rest) = fragment
                    .split_first()
                    .ok_or(Malformed::Framing("HEADERS too short for its padding"))?;
                fragment = rest;
                padding = usize::from(pad);
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                if fragment.len() < 5 {
                    return Err(Malformed::Framing("HEADERS too short for its priority"));
                }
                let (p, rest) = fragment.split_at(5);
                priority = Some([p[0], p[1], p[2], p[3], p[4]]);
                fragment = rest;
            }
            if padding > fragment.len() {
                return Err(Malformed::Framing("HEADERS padding longer than the frame"));
            }
            PendingBlock {
                stream,
                flags,
                priority,
                block: fragment[..fragment.len() - padding].to_vec(),
            }
        } else {
            match self.pending.take() {
                Some(p) if p.stream == stream => {
                    let mut p = p;
                    if p.block.len() + payload.len() > MAX_BLOCK {
                        return Err(Malformed::BlockTooLarge(stream));
                    }
                    p.block.extend_from_slice(payload);
                    p
                }
                _ => {
                    return Err(Malformed::Framing(
                        "CONTINUATION without a header block open on its stream",
                    ));
                }
            }
        };
        if flags & END_HEADERS == 0 {
            self.pending = Some(pending);
            return Ok(());
        }
        let mut fields = self
            .decoder
            .decode(&pending.block)
            .map_err(|error| Malformed::Hpack { stream, error })?;
        seen.push(normalize(stream, &mut fields));
        pending.block = hpack::encode(&fields);
        write_block(&pending, out);
        Ok(())
    }
}

/// Replace an `:authority` the HTTP/2 layer would refuse; report the request.
fn normalize(stream: u32, fields: &mut [Field]) -> RequestSeen {
    let mut seen = RequestSeen {
        stream,
        path: String::new(),
        replaced_authority: None,
    };
    for f in fields.iter_mut() {
        match f.name.as_slice() {
            b":path" => seen.path = String::from_utf8_lossy(&f.value).into_owned(),
            b":authority" if http::uri::Authority::try_from(f.value.as_slice()).is_err() => {
                seen.replaced_authority = Some(std::mem::replace(&mut f.value, LOCALHOST.to_vec()));
            }
            _ => {}
        }
    }
    seen
}

/// HEADERS (+ CONTINUATION) frames for a re-encoded block: padding dropped, priority and
/// END_STREAM kept.
fn write_block(p: &PendingBlock, out: &mut Vec<u8>) {
    let prefix = if p.priority.is_some() { 5 } else { 0 };
    let first = p.block.len().min(MAX_FRAME - prefix);
    let (head, mut rest) = p.block.split_at(first);
    let mut flags = p.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(out, prefix + head.len(), HEADERS, flags, p.stream);
    if let Some(priority) = p.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let (chunk, tail) = rest.split_at(n);
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, n, CONTINUATION, flags, p.stream);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// What the server told the client that matters to an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The server reset a stream with an error code.
    Reset {
        /// The stream.
        stream: u32,
        /// RFC 9113 §7 error code.
        code: u32,
    },
    /// The server closed the connection with an error code.
    GoAway {
        /// The error code.
        code: u32,
        /// The debug data the server attached (lossy UTF-8).
        debug: String,
    },
    /// The server ended a stream (HEADERS or DATA with END_STREAM).
    StreamEnd(u32),
}

/// The server-to-client direction, read frame by frame across arbitrary write chunks.
#[derive(Debug, Default)]
pub struct Outbound {
    head: [u8; FRAME_HEADER],
    head_len: usize,
    remaining: usize,
    captured: Vec<u8>,
}

impl Outbound {
    /// Observe `data` written to the client.
    pub fn observe(&mut self, mut data: &[u8], events: &mut Vec<ServerEvent>) {
        while !data.is_empty() {
            if self.head_len < FRAME_HEADER {
                let n = (FRAME_HEADER - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
                self.head_len += n;
                data = &data[n..];
                if self.head_len == FRAME_HEADER {
                    let h = self.head;
                    self.remaining =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    self.captured.clear();
                    if matches!(h[3], DATA | HEADERS) && h[4] & END_STREAM != 0 {
                        events.push(ServerEvent::StreamEnd(self.stream()));
                    }
                    if self.remaining == 0 {
                        self.finish(events);
                    }
                }
                continue;
            }
            let n = self.remaining.min(data.len());
            if matches!(self.head[3], RST_STREAM | GOAWAY) {
                let room = (8 + 256usize).saturating_sub(self.captured.len());
                self.captured.extend_from_slice(&data[..n.min(room)]);
            }
            self.remaining -= n;
            data = &data[n..];
            if self.remaining == 0 {
                self.finish(events);
            }
        }
    }

    fn stream(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff
    }

    fn finish(&mut self, events: &mut Vec<ServerEvent>) {
        let c = &self.captured;
        match self.head[3] {
            RST_STREAM if c.len() >= 4 => events.push(ServerEvent::Reset {
                stream: self.stream(),
                code: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
            }),
            GOAWAY if c.len() >= 8 => events.push(ServerEvent::GoAway {
                code: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                debug: String::from_utf8_lossy(&c[8..]).into_owned(),
            }),
            _ => {}
        }
        self.head_len = 0;
    }
}

/// RFC 9113 §7 error code names.
pub fn error_code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

/// Where a connection's observations go: the log and the socket's refusal counter.
#[derive(Debug, Clone)]
pub struct SocketObserver {
    socket: Arc<str>,
    metrics: Option<crate::PluginMetrics>,
}

impl SocketObserver {
    /// Observations of connections to `socket`, counted in `metrics` when given.
    pub fn new(socket: &std::path::Path, metrics: Option<crate::PluginMetrics>) -> Self {
        Self {
            socket: socket.display().to_string().into(),
            metrics,
        }
    }

    fn refused(&self, reason: &str) {
        if let Some(m) = &self.metrics {
            m.refused(&self.socket, reason);
        }
    }
}

/// A plugin-socket connection as the HTTP/2 server sees it (see the module docs).
#[derive(Debug)]
pub struct KubeletConnection<S> {
    inner: S,
    inbound: Inbound,
    outbound: Outbound,
    /// Bytes ready for the server to read.
    ready: BytesMut,
    eof: bool,
    /// Set once the client sent what cannot be forwarded; every later read fails.
    failed: Option<Malformed>,
    reported: bool,
    /// `:path` by stream, for naming what a reset refused.
    requests: BTreeMap<u32, String>,
    observer: SocketObserver,
}

impl<S> KubeletConnection<S> {
    /// Wrap an accepted connection.
    pub fn new(inner: S, observer: SocketObserver) -> Self {
        Self {
            inner,
            inbound: Inbound::default(),
            outbound: Outbound::default(),
            ready: BytesMut::new(),
            eof: false,
            failed: None,
            reported: false,
            requests: BTreeMap::new(),
            observer,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn saw_requests(&mut self, seen: Vec<RequestSeen>) {
        for r in seen {
            if let Some(original) = &r.replaced_authority {
                tracing::debug!(
                    socket = %self.observer.socket,
                    method = %r.path,
                    authority = %String::from_utf8_lossy(original),
                    "client's :authority is not a host; serving it as localhost"
                );
            }
            if self.requests.len() >= MAX_TRACKED
                && let Some(oldest) = self.requests.keys().next().copied()
            {
                self.requests.remove(&oldest);
            }
            self.requests.insert(r.stream, r.path);
        }
    }

    fn server_events(&mut self, events: Vec<ServerEvent>) {
        for event in events {
            match event {
                ServerEvent::StreamEnd(stream) => {
                    self.requests.remove(&stream);
                }
                ServerEvent::Reset { stream, code } => {
                    let method = self.requests.remove(&stream).unwrap_or_default();
                    // NO_ERROR and CANCEL end streams normally (a response sent before the
                    // request body ended, a client that went away).
                    if code != 0x0 && code != 0x8 {
                        let name = error_code_name(code);
                        tracing::warn!(
                            socket = %self.observer.socket,
                            stream,
                            method = %method,
                            "a request was refused below the gRPC layer: HTTP/2 RST_STREAM {name} (the client's request did not meet HTTP/2's rules)"
                        );
                        self.observer.refused(name);
                    }
                }
                ServerEvent::GoAway {
                    code,
                    debug: detail,
                } => {
                    if code != 0x0 {
                        let name = error_code_name(code);
                        tracing::warn!(
                            socket = %self.observer.socket,
                            detail = %detail,
                            "a client connection was closed below the gRPC layer: HTTP/2 GOAWAY {name}"
                        );
                        self.observer.refused(name);
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: Malformed) -> io::Error {
        if !std::mem::replace(&mut self.reported, true) {
            tracing::warn!(socket = %self.observer.socket, reason = e.reason(), "closing a client connection below the gRPC layer: {e}");
            self.observer.refused(e.reason());
        }
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for KubeletConnection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failed.clone() {
                return Poll::Ready(Err(this.fail(e)));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut chunk = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = chunk.filled();
            if data.is_empty() {
                // The client closed; whatever is left unparsed goes to the server as
                // it is, which reports the truncation in its own terms.
                this.eof = true;
                let rest = this.inbound.buf.split();
                this.ready.extend_from_slice(&rest);
                continue;
            }
            let (mut out, mut seen) = (Vec::new(), Vec::new());
            let fed = this.inbound.feed(data, &mut out, &mut seen);
            this.ready.extend_from_slice(&out);
            this.saw_requests(seen);
            if let Err(e) = fed {
                // Let the server read what was complete, then the error.
                this.failed = Some(e);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for KubeletConnection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            let mut events = Vec::new();
            this.outbound.observe(&buf[..n], &mut events);
            this.server_events(events);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = written {
            let mut events = Vec::new();
            for b in bufs {
                if n == 0 {
                    break;
                }
                let take = n.min(b.len());
                this.outbound.observe(&b[..take], &mut events);
                n -= take;
            }
            this.server_events(events);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for KubeletConnection<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    fn field(name: &str, value: &[u8]) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            sensitive: false,
        }
    }

    /// Parse `bytes` (after the preface) into frames: (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    fn request(authority: &[u8]) -> Vec<Field> {
        vec![
            field(":method", b"POST"),
            field(":scheme", b"http"),
            field(":path", b"/pluginregistration.Registration/GetInfo"),
            field(":authority", authority),
            field("content-type", b"application/grpc"),
            field("te", b"trailers"),
        ]
    }

    /// Feed `input` one byte at a time (the worst split a socket can give).
    fn feed_bytewise(input: &[u8]) -> (Vec<u8>, Vec<RequestSeen>, Result<(), Malformed>) {
        let mut inbound = Inbound::default();
        let (mut out, mut seen) = (Vec::new(), Vec::new());
        for b in input {
            if let Err(e) = inbound.feed(std::slice::from_ref(b), &mut out, &mut seen) {
                return (out, seen, Err(e));
            }
        }
        (out, seen, Ok(()))
    }

    #[test]
    fn authorities_the_server_refuses_become_localhost_and_valid_ones_stay() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"localhost", b"localhost"),
            (b"plugin.invalid:80", b"plugin.invalid:80"),
            (b"", b"localhost"),
            (
                b"/var/lib/kubelet/plugins_registry/csi.hybridlet.io-reg.sock",
                b"localhost",
            ),
            (
                b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fcsi.hybridlet.io-reg.sock",
                b"localhost",
            ),
            (b"\xff not even utf-8", b"localhost"),
        ];
        for (sent, served) in cases {
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
            input.extend(frame(
                HEADERS,
                END_HEADERS,
                1,
                &hpack::encode(&request(sent)),
            ));
            input.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
            let (out, seen, result) = feed_bytewise(&input);
            result.unwrap();
            assert_eq!(&out[..24], PREFACE);
            let frames = frames(&out[24..]);
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[0], (0x4, 0, 0, vec![]));
            assert_eq!(frames[2], (DATA, END_STREAM, 1, vec![0, 0, 0, 0, 0]));
            let (kind, flags, stream, block) = &frames[1];
            assert_eq!((*kind, *flags, *stream), (HEADERS, END_HEADERS, 1));
            let decoded = Decoder::new(4096, 1 << 20).decode(block).unwrap();
            assert_eq!(decoded, request(served), "authority {sent:?}");
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].path, "/pluginregistration.Registration/GetInfo");
            assert_eq!(
                seen[0].replaced_authority.as_deref(),
                (sent != served).then_some(sent)
            );
        }
    }

    #[test]
    fn a_request_without_authority_is_left_without_one() {
        let mut fields = request(b"");
        fields.retain(|f| f.name != b":authority");
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &hpack::encode(&fields),
        ));
        let (out, seen, result) = feed_bytewise(&input);
        result.unwrap();
        let frames = frames(&out[24..]);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
        assert_eq!(
            Decoder::new(4096, 1 << 20).decode(&frames[0].3).unwrap(),
            fields
        );
        assert_eq!(seen[0].replaced_authority, None);
    }

    #[test]
    fn the_clients_dynamic_table_is_followed_across_requests_and_continuations() {
        // A client that indexes the path-authority on the first request and refers to it
        // (index 62) on the second, split over HEADERS + CONTINUATION with padding and
        // priority: the server must see localhost both times and a table-free encoding.
        let path = b"%2Frun%2Fplugin.sock";
        let mut first = vec![0x83, 0x86, 0x41, path.len() as u8];
        first.extend_from_slice(path);
        let mut second = vec![0x83, 0x86, 0xbe];
        second.extend_from_slice(&[0x04, 0x05, b'/', b'a', b'/', b'b', b'c']); // :path /a/bc
        let mut input = PREFACE.to_vec();
        let mut padded = vec![3u8];
        padded.extend(&first);
        padded.extend([0, 0, 0]);
        input.extend(frame(
            HEADERS,
            END_HEADERS | PADDED | END_STREAM,
            1,
            &padded,
        ));
        let mut with_priority = vec![0x80, 0, 0, 1, 15];
        with_priority.extend(&second[..2]);
        input.extend(frame(HEADERS, PRIORITY, 3, &with_priority));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &second[2..]));
        let (out, seen, result) = feed_bytewise(&input);
        result.unwrap();
        let frames = frames(&out[24..]);
        assert_eq!(frames.len(), 2);
        let mut d = Decoder::new(4096, 1 << 20);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
        let one = d.decode(&frames[0].3).unwrap();
        assert_eq!(one[2], field(":authority", b"localhost"));
        assert_eq!(frames[1].1, END_HEADERS | PRIORITY);
        assert_eq!(&frames[1].3[..5], &[0x80, 0, 0, 1, 15]);
        let two = d.decode(&frames[1].3[5..]).unwrap();
        assert_eq!(two[2], field(":authority", b"localhost"));
        assert_eq!(two[3], field(":path", b"/a/bc"));
        assert_eq!(d.table_size(), 0);
        assert_eq!(seen[1].replaced_authority.as_deref(), Some(&path[..]));
    }

    #[test]
    fn a_large_block_is_cut_into_frames_every_server_accepts() {
        let mut fields = request(b"localhost");
        fields.push(field("x-big", &vec![b'v'; 40_000]));
        let mut input = PREFACE.to_vec();
        let block = hpack::encode(&fields);
        input.extend(frame(HEADERS, END_STREAM, 5, &block[..10_000]));
        input.extend(frame(CONTINUATION, 0, 5, &block[10_000..20_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, &block[20_000..]));
        let mut inbound = Inbound::default();
        let (mut out, mut seen) = (Vec::new(), Vec::new());
        inbound.feed(&input, &mut out, &mut seen).unwrap();
        let frames = frames(&out[24..]);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, END_STREAM);
        assert_eq!((frames[1].0, frames[1].1), (CONTINUATION, 0));
        assert_eq!((frames[2].0, frames[2].1), (CONTINUATION, END_HEADERS));
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(Decoder::new(4096, 1 << 20).decode(&joined).unwrap(), fields);
    }

    #[test]
    fn what_cannot_be_forwarded_is_refused_with_a_reason() {
        let (_, _, r) = feed_bytewise(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r, Err(Malformed::NotHttp2));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xbe]));
        let (_, _, r) = feed_bytewise(&input);
        assert_eq!(
            r,
            Err(Malformed::Hpack {
                stream: 1,
                error: HpackError::BadIndex(62)
            })
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(DATA, 0, 1, &[]));
        assert_eq!(feed_bytewise(&input).2.unwrap_err().reason(), "framing");
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0x82]));
        assert_eq!(feed_bytewise(&input).2.unwrap_err().reason(), "framing");
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x10, 0, 0, HEADERS, 0, 0, 0, 0, 1]);
        assert_eq!(feed_bytewise(&input).2, Err(Malformed::BlockTooLarge(1)));
    }

    #[test]
    fn data_frames_pass_through_unbuffered() {
        let mut inbound = Inbound::default();
        let (mut out, mut seen) = (Vec::new(), Vec::new());
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x00, 0x40, 0x00, DATA, 0, 0, 0, 0, 1]);
        input.extend(vec![7u8; 1000]);
        inbound.feed(&input, &mut out, &mut seen).unwrap();
        // The frame's first 1000 bytes are forwarded before its other 15 KiB arrive.
        assert_eq!(out.len(), 24 + 9 + 1000);
        inbound
            .feed(&vec![7u8; 15_384], &mut out, &mut seen)
            .unwrap();
        assert_eq!(out.len(), 24 + 9 + 16_384);
        assert!(inbound.buf.is_empty());
    }

    #[test]
    fn the_servers_resets_and_closes_are_read_across_any_split() {
        let mut bytes = frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        bytes.extend(frame(DATA, END_STREAM, 1, &[1, 2, 3]));
        bytes.extend(frame(RST_STREAM, 0, 3, &1u32.to_be_bytes()));
        let mut goaway = 3u32.to_be_bytes().to_vec();
        goaway.extend(2u32.to_be_bytes());
        goaway.extend(b"debug text");
        bytes.extend(frame(GOAWAY, 0, 0, &goaway));
        let expected = vec![
            ServerEvent::StreamEnd(1),
            ServerEvent::Reset { stream: 3, code: 1 },
            ServerEvent::GoAway {
                code: 2,
                debug: "debug text".into(),
            },
        ];
        for chunk in [1, 2, 7, 9, 10, bytes.len()] {
            let mut o = Outbound::default();
            let mut events = Vec::new();
            for piece in bytes.chunks(chunk) {
                o.observe(piece, &mut events);
            }
            assert_eq!(events, expected, "chunks of {chunk}");
        }
        assert_eq!(error_code_name(1), "PROTOCOL_ERROR");
    }
}
