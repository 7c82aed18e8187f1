//! Real image peers on loopback, for the images tests: the CNCF distribution registry
//! (Debian `docker-registry`, Harbor's core) over HTTPS with a CA made here and htpasswd
//! logins, skopeo to push, and containerd (Debian `containerd`, with its CRI plugin) on a
//! socket and root of the test's own. Each process is stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (bound, then released for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a server certificate for 127.0.0.1 it signed (openssl).
pub struct Tls {
    /// The CA certificate (what clients trust).
    pub ca: PathBuf,
    /// A directory holding only `ca.crt` (skopeo's `--dest-cert-dir`).
    pub ca_dir: PathBuf,
    /// The server certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    pub fn new(dir: &Path) -> Self {
        let p = |n: &str| dir.join(n);
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=hybridlet test registry CA",
            ])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")));
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")));
        std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("san.ext"))
            .arg("-out")
            .arg(p("server.pem")));
        let ca_dir = p("ca-dir");
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::copy(p("ca.pem"), ca_dir.join("ca.crt")).unwrap();
        Self {
            ca: p("ca.pem"),
            ca_dir,
            cert: p("server.pem"),
            key: p("server.key"),
        }
    }
}

/// A `docker-registry` serving HTTPS on 127.0.0.1 with htpasswd logins.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub host: String,
    log: PathBuf,
    config: PathBuf,
}

impl Registry {
    /// Start one under `dir` for `users` (name, password).
    pub fn start(dir: &Path, tls: &Tls, users: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let htpasswd = dir.join("htpasswd");
        let mut lines = String::new();
        for (user, password) in users {
            lines.push_str(run(Command::new("htpasswd").args(["-Bbn", user, password])).trim_end());
            lines.push('\n');
        }
        std::fs::write(&htpasswd, lines).unwrap();
        let host = format!("127.0.0.1:{}", free_port());
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: hybridlet-test\n    path: {}\n",
                dir.join("data").display(),
                tls.cert.display(),
                tls.key.display(),
                htpasswd.display()
            ),
        )
        .unwrap();
        let mut r = Self {
            child: None,
            host,
            log: dir.join("access.log"),
            config,
        };
        r.resume();
        r
    }

    /// Start it again (same storage, same port).
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian package docker-registry; .ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {}: {}",
                self.host,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop it (a registry outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its access and error log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Push an OCI layout's `latest` to `repo:tag` here as `user`.
    pub fn push(&self, layout: &Path, tls: &Tls, user: (&str, &str), repo_tag: &str) {
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-creds",
                &format!("{}:{}", user.0, user.1),
            ])
            .arg("--dest-cert-dir")
            .arg(&tls.ca_dir)
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host)));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The busybox OCI layout `tests/images/oci-image.sh` builds, under `dir`.
pub fn busybox_layout(dir: &Path) -> PathBuf {
    let out = dir.join("busybox-oci");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/images/oci-image.sh");
    run(Command::new("bash").arg(script).arg(&out));
    out
}

/// containerd on its own root, state and socket, reading `config` (a config file's TOML
/// whose paths this rewrites into `dir`, its registry `config_path` to `certs_d`).
pub struct Containerd {
    child: Child,
    /// The gRPC socket (CRI and containerd's own services).
    pub socket: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path, rendered: &str, certs_d: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut doc: toml::Table = rendered.parse().unwrap();
        let socket = dir.join("containerd.sock");
        doc.insert("root".into(), dir.join("root").display().to_string().into());
        doc.insert(
            "state".into(),
            dir.join("state").display().to_string().into(),
        );
        doc.remove("imports");
        doc.insert(
            "grpc".into(),
            toml::Value::Table(toml::Table::from_iter([(
                "address".to_string(),
                socket.display().to_string().into(),
            )])),
        );
        let plugins = doc["plugins"].as_table_mut().unwrap();
        let registry = match plugins.get_mut("io.containerd.grpc.v1.cri") {
            Some(cri) => cri.get_mut("registry").unwrap(),
            None => plugins["io.containerd.cri.v1.images"]
                .get_mut("registry")
                .unwrap(),
        };
        registry
            .as_table_mut()
            .unwrap()
            .insert("config_path".into(), certs_d.display().to_string().into());
        let config = dir.join("config.toml");
        std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("containerd (Debian package containerd; .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            socket,
            config,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
