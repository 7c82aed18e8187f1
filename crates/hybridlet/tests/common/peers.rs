//! The peers tier's clients: gRPC libraries we did not write (`tests/peers`, built by
//! `tests/peers/setup`, which `.ci/run` runs), driven from Rust. Requests are encoded here
//! with prost and sent as bytes; the answers come back as bytes to decode here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Where `tests/peers/setup` put the clients.
#[derive(Debug, Clone)]
pub struct Peers {
    dir: PathBuf,
    script: PathBuf,
}

impl Peers {
    /// The built clients: `$HYBRIDLET_PEERS_DIR`, else `target/peers`. Panics with the way
    /// to build them when they are missing: the tier never skips itself.
    pub fn find() -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::var_os("HYBRIDLET_PEERS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/peers"));
        for needed in ["kubelet-dial", "python", "stubs"] {
            assert!(
                dir.join(needed).exists(),
                "the peers tier needs {} (grpc-go and grpcio clients): run tests/peers/setup \
                 (apt-get install golang-go golang-google-grpc-dev python3-venv first), or bash .ci/run",
                dir.join(needed).display()
            );
        }
        Self {
            dir,
            script: repo.join("tests/peers/grpc_peer.py"),
        }
    }
}

/// A client library and the way it dials.
#[derive(Debug, Clone)]
pub enum Client {
    /// grpc-go dialing as one of the kubelet's clients (`tests/peers/kubelet-dial`):
    /// `dial` is `watcher`, `dra-old`, `dra-new` or `csi`; `authority` is `default`
    /// (grpc-go's own choice), `percent` (grpc-go 1.55+'s) or `=VALUE`.
    Go {
        /// The kubelet client mirrored.
        dial: &'static str,
        /// The :authority form.
        authority: String,
    },
    /// grpc C-core (grpcio) on `unix:PATH`: `default` or `=VALUE`.
    GrpcIo {
        /// The :authority form.
        authority: String,
    },
    /// The h2 library writing the request's headers exactly: `default` (the
    /// percent-encoded path), `absent` or `=VALUE`.
    RawH2 {
        /// The :authority form.
        authority: String,
    },
}

impl Client {
    /// grpc-go as the kubelet's plugin watcher dials, grpc-go's own authority.
    pub fn watcher() -> Self {
        Client::Go {
            dial: "watcher",
            authority: "default".into(),
        }
    }

    /// grpc-go with this dial and authority form.
    pub fn go(dial: &'static str, authority: &str) -> Self {
        Client::Go {
            dial,
            authority: authority.into(),
        }
    }

    /// grpc C-core with this authority form.
    pub fn grpcio(authority: &str) -> Self {
        Client::GrpcIo {
            authority: authority.into(),
        }
    }

    /// Hand-made HTTP/2 frames (the h2 library) with this authority form.
    pub fn raw_h2(authority: &str) -> Self {
        Client::RawH2 {
            authority: authority.into(),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Go { dial, authority } => write!(f, "grpc-go {dial} (authority {authority})"),
            Client::GrpcIo { authority } => write!(f, "grpcio (authority {authority})"),
            Client::RawH2 { authority } => write!(f, "h2 frames (authority {authority})"),
        }
    }
}

/// One call: a gRPC method path and the encoded request; `stream` > 0 reads that many
/// messages of a server stream.
#[derive(Debug, Clone)]
pub struct Call {
    method: String,
    request: Vec<u8>,
    stream: u32,
}

impl Call {
    /// A unary call.
    pub fn unary(method: &str, request: &impl prost::Message) -> Self {
        Self {
            method: method.into(),
            request: request.encode_to_vec(),
            stream: 0,
        }
    }

    /// A server-streaming call; the first `n` messages.
    pub fn stream(method: &str, request: &impl prost::Message, n: u32) -> Self {
        Self {
            stream: n,
            ..Self::unary(method, request)
        }
    }
}

/// What a call got.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The gRPC status code (0 OK).
    pub code: u32,
    /// The status message.
    pub message: String,
    /// The response messages, encoded.
    pub responses: Vec<Vec<u8>>,
}

impl Answer {
    /// The one response, decoded; panics (naming `what`) on an error status.
    pub fn decode<M: prost::Message + Default>(&self, what: &str) -> M {
        assert_eq!(self.code, 0, "{what}: {} {}", self.code, self.message);
        M::decode(self.responses[0].as_slice()).unwrap()
    }
}

/// Make `calls` on `socket` with `client`, in order, on one connection (one per call for
/// the h2 frames); an answer per call. A client that cannot dial fails the test.
pub fn run(peers: &Peers, client: &Client, socket: &Path, calls: &[Call]) -> Vec<Answer> {
    let socket = socket.to_str().unwrap();
    let mut cmd = match client {
        Client::Go { dial, authority } => {
            let mut c = Command::new(peers.dir.join("kubelet-dial"));
            c.args(["-socket", socket, "-dial", dial, "-authority", authority]);
            c
        }
        Client::GrpcIo { authority } | Client::RawH2 { authority } => {
            let mut c = Command::new(peers.dir.join("python"));
            c.arg(&peers.script)
                .args(["--stubs", peers.dir.join("stubs").to_str().unwrap()])
                .args(["--socket", socket, "--authority", authority]);
            if matches!(client, Client::RawH2 { .. }) {
                c.arg("--raw-h2");
            }
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{client}: {e}"));
    let mut input = String::new();
    for c in calls {
        input.push_str(
            &serde_json::json!({
                "method": c.method,
                "request": B64.encode(&c.request),
                "stream": c.stream,
                "timeout_ms": 10_000,
            })
            .to_string(),
        );
        input.push('\n');
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<Answer> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Answer {
                code: v["code"].as_u64().unwrap() as u32,
                message: v["message"].as_str().unwrap_or_default().to_string(),
                responses: v["responses"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| B64.decode(r.as_str().unwrap()).unwrap())
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    assert!(
        out.status.success() && answers.len() == calls.len(),
        "{client} on {socket}: {} answers to {} calls, {}\n{}",
        answers.len(),
        calls.len(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}
