//! Images with real peers (root tier: containerd needs root): containerd 1.6 from Debian
//! with its CRI plugin, two CNCF distribution registries over HTTPS with a CA made here and
//! htpasswd logins (one plays EKS's ECR registry, one a Harbor proxy cache), skopeo to
//! push a busybox image built by hand, moto's ECR `GetAuthorizationToken` for the token.
//!
//! * the sandbox image is refused anonymously and pulled through CRI with the ECR token,
//!   exactly as nodeadm does (`internal/containerd/sandbox.go`: `AuthConfig{Auth: token}`),
//!   and pinned; the rendered config is what containerd really reads (`config dump`);
//! * a pull goes through the Harbor mirror with `override_path` (its access log shows it)
//!   with the robot login sent to the mirror only, and falls back to the registry when the
//!   mirror is down;
//! * a pre-pulled image stays and runs (`ctr run`) with both registries stopped;
//! * `hybridlet credential-provider` answers the kubelet's request and its login pulls;
//!   a wrong password is refused by the registry and shown nowhere;
//! * `hybridlet images import` loads a docker archive and pins it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::registry::{Containerd, Registry, Tls, busybox_layout};
use hybridlet_config::{ImagesSpec, RegistryCredentials, RegistryMirror};
use hybridlet_cri::{ImageRuntime, RegistryAuth};
use hybridlet_images::sandbox::Retry;

const ROBOT: (&str, &str) = ("robot$ml+puller", "harbor-robot-secret");
const PUSHER: (&str, &str) = ("pusher", "push-secret");

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// containerd's config as init renders it for the installed containerd.
fn rendered_containerd_config(sandbox: &str) -> (String, (u32, u32)) {
    let line = String::from_utf8(
        Command::new("containerd")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let version = hybridlet_cri::major_minor(&line).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/config/good/ssm.yaml");
    let loaded = hybridlet_config::load(&hybridlet_config::ConfigSources {
        file: fixture,
        file_required: true,
        drop_in_dir: None,
    })
    .unwrap();
    let cluster = hybridlet_bootstrap::ClusterCoordinates {
        name: "c".into(),
        region: "us-west-2".into(),
        endpoint: "https://127.0.0.1:1".into(),
        certificate_authority:
            "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
                .into(),
        service_cidr: "10.100.0.0/16".into(),
    };
    let node = hybridlet_bootstrap::NodeIdentity {
        node_name: "mi-0123456789abcdef0".into(),
        credential_provider: "ssm".into(),
        aws_config_file: None,
        ssm_agent_unit: None,
        ecr_credential_provider: false,
    };
    let target = hybridlet_bootstrap::ContainerdTarget::for_major(sandbox, Some(version.0));
    let files = hybridlet_bootstrap::render(&loaded.config, &cluster, &node, &target).unwrap();
    let f = files
        .into_iter()
        .find(|f| f.path == "/etc/containerd/config.toml")
        .unwrap();
    (f.contents, version)
}

fn login_file(dir: &Path, name: &str, user: &str, password: &str) -> String {
    let p = dir.join(name);
    std::fs::write(
        &p,
        serde_json::json!({"name": user, "secret": password}).to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

/// `hosts.toml` for the "ECR" registry as init renders it (the Harbor mirror first),
/// plus the test CA for the registry itself (ECR's certificate chains to public roots).
fn write_hosts(certs_d: &Path, mirror: &RegistryMirror, upstream_ca: &Path) {
    let config = hybridlet_config::Config {
        agent: hybridlet_config::AgentSpec {
            registry_mirrors: vec![mirror.clone()],
            ..Default::default()
        },
        ..Default::default()
    };
    let files = hybridlet_bootstrap::registry_mirror_files(&config);
    let text = files[0].contents.replacen(
        "\n[host.",
        &format!("ca = \"{}\"\n\n[host.", upstream_ca.display()),
        1,
    );
    let dir = certs_d.join(&mirror.registry);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
}

/// One round of hybridlet's pull (mirror logins, then the registry with `login`): the
/// image ID and what served it.
async fn pull(
    runtime: &dyn ImageRuntime,
    image: &str,
    spec: &ImagesSpec,
    mirrors: &[RegistryMirror],
    login: &RegistryAuth,
) -> (String, String) {
    let once = Retry {
        rounds: 1,
        first_wait: Duration::ZERO,
    };
    hybridlet_images::sandbox::pull(
        runtime,
        image,
        spec,
        mirrors,
        Some(login.clone()),
        once,
        &mut |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn ctr(containerd: &Containerd, args: &[&str]) -> std::process::Output {
    Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
#[ignore = "root tier: containerd, docker-registry, skopeo and moto on loopback"]
fn sandbox_mirror_outage_and_prepull_with_real_containerd_and_registries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = Tls::new(d);
    let layout = busybox_layout(d);

    // The ECR login, from moto's GetAuthorizationToken through our signed client.
    let moto = common::moto::moto();
    let token = rt().block_on(async {
        let client = hybridlet_aws::EcrClient::new(
            "us-west-2",
            Some(&moto.url),
            false,
            hybridlet_aws::Credentials::new("AKIDEXAMPLE", "secret", None, None, "test"),
            Duration::from_secs(20),
        )
        .unwrap();
        client.authorization_token().await.unwrap()
    });
    assert_eq!(token.username, "AWS");

    // "ECR" accepts only the token (and the test's pusher); "Harbor" only its robot.
    let mut ecr = Registry::start(&d.join("ecr"), &tls, &[("AWS", &token.password), PUSHER]);
    let mut harbor = Registry::start(&d.join("harbor"), &tls, &[ROBOT, PUSHER]);
    for repo in ["eks/pause:3.5", "ml/app:1", "ml/other:1"] {
        ecr.push(&layout, &tls, PUSHER, repo);
    }
    harbor.push(&layout, &tls, PUSHER, "ecr-cache/ml/app:1");

    let sandbox = format!("{}/eks/pause:3.5", ecr.host);
    let (rendered, version) = rendered_containerd_config(&sandbox);
    let certs_d = d.join("certs.d");
    let mirror = RegistryMirror {
        registry: ecr.host.clone(),
        endpoints: vec![format!("https://{}/v2/ecr-cache", harbor.host)],
        ca_file: Some(tls.ca.display().to_string()),
        skip_verify: false,
        override_path: true,
    };
    write_hosts(&certs_d, &mirror, &tls.ca);
    let containerd = Containerd::start(&d.join("containerd"), &rendered, &certs_d);

    // What containerd really reads from the rendered file.
    let dump = Command::new("containerd")
        .arg("-c")
        .arg(&containerd.config)
        .args(["config", "dump"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains(&format!("sandbox_image = \"{sandbox}\"")),
        "{dump}"
    );
    assert!(
        dump.contains(&format!("config_path = \"{}\"", certs_d.display())),
        "{dump}"
    );
    // containerd before 1.7 drops enable_cdi: the reason init and check refuse DRA there.
    assert_eq!(
        dump.contains("enable_cdi = true"),
        version >= (1, 7),
        "containerd {version:?}: {dump}"
    );

    let runtime = Arc::new(hybridlet_cri::Containerd::new(
        &containerd.socket,
        Duration::from_secs(120),
    ));
    let spec = ImagesSpec {
        credentials: vec![RegistryCredentials {
            registry: harbor.host.clone(),
            file: login_file(d, "robot.json", ROBOT.0, ROBOT.1),
            cache_duration: hybridlet_config::GoDuration(Duration::from_secs(300)),
        }],
        ..ImagesSpec::default()
    };
    let mirrors = vec![mirror];
    let rt = rt();
    rt.block_on(async {
        let v = runtime.version().await.unwrap();
        assert_eq!(v.name, "containerd");
        // Anonymous, as containerd would pull a missing sandbox image itself: refused.
        let err = runtime.pull(&sandbox, None).await.unwrap_err();
        assert!(err.is_auth(), "{err}");
        // With the token, through CRI: the Harbor cache has no pause image, so the
        // registry serves it; the robot login went to Harbor only, the token to ECR only.
        let login = RegistryAuth {
            auth: token.auth.clone(),
            ..RegistryAuth::default()
        };
        let (id, via) = pull(&*runtime, &sandbox, &spec, &mirrors, &login).await;
        assert!(id.starts_with("sha256:"), "{id}");
        assert_eq!(via, format!("registry {}", ecr.host));
        let pinned = runtime.pin(&sandbox).await.unwrap();
        assert_eq!(
            pinned == hybridlet_cri::Pinned::Yes,
            version >= (1, 7),
            "{pinned:?}"
        );
        let labels = ctr(&containerd, &["images", "ls"]);
        let listed = String::from_utf8_lossy(&labels.stdout);
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(&sandbox) && l.contains("io.cri-containerd.pinned=pinned")),
            "{listed}"
        );

        // Through the mirror, override_path: Harbor's log shows the manifest request.
        let app = format!("{}/ml/app:1", ecr.host);
        let (_, via) = pull(&*runtime, &app, &spec, &mirrors, &login).await;
        assert_eq!(via, format!("mirror {}", harbor.host));
        // containerd asks the mirror for the manifest (HEAD by tag, ?ns= names the
        // registry it stands in for), as the robot.
        let log = harbor.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("HEAD /v2/ecr-cache/ml/app/manifests/1?ns=")
                    && l.contains("\" 200 ")
                    && l.contains("containerd/")),
            "{log}"
        );

        // The mirror is down: the registry serves, with its own login.
        harbor.stop();
        let other = format!("{}/ml/other:1", ecr.host);
        let (_, via) = pull(&*runtime, &other, &spec, &mirrors, &login).await;
        assert_eq!(via, format!("registry {}", ecr.host));

        // Pre-pulled images stay with every registry gone: a pass pulls nothing.
        ecr.stop();
        let keep = ImagesSpec {
            pre_pull: vec![hybridlet_config::PrePullImage {
                image: app.clone(),
                credentials_file: None,
            }],
            ..spec.clone()
        };
        let mut registry = hybridlet_metrics::prometheus_client::registry::Registry::default();
        let metrics = hybridlet_images::prepull::ImageMetrics::register(&mut registry);
        let puller =
            hybridlet_images::prepull::PrePuller::new(runtime.clone(), &keep, &mirrors, metrics);
        let out = puller.pass(&mut |_| {}).await;
        assert_ne!(
            out[0].state,
            hybridlet_images::prepull::State::Failed,
            "{out:?}"
        );
    });
    // And it runs.
    let app = format!("{}/ml/app:1", ecr.host);
    let run = ctr(
        &containerd,
        &[
            "run",
            "--rm",
            &app,
            "hybridlet-prepull-run",
            "/bin/busybox",
            "echo",
            "ran-offline",
        ],
    );
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("ran-offline"),
        "{run:?}\n{}",
        containerd.log_text()
    );
    ecr.resume();
}

#[test]
#[ignore = "root tier: containerd, docker-registry and skopeo on loopback"]
fn credential_provider_answers_the_kubelet_and_import_pins_an_archive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = Tls::new(d);
    let layout = busybox_layout(d);
    let harbor = Registry::start(&d.join("harbor"), &tls, &[ROBOT, PUSHER]);
    harbor.push(&layout, &tls, PUSHER, "ml/app:1");
    let certs_d = d.join("certs.d");
    std::fs::create_dir_all(certs_d.join(&harbor.host)).unwrap();
    std::fs::write(
        certs_d.join(&harbor.host).join("hosts.toml"),
        format!(
            "server = \"https://{h}\"\nca = \"{ca}\"\n\n[host.\"https://{h}\"]\ncapabilities = [\"pull\", \"resolve\"]\nca = \"{ca}\"\n",
            h = harbor.host,
            ca = tls.ca.display()
        ),
    )
    .unwrap();
    let (rendered, _) = rendered_containerd_config("registry.k8s.io/pause:3.10");
    let containerd = Containerd::start(&d.join("containerd"), &rendered, &certs_d);

    let config = |file: &str| {
        let path = d.join(format!("config-{}.yaml", file.len()));
        std::fs::write(&path, format!(
            "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  images:\n    containerdSocket: {}\n    credentials:\n      - registry: \"{}\"\n        file: {file}\n",
            containerd.socket.display(), harbor.host
        )).unwrap();
        path
    };
    // What the kubelet writes on the provider's stdin (pkg/credentialprovider/plugin).
    let request = format!(
        r#"{{"kind":"CredentialProviderRequest","apiVersion":"credentialprovider.kubelet.k8s.io/v1","image":"{}/ml/app:1"}}"#,
        harbor.host
    );
    let ask = |config: &Path| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
            .arg("--config")
            .arg(config)
            .arg("credential-provider")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let good = ask(&config(&login_file(d, "robot.json", ROBOT.0, ROBOT.1)));
    assert!(good.status.success(), "{good:?}");
    let answer: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(answer["kind"], "CredentialProviderResponse");
    assert_eq!(answer["cacheKeyType"], "Registry");
    let login = &answer["auth"][&harbor.host];
    // The login, as CRI takes it (for this registry only).
    let auth = |password: &str| RegistryAuth {
        username: login["username"].as_str().unwrap().to_string(),
        password: password.to_string(),
        server_address: format!("https://{}", harbor.host),
        ..RegistryAuth::default()
    };
    let runtime = hybridlet_cri::Containerd::new(&containerd.socket, Duration::from_secs(120));
    let image = format!("{}/ml/app:1", harbor.host);
    rt().block_on(async {
        let login = auth(login["password"].as_str().unwrap());
        if let Err(e) = runtime.pull(&image, Some(&login)).await {
            panic!("{e}\n{}", harbor.log_text());
        }
    });

    // A wrong password: the provider serves what the file says, the registry refuses it,
    // and the password is in no output.
    let wrong = ask(&config(&login_file(
        d,
        "wrong.json",
        ROBOT.0,
        "not-the-robot-secret",
    )));
    assert!(wrong.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&wrong.stdout).unwrap();
    let err = rt().block_on(async {
        runtime
            .pull(
                &format!("{}/ml/app:1", harbor.host),
                Some(&auth(
                    answer["auth"][&harbor.host]["password"].as_str().unwrap(),
                )),
            )
            .await
    });
    // containerd keeps what it has: pull under a new tag to reach the registry again.
    let _ = err;
    let err = rt().block_on(async {
        runtime
            .pull(
                &format!("{}/ml/app:2", harbor.host),
                Some(&auth("not-the-robot-secret")),
            )
            .await
            .unwrap_err()
    });
    assert!(err.is_auth(), "{err}");
    assert!(!String::from_utf8_lossy(&wrong.stderr).contains("not-the-robot-secret"));
    // A login file others can read is refused, naming the fix.
    let open = d.join("open.json");
    std::fs::write(&open, r#"{"username":"u","password":"p"}"#).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = ask(&config(&open.display().to_string()));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("chmod 600"),
        "{refused:?}"
    );

    // `hybridlet images import` of a docker archive (skopeo writes it): present and pinned.
    let archive = d.join("tool.tar");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!(
            "docker-archive:{}:site.example/tools/probe:1",
            archive.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let import = Command::new(env!("CARGO_BIN_EXE_hybridlet"))
        .arg("--config")
        .arg(config(&login_file(d, "robot2.json", ROBOT.0, ROBOT.1)))
        .args(["images", "import"])
        .arg(&archive)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&import.stdout);
    assert!(
        import.status.success() && said.contains("imported site.example/tools/probe:1"),
        "{import:?}"
    );
    let held = rt().block_on(async { runtime.status("site.example/tools/probe:1").await.unwrap() });
    assert!(held.is_some());
    let listed = ctr(&containerd, &["images", "ls"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l.starts_with("site.example/tools/probe:1")
                && l.contains("io.cri-containerd.pinned=pinned"))
    );
}
