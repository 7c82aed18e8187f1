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

/// Static MIG: one device per MIG device, named by where it sits; a GPU instance split
/// into two compute instances is two devices. Dynamic MIG: every placement and the GPU,
/// each consuming from the GPU's counter set only the slices it covers.
#[test]
fn the_driver_offers_mig_devices_by_placement() {
    let dir = tempfile::tempdir().unwrap();
    hybridlet_fixtures::dgx_h200(dir.path(), 0).unwrap();
    let mut nvml = hybridlet_fixtures::enable_mig(dir.path(), 0, &[(9, 0), (19, 4)]).unwrap();
    let mut second = nvml["gpus"][0]["mig"]["instances"][0].clone();
    second["computeInstanceId"] = serde_json::json!(1);
    second["uuid"] = serde_json::json!("MIG-second-compute-instance");
    nvml["gpus"][0]["mig"]["instances"]
        .as_array_mut()
        .unwrap()
        .push(second);
    std::fs::write(dir.path().join("fake-nvml.json"), nvml.to_string()).unwrap();
    let source = FakeSource::from_file(&dir.path().join("fake-nvml.json")).unwrap();
    let (gpus, _) = hybridlet_gpu::discover(&source, &[]).unwrap();
    let parts = |dynamic| {
        hybridlet_gpu::dra::parts(
            "gpu.hybridlet.io",
            "n",
            gpus.clone(),
            dir.path().join("dev"),
            hybridlet_gpu::dra::GpuOptions {
                dynamic_mig: dynamic,
                ..Default::default()
            },
        )
    };
    let names = |p: &hybridlet_dra::DriverParts| -> Vec<String> {
        p.devices
            .iter()
            .filter(|d| d.name.starts_with("gpu-0"))
            .map(|d| d.name.clone())
            .collect()
    };
    let fixed = parts(false);
    assert_eq!(
        names(&fixed),
        [
            "gpu-0-mig-3g71gb-0",
            "gpu-0-mig-1g18gb-4",
            "gpu-0-mig-3g71gb-0-ci1"
        ]
    );
    assert!(fixed.counter_sets.is_empty());
    assert!(
        fixed
            .keys
            .iter()
            .filter(|(n, _)| n.starts_with("gpu-0"))
            .all(|(_, k)| k == GPU0)
    );
    let dynamic = parts(true);
    assert_eq!(names(&dynamic).len(), 26);
    assert_eq!(dynamic.counter_sets.len(), 1);
    let two = dynamic
        .devices
        .iter()
        .find(|d| d.name == "gpu-0-mig-2g35gb-2")
        .unwrap();
    let used: Vec<&str> = two.consumes[0]
        .counters
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(used, ["compute-slices", "memory-slice-2", "memory-slice-3"]);
    assert_eq!(two.consumes[0].counters["compute-slices"], "2");
    let me = dynamic
        .devices
        .iter()
        .find(|d| d.name == "gpu-0-mig-1g18gbme-0")
        .unwrap();
    assert_eq!(me.consumes[0].counters["ofa-engines"], "1");
}
