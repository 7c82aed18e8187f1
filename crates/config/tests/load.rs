//! Loading real files: the shared fixtures, drop-in merging, errors naming files and
//! field paths.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code: panics are failures

use std::fs;
use std::path::{Path, PathBuf};

use hybridlet_config::{ConfigError, ConfigSources, CredentialProvider, Mode, load, parse_str};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/config")
}

fn sources(file: &Path, dir: Option<&Path>) -> ConfigSources {
    ConfigSources {
        file: file.to_path_buf(),
        file_required: false,
        drop_in_dir: dir.map(Path::to_path_buf),
    }
}

#[test]
fn every_bad_fixture_fails_naming_its_field() {
    let mut seen = 0;
    for entry in fs::read_dir(fixtures().join("bad")).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks '# expect: PATH'", path.display()))
            .trim();
        let err = parse_str(&text, &path).expect_err(&format!("{} loaded", path.display()));
        let fields = err.field_errors();
        assert!(
            fields.iter().any(|f| f.path == expect),
            "{}: expected an error at {expect}, got: {err}",
            path.display()
        );
        // The rendered message names the path too (that is what the operator sees).
        assert!(err.to_string().contains(&format!("{expect}: ")), "{err}");
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} bad fixtures");
}

#[test]
fn good_fixtures_load() {
    let ssm = load(&sources(&fixtures().join("good/ssm.yaml"), None)).unwrap();
    assert_eq!(ssm.config.mode(), Mode::Joined);
    let node = ssm.config.node.as_ref().unwrap();
    assert_eq!(node.spec.cluster.name, "prod-hybrid");
    assert_eq!(
        node.spec.hybrid.as_ref().unwrap().credential_provider(),
        Some(CredentialProvider::Ssm)
    );

    let iam = load(&sources(
        &fixtures().join("good/iam-ra-with-agent.yaml"),
        None,
    ))
    .unwrap();
    let node = iam.config.node.as_ref().unwrap();
    let ra = node
        .spec
        .hybrid
        .as_ref()
        .unwrap()
        .iam_roles_anywhere
        .as_ref()
        .unwrap();
    assert_eq!(ra.node_name, "fra1-r12-n07");
    // nodeadm's defaults apply to fields left out.
    assert_eq!(ra.certificate_path, "/etc/iam/pki/server.pem");
    assert_eq!(ra.private_key_path, "/etc/iam/pki/server.key");
    assert_eq!(ra.aws_config_path, "/etc/aws/hybrid/config");
    assert_eq!(node.spec.kubelet.config["maxPods"], 110);
    let agent = &iam.config.agent;
    assert_eq!(agent.admin.listen_address.port(), 19464);
    assert!(!agent.dra.gpu.enabled && !agent.dra.sriov.enabled);
    assert_eq!(agent.dra.gpu.driver_name, "gpu.example.com");
    assert_eq!(agent.dra.sriov.driver_name, "sriov.hybridlet.io");
    assert_eq!(agent.shutdown_grace_period.get().as_secs(), 45);
    assert_eq!(agent.registry_mirrors[0].registry, "docker.io");

    let empty = load(&sources(&fixtures().join("good/empty.yaml"), None)).unwrap();
    assert_eq!(empty.config.mode(), Mode::Standalone);
    assert_eq!(empty.config, Default::default());
}

#[test]
fn missing_default_file_is_standalone_but_named_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("config.yaml");
    let loaded = load(&sources(&missing, Some(&dir.path().join("config.d")))).unwrap();
    assert_eq!(loaded.config.mode(), Mode::Standalone);
    assert!(loaded.files.is_empty());
    assert_eq!(
        loaded.config.agent.admin.listen_address.to_string(),
        "127.0.0.1:9464"
    );

    let err = load(&ConfigSources {
        file: missing.clone(),
        file_required: true,
        drop_in_dir: None,
    })
    .unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.to_string().contains("config.yaml"), "{err}");
}

#[test]
fn drop_ins_merge_in_lexical_order() {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("config.yaml");
    let d = dir.path().join("config.d");
    fs::create_dir(&d).unwrap();
    fs::copy(fixtures().join("good/ssm.yaml"), &main).unwrap();
    fs::write(
        d.join("20-region.yaml"),
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    region: eu-central-1\n  kubelet:\n    flags: [--b=2]\n",
    )
    .unwrap();
    fs::write(
        d.join("10-flags.yaml"),
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    region: ap-south-1\n  kubelet:\n    flags: [--a=1]\n",
    )
    .unwrap();
    fs::write(
        d.join("30-agent.yaml"),
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  csi:\n    nfs:\n      enabled: true\n",
    )
    .unwrap();
    // Ignored: not *.yaml, or hidden.
    fs::write(d.join("40-notes.txt"), "garbage: [").unwrap();
    fs::write(d.join(".50-swap.yaml"), "garbage: [").unwrap();

    let loaded = load(&sources(&main, Some(&d))).unwrap();
    let names: Vec<_> = loaded
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "config.yaml",
            "10-flags.yaml",
            "20-region.yaml",
            "30-agent.yaml"
        ]
    );
    let node = loaded.config.node.unwrap();
    assert_eq!(node.spec.cluster.region, "eu-central-1");
    assert_eq!(node.spec.cluster.name, "prod-hybrid");
    assert_eq!(node.spec.kubelet.flags, ["--a=1", "--b=2"]);
    assert!(loaded.config.agent.csi.nfs.enabled);
}

#[test]
fn errors_name_the_drop_in_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("config.d");
    fs::create_dir(&d).unwrap();
    let bad = d.join("50-typo.yaml");
    fs::write(
        &bad,
        "apiVersion: hybridlet.io/v1alpha1\nkind: AgentConfig\nspec:\n  stateDirectory: /x\n",
    )
    .unwrap();
    let err = load(&sources(&dir.path().join("config.yaml"), Some(&d))).unwrap_err();
    let fields = err.field_errors();
    assert_eq!(fields.len(), 1, "{err}");
    assert_eq!(fields[0].file.as_deref(), Some(bad.as_path()));
    assert_eq!(fields[0].path, "spec.stateDirectory");
    assert!(fields[0].message.contains("unknown field"), "{err}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster:\n    name: ''\n    region: nowhere\n    cidr: 10.0.0.1/16\n  hybrid:\n    ssm: {activationCode: short, activationId: NOPE}\n";
    let err = parse_str(text, Path::new("inline.yaml")).unwrap_err();
    let paths: Vec<_> = err.field_errors().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.cluster.name",
            "spec.cluster.region",
            "spec.cluster.cidr",
            "spec.hybrid.ssm.activationCode",
            "spec.hybrid.ssm.activationId",
        ]
    );
}

#[test]
fn secrets_never_appear_in_errors_or_debug() {
    let secret = "SuperSecretActivationCode-0123456789";
    let text = format!(
        "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster: {{name: c, region: us-west-2}}\n  hybrid:\n    ssm: {{activationCode: \"{secret}\", activationId: bad}}\n"
    );
    let err = parse_str(&text, Path::new("x.yaml")).unwrap_err();
    assert!(!err.to_string().contains(secret), "{err}");
    let ok = text.replace(
        "activationId: bad",
        "activationId: 8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d",
    );
    let loaded = parse_str(&ok, Path::new("x.yaml")).unwrap();
    assert!(!format!("{:?}", loaded.config).contains(secret));
}

#[test]
fn yaml_syntax_errors_name_the_file() {
    let err = parse_str("spec: [unclosed", Path::new("broken.yaml")).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert!(
        err.to_string().starts_with("broken.yaml: not valid YAML"),
        "{err}"
    );
}

#[test]
fn ec2_only_fields_load_with_a_warning() {
    let text = "apiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  cluster: {name: c, region: us-west-2}\n  instance:\n    localStorage: {strategy: RAID0}\n  hybrid:\n    ssm: {activationCode: AbCdEfGhIjKlMnOpQrStUv, activationId: 8b7a2d3c-1f2e-4a5b-9c8d-0e1f2a3b4c5d}\n";
    let loaded = parse_str(text, Path::new("x.yaml")).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].contains("spec.instance"));
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples")
}

#[test]
fn documented_defaults_are_the_real_defaults() {
    let loaded = load(&sources(&examples().join("agent-defaults.yaml"), None)).unwrap();
    assert_eq!(loaded.config, hybridlet_config::Config::default());
}

#[test]
fn shipped_examples_load() {
    let iam = load(&sources(&examples().join("nodeconfig-iam-ra.yaml"), None)).unwrap();
    assert_eq!(iam.config.mode(), Mode::Joined);
    // The SSM example has placeholders the operator must fill in; it must fail on exactly
    // those, naming them.
    let err = load(&sources(&examples().join("nodeconfig-ssm.yaml"), None)).unwrap_err();
    let paths: Vec<_> = err.field_errors().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["spec.hybrid.ssm.activationId"], "{err}");
}
