//! The fake NVML's MIG calls answer as NVML does (the rules the DRA driver's tests rely
//! on): creation by placement with NVML's refusals, destruction refused while processes
//! run, MIG mode off refused, everything written back to the fixture (a restarted reader
//! finds it) and shown as the driver's capability files and device nodes.
#![allow(clippy::unwrap_used)]

use hybridlet_gpu::{FakeSource, GpuError, GpuSource, MigCode};

const GPU0: &str = "GPU-5a0b0000-1c2d-4e5f-8a9b-0000dead0000";
const GPU1: &str = "GPU-5a0b0001-1c2d-4e5f-8a9b-0000dead0001";

fn code(e: GpuError) -> MigCode {
    match e {
        GpuError::Mig { code, .. } => code,
        other => panic!("not a MIG error: {other}"),
    }
}

#[test]
fn the_fake_creates_and_destroys_instances_as_nvml_does() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 0).unwrap();
    hybridlet_fixtures::enable_mig(dir.path(), 0, &[(19, 0)]).unwrap();
    let fixture = dir.path().join("fake-nvml.json");
    let nvml = FakeSource::from_file(&fixture).unwrap();
    // The instance of the fixture is listed, with the driver's files for it.
    let listed = nvml.mig_instances(GPU0).unwrap();
    assert_eq!(listed.len(), 1);
    let caps = dir
        .path()
        .join("proc/driver/nvidia/capabilities/gpu0/mig/gi1");
    assert!(caps.join("access").exists() && caps.join("ci0/access").exists());
    assert!(
        std::fs::read_to_string(caps.join("access"))
            .unwrap()
            .contains("DeviceFileMinor: 12")
    );
    assert!(dir.path().join("dev/nvidia-caps/nvidia-cap12").exists());

    // NVML's refusals.
    assert_eq!(
        code(nvml.create_mig(GPU1, 19, 0).unwrap_err()),
        MigCode::NotSupported,
        "MIG mode off"
    );
    assert_eq!(
        code(nvml.create_mig(GPU0, 19, 0).unwrap_err()),
        MigCode::InsufficientResources,
        "taken"
    );
    assert_eq!(
        code(nvml.create_mig(GPU0, 9, 1).unwrap_err()),
        MigCode::InvalidArgument,
        "no such placement"
    );
    assert_eq!(
        code(nvml.create_mig(GPU0, 0, 0).unwrap_err()),
        MigCode::InsufficientResources,
        "7g over an instance"
    );
    assert_eq!(
        code(nvml.destroy_mig(GPU0, 7).unwrap_err()),
        MigCode::NotFound
    );
    assert!(nvml.mig_instances(GPU1).unwrap().is_empty());

    let made = nvml.create_mig(GPU0, 9, 4).unwrap();
    assert_eq!(
        (
            made.gpu_instance_id,
            made.placement.start,
            made.placement.size
        ),
        (2, 4, 4)
    );
    assert!(
        dir.path()
            .join("proc/driver/nvidia/capabilities/gpu0/mig/gi2/ci0/access")
            .exists()
    );
    // Written back: another reader (a restarted daemon) finds both.
    let again = FakeSource::from_file(&fixture).unwrap();
    assert_eq!(again.mig_instances(GPU0).unwrap().len(), 2);

    // Processes on it: IN_USE, and it stays.
    let mut text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    text["gpus"][0]["mig"]["instances"][1]["busy"] = serde_json::json!(true);
    std::fs::write(&fixture, text.to_string()).unwrap();
    let busy = FakeSource::from_file(&fixture).unwrap();
    assert_eq!(code(busy.destroy_mig(GPU0, 2).unwrap_err()), MigCode::InUse);
    assert_eq!(busy.mig_instances(GPU0).unwrap().len(), 2);
    busy.destroy_mig(GPU0, 1).unwrap();
    assert!(
        !caps.exists(),
        "the driver's files of a destroyed instance go"
    );
    assert_eq!(
        FakeSource::from_file(&fixture)
            .unwrap()
            .mig_instances(GPU0)
            .unwrap()
            .len(),
        1
    );

    // A compute instance that cannot be created leaves no GPU instance behind.
    let mut text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    text["failComputeInstance"] = serde_json::json!(true);
    std::fs::write(&fixture, text.to_string()).unwrap();
    let failing = FakeSource::from_file(&fixture).unwrap();
    assert_eq!(
        code(failing.create_mig(GPU0, 19, 0).unwrap_err()),
        MigCode::InsufficientResources
    );
    assert_eq!(failing.mig_instances(GPU0).unwrap().len(), 1);
}
