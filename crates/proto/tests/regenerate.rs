//! The committed generated code matches the .proto files. Regenerates into a scratch
//! directory with protox (pure Rust) and tonic-prost-build, then compares byte for byte.
//! `HYBRIDLET_REGENERATE=1` writes the new code into src/gen instead of failing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::path::Path;

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos = [
        "pluginregistration/v1/api.proto",
        "csi/v1/csi.proto",
        "dra/v1/api.proto",
        "dra/v1beta1/api.proto",
        "dra-health/v1alpha1/api.proto",
        "dra-health/v1/api.proto",
        "cri/v1/api.proto",
        "containerd/images.proto",
    ];
    let fds = protox::compile(protos, [root.join("proto")]).expect("compile .proto files");
    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("generate Rust");

    let gen_dir = root.join("src/gen");
    let mut drift = Vec::new();
    for name in [
        "pluginregistration.rs",
        "csi.v1.rs",
        "k8s.io.kubelet.pkg.apis.dra.v1.rs",
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.rs",
        "v1alpha1.rs",
        "v1.rs",
        "runtime.v1.rs",
        "containerd.services.images.v1.rs",
    ] {
        let fresh = std::fs::read_to_string(out.path().join(name)).expect("generated file");
        let committed = std::fs::read_to_string(gen_dir.join(name)).unwrap_or_default();
        if fresh != committed {
            if std::env::var("HYBRIDLET_REGENERATE").as_deref() == Ok("1") {
                std::fs::write(gen_dir.join(name), &fresh).unwrap();
            } else {
                drift.push(name);
            }
        }
    }
    assert!(
        drift.is_empty(),
        "src/gen is stale for {drift:?}; run HYBRIDLET_REGENERATE=1 cargo test -p hybridlet-proto --test regenerate"
    );
}
