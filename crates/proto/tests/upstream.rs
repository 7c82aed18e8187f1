//! Our `.proto` files say on the wire what the kubelet's and the CSI specification's say.
//! A wrong field number or type is silent breakage (both sides parse, and disagree), so
//! every message, field (name, number, label, type, oneof), enum value and RPC of the APIs
//! we serve is held below as facts transcribed from the upstream files, and compared with
//! the descriptors protox compiles from ours — in both directions, per package.
//!
//! Sources (read 2026-12; facts, not copied text):
//! * `pluginregistration`: kubernetes `staging/src/k8s.io/kubelet/pkg/apis/pluginregistration/v1/api.proto`
//! * `k8s.io.kubelet.pkg.apis.dra.v1` / `.v1beta1`: `…/kubelet/pkg/apis/dra/v1/api.proto`,
//!   `…/dra/v1beta1/api.proto` (`Device.share_id = 5`, v1 only, since 1.35, KEP-5075)
//! * `v1alpha1` / `v1` health: `…/kubelet/pkg/apis/dra-health/v1alpha1/api.proto` (fields 1–3
//!   in 1.34, `health_check_timeout_seconds = 4` in 1.35, `message = 5` in 1.36) and
//!   `…/dra-health/v1/api.proto`
//! * `runtime.v1` (CRI) and `containerd.services.images.v1`, the APIs hybridlet *calls*:
//!   k8s.io/cri-api `pkg/apis/runtime/v1/api.proto` (`ImageSpec.user_specified_image = 18`,
//!   `runtime_handler = 19`; `Image.pinned = 8`) and containerd
//!   `api/services/images/v1/images.proto`, only the RPCs, messages and fields we send or
//!   read (a client may leave the rest out: unknown fields are skipped on the wire). Each
//!   line is still an upstream fact; the set is the subset, held exactly.
//! * `csi.v1`: container-storage-interface/spec `csi.proto` v1.12.0, the Identity and Node
//!   services and every message they use (the node side is unchanged since v1.10.0). The
//!   `csi_secret`/`alpha_field` options are annotations, not wire format, and are not held.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

/// One line per fact: `rpc P.S/M IN -> [stream] OUT`, `field P.M.name = N [repeated|optional]
/// TYPE [oneof O]`, `enum P.E.VALUE = N`. Types are scalar names or fully qualified.
const UPSTREAM: &str = "
# pluginregistration
rpc pluginregistration.Registration/GetInfo pluginregistration.InfoRequest -> pluginregistration.PluginInfo
rpc pluginregistration.Registration/NotifyRegistrationStatus pluginregistration.RegistrationStatus -> pluginregistration.RegistrationStatusResponse
field pluginregistration.PluginInfo.type = 1 string
field pluginregistration.PluginInfo.name = 2 string
field pluginregistration.PluginInfo.endpoint = 3 string
field pluginregistration.PluginInfo.supported_versions = 4 repeated string
field pluginregistration.RegistrationStatus.plugin_registered = 1 bool
field pluginregistration.RegistrationStatus.error = 2 string
message pluginregistration.RegistrationStatusResponse
message pluginregistration.InfoRequest

# DRA v1
rpc k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourcesRequest -> k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourcesResponse
rpc k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourcesRequest -> k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourcesResponse
field k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourcesRequest.claims = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1.Claim
field k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourcesResponse.claims = 1 map<string, k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourceResponse>
field k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourceResponse.devices = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1.Device
field k8s.io.kubelet.pkg.apis.dra.v1.NodePrepareResourceResponse.error = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1.Device.request_names = 1 repeated string
field k8s.io.kubelet.pkg.apis.dra.v1.Device.pool_name = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1.Device.device_name = 3 string
field k8s.io.kubelet.pkg.apis.dra.v1.Device.cdi_device_ids = 4 repeated string
field k8s.io.kubelet.pkg.apis.dra.v1.Device.share_id = 5 optional string
field k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourcesRequest.claims = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1.Claim
field k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourcesResponse.claims = 1 map<string, k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourceResponse>
field k8s.io.kubelet.pkg.apis.dra.v1.NodeUnprepareResourceResponse.error = 1 string
field k8s.io.kubelet.pkg.apis.dra.v1.Claim.namespace = 1 string
field k8s.io.kubelet.pkg.apis.dra.v1.Claim.uid = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1.Claim.name = 3 string

# DRA v1beta1
rpc k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourcesRequest -> k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourcesResponse
rpc k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourcesRequest -> k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourcesResponse
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourcesRequest.claims = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1beta1.Claim
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourcesResponse.claims = 1 map<string, k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourceResponse>
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourceResponse.devices = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1beta1.Device
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodePrepareResourceResponse.error = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Device.request_names = 1 repeated string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Device.pool_name = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Device.device_name = 3 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Device.cdi_device_ids = 4 repeated string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourcesRequest.claims = 1 repeated k8s.io.kubelet.pkg.apis.dra.v1beta1.Claim
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourcesResponse.claims = 1 map<string, k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourceResponse>
field k8s.io.kubelet.pkg.apis.dra.v1beta1.NodeUnprepareResourceResponse.error = 1 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Claim.namespace = 1 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Claim.uid = 2 string
field k8s.io.kubelet.pkg.apis.dra.v1beta1.Claim.name = 3 string

# DRA device health v1alpha1 and v1
rpc v1alpha1.DRAResourceHealth/NodeWatchResources v1alpha1.NodeWatchResourcesRequest -> stream v1alpha1.NodeWatchResourcesResponse
message v1alpha1.NodeWatchResourcesRequest
enum v1alpha1.HealthStatus.UNKNOWN = 0
enum v1alpha1.HealthStatus.HEALTHY = 1
enum v1alpha1.HealthStatus.UNHEALTHY = 2
field v1alpha1.DeviceIdentifier.pool_name = 1 string
field v1alpha1.DeviceIdentifier.device_name = 2 string
field v1alpha1.DeviceHealth.device = 1 v1alpha1.DeviceIdentifier
field v1alpha1.DeviceHealth.health = 2 v1alpha1.HealthStatus
field v1alpha1.DeviceHealth.last_updated_time = 3 int64
field v1alpha1.DeviceHealth.health_check_timeout_seconds = 4 int64
field v1alpha1.DeviceHealth.message = 5 string
field v1alpha1.NodeWatchResourcesResponse.devices = 1 repeated v1alpha1.DeviceHealth
rpc v1.DRAResourceHealth/NodeWatchResources v1.NodeWatchResourcesRequest -> stream v1.NodeWatchResourcesResponse
message v1.NodeWatchResourcesRequest
enum v1.HealthStatus.UNKNOWN = 0
enum v1.HealthStatus.HEALTHY = 1
enum v1.HealthStatus.UNHEALTHY = 2
field v1.DeviceIdentifier.pool_name = 1 string
field v1.DeviceIdentifier.device_name = 2 string
field v1.DeviceHealth.device = 1 v1.DeviceIdentifier
field v1.DeviceHealth.health = 2 v1.HealthStatus
field v1.DeviceHealth.last_updated_time = 3 int64
field v1.DeviceHealth.health_check_timeout_seconds = 4 int64
field v1.DeviceHealth.message = 5 string
field v1.NodeWatchResourcesResponse.devices = 1 repeated v1.DeviceHealth

# CSI v1: Identity
rpc csi.v1.Identity/GetPluginInfo csi.v1.GetPluginInfoRequest -> csi.v1.GetPluginInfoResponse
rpc csi.v1.Identity/GetPluginCapabilities csi.v1.GetPluginCapabilitiesRequest -> csi.v1.GetPluginCapabilitiesResponse
rpc csi.v1.Identity/Probe csi.v1.ProbeRequest -> csi.v1.ProbeResponse
message csi.v1.GetPluginInfoRequest
field csi.v1.GetPluginInfoResponse.name = 1 string
field csi.v1.GetPluginInfoResponse.vendor_version = 2 string
field csi.v1.GetPluginInfoResponse.manifest = 3 map<string, string>
message csi.v1.GetPluginCapabilitiesRequest
field csi.v1.GetPluginCapabilitiesResponse.capabilities = 1 repeated csi.v1.PluginCapability
field csi.v1.PluginCapability.service = 1 csi.v1.PluginCapability.Service oneof type
field csi.v1.PluginCapability.volume_expansion = 2 csi.v1.PluginCapability.VolumeExpansion oneof type
field csi.v1.PluginCapability.Service.type = 1 csi.v1.PluginCapability.Service.Type
enum csi.v1.PluginCapability.Service.Type.UNKNOWN = 0
enum csi.v1.PluginCapability.Service.Type.CONTROLLER_SERVICE = 1
enum csi.v1.PluginCapability.Service.Type.VOLUME_ACCESSIBILITY_CONSTRAINTS = 2
enum csi.v1.PluginCapability.Service.Type.GROUP_CONTROLLER_SERVICE = 3
enum csi.v1.PluginCapability.Service.Type.SNAPSHOT_METADATA_SERVICE = 4
field csi.v1.PluginCapability.VolumeExpansion.type = 1 csi.v1.PluginCapability.VolumeExpansion.Type
enum csi.v1.PluginCapability.VolumeExpansion.Type.UNKNOWN = 0
enum csi.v1.PluginCapability.VolumeExpansion.Type.ONLINE = 1
enum csi.v1.PluginCapability.VolumeExpansion.Type.OFFLINE = 2
message csi.v1.ProbeRequest
field csi.v1.ProbeResponse.ready = 1 google.protobuf.BoolValue

# CSI v1: Node
rpc csi.v1.Node/NodeStageVolume csi.v1.NodeStageVolumeRequest -> csi.v1.NodeStageVolumeResponse
rpc csi.v1.Node/NodeUnstageVolume csi.v1.NodeUnstageVolumeRequest -> csi.v1.NodeUnstageVolumeResponse
rpc csi.v1.Node/NodePublishVolume csi.v1.NodePublishVolumeRequest -> csi.v1.NodePublishVolumeResponse
rpc csi.v1.Node/NodeUnpublishVolume csi.v1.NodeUnpublishVolumeRequest -> csi.v1.NodeUnpublishVolumeResponse
rpc csi.v1.Node/NodeGetVolumeStats csi.v1.NodeGetVolumeStatsRequest -> csi.v1.NodeGetVolumeStatsResponse
rpc csi.v1.Node/NodeExpandVolume csi.v1.NodeExpandVolumeRequest -> csi.v1.NodeExpandVolumeResponse
rpc csi.v1.Node/NodeGetCapabilities csi.v1.NodeGetCapabilitiesRequest -> csi.v1.NodeGetCapabilitiesResponse
rpc csi.v1.Node/NodeGetInfo csi.v1.NodeGetInfoRequest -> csi.v1.NodeGetInfoResponse
message csi.v1.VolumeCapability.BlockVolume
field csi.v1.VolumeCapability.MountVolume.fs_type = 1 string
field csi.v1.VolumeCapability.MountVolume.mount_flags = 2 repeated string
field csi.v1.VolumeCapability.MountVolume.volume_mount_group = 3 string
field csi.v1.VolumeCapability.AccessMode.mode = 1 csi.v1.VolumeCapability.AccessMode.Mode
enum csi.v1.VolumeCapability.AccessMode.Mode.UNKNOWN = 0
enum csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER = 1
enum csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_READER_ONLY = 2
enum csi.v1.VolumeCapability.AccessMode.Mode.MULTI_NODE_READER_ONLY = 3
enum csi.v1.VolumeCapability.AccessMode.Mode.MULTI_NODE_SINGLE_WRITER = 4
enum csi.v1.VolumeCapability.AccessMode.Mode.MULTI_NODE_MULTI_WRITER = 5
enum csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_SINGLE_WRITER = 6
enum csi.v1.VolumeCapability.AccessMode.Mode.SINGLE_NODE_MULTI_WRITER = 7
field csi.v1.VolumeCapability.block = 1 csi.v1.VolumeCapability.BlockVolume oneof access_type
field csi.v1.VolumeCapability.mount = 2 csi.v1.VolumeCapability.MountVolume oneof access_type
field csi.v1.VolumeCapability.access_mode = 3 csi.v1.VolumeCapability.AccessMode
field csi.v1.CapacityRange.required_bytes = 1 int64
field csi.v1.CapacityRange.limit_bytes = 2 int64
field csi.v1.Topology.segments = 1 map<string, string>
field csi.v1.NodeStageVolumeRequest.volume_id = 1 string
field csi.v1.NodeStageVolumeRequest.publish_context = 2 map<string, string>
field csi.v1.NodeStageVolumeRequest.staging_target_path = 3 string
field csi.v1.NodeStageVolumeRequest.volume_capability = 4 csi.v1.VolumeCapability
field csi.v1.NodeStageVolumeRequest.secrets = 5 map<string, string>
field csi.v1.NodeStageVolumeRequest.volume_context = 6 map<string, string>
message csi.v1.NodeStageVolumeResponse
field csi.v1.NodeUnstageVolumeRequest.volume_id = 1 string
field csi.v1.NodeUnstageVolumeRequest.staging_target_path = 2 string
message csi.v1.NodeUnstageVolumeResponse
field csi.v1.NodePublishVolumeRequest.volume_id = 1 string
field csi.v1.NodePublishVolumeRequest.publish_context = 2 map<string, string>
field csi.v1.NodePublishVolumeRequest.staging_target_path = 3 string
field csi.v1.NodePublishVolumeRequest.target_path = 4 string
field csi.v1.NodePublishVolumeRequest.volume_capability = 5 csi.v1.VolumeCapability
field csi.v1.NodePublishVolumeRequest.readonly = 6 bool
field csi.v1.NodePublishVolumeRequest.secrets = 7 map<string, string>
field csi.v1.NodePublishVolumeRequest.volume_context = 8 map<string, string>
message csi.v1.NodePublishVolumeResponse
field csi.v1.NodeUnpublishVolumeRequest.volume_id = 1 string
field csi.v1.NodeUnpublishVolumeRequest.target_path = 2 string
message csi.v1.NodeUnpublishVolumeResponse
field csi.v1.NodeGetVolumeStatsRequest.volume_id = 1 string
field csi.v1.NodeGetVolumeStatsRequest.volume_path = 2 string
field csi.v1.NodeGetVolumeStatsRequest.staging_target_path = 3 string
field csi.v1.NodeGetVolumeStatsResponse.usage = 1 repeated csi.v1.VolumeUsage
field csi.v1.NodeGetVolumeStatsResponse.volume_condition = 2 csi.v1.VolumeCondition
field csi.v1.VolumeUsage.available = 1 int64
field csi.v1.VolumeUsage.total = 2 int64
field csi.v1.VolumeUsage.used = 3 int64
field csi.v1.VolumeUsage.unit = 4 csi.v1.VolumeUsage.Unit
enum csi.v1.VolumeUsage.Unit.UNKNOWN = 0
enum csi.v1.VolumeUsage.Unit.BYTES = 1
enum csi.v1.VolumeUsage.Unit.INODES = 2
field csi.v1.VolumeCondition.abnormal = 1 bool
field csi.v1.VolumeCondition.message = 2 string
message csi.v1.NodeGetCapabilitiesRequest
field csi.v1.NodeGetCapabilitiesResponse.capabilities = 1 repeated csi.v1.NodeServiceCapability
field csi.v1.NodeServiceCapability.rpc = 1 csi.v1.NodeServiceCapability.RPC oneof type
field csi.v1.NodeServiceCapability.RPC.type = 1 csi.v1.NodeServiceCapability.RPC.Type
enum csi.v1.NodeServiceCapability.RPC.Type.UNKNOWN = 0
enum csi.v1.NodeServiceCapability.RPC.Type.STAGE_UNSTAGE_VOLUME = 1
enum csi.v1.NodeServiceCapability.RPC.Type.GET_VOLUME_STATS = 2
enum csi.v1.NodeServiceCapability.RPC.Type.EXPAND_VOLUME = 3
enum csi.v1.NodeServiceCapability.RPC.Type.VOLUME_CONDITION = 4
enum csi.v1.NodeServiceCapability.RPC.Type.SINGLE_NODE_MULTI_WRITER = 5
enum csi.v1.NodeServiceCapability.RPC.Type.VOLUME_MOUNT_GROUP = 6
message csi.v1.NodeGetInfoRequest
field csi.v1.NodeGetInfoResponse.node_id = 1 string
field csi.v1.NodeGetInfoResponse.max_volumes_per_node = 2 int64
field csi.v1.NodeGetInfoResponse.accessible_topology = 3 csi.v1.Topology
field csi.v1.NodeExpandVolumeRequest.volume_id = 1 string
field csi.v1.NodeExpandVolumeRequest.volume_path = 2 string
field csi.v1.NodeExpandVolumeRequest.capacity_range = 3 csi.v1.CapacityRange
field csi.v1.NodeExpandVolumeRequest.staging_target_path = 4 string
field csi.v1.NodeExpandVolumeRequest.volume_capability = 5 csi.v1.VolumeCapability
field csi.v1.NodeExpandVolumeRequest.secrets = 6 map<string, string>
field csi.v1.NodeExpandVolumeResponse.capacity_bytes = 1 int64

# CRI (the subset hybridlet calls)
rpc runtime.v1.RuntimeService/Version runtime.v1.VersionRequest -> runtime.v1.VersionResponse
rpc runtime.v1.ImageService/ListImages runtime.v1.ListImagesRequest -> runtime.v1.ListImagesResponse
rpc runtime.v1.ImageService/ImageStatus runtime.v1.ImageStatusRequest -> runtime.v1.ImageStatusResponse
rpc runtime.v1.ImageService/PullImage runtime.v1.PullImageRequest -> runtime.v1.PullImageResponse
field runtime.v1.VersionRequest.version = 1 string
field runtime.v1.VersionResponse.version = 1 string
field runtime.v1.VersionResponse.runtime_name = 2 string
field runtime.v1.VersionResponse.runtime_version = 3 string
field runtime.v1.VersionResponse.runtime_api_version = 4 string
field runtime.v1.ImageSpec.image = 1 string
field runtime.v1.ImageSpec.annotations = 2 map<string, string>
field runtime.v1.ImageSpec.user_specified_image = 18 string
field runtime.v1.ImageSpec.runtime_handler = 19 string
field runtime.v1.AuthConfig.username = 1 string
field runtime.v1.AuthConfig.password = 2 string
field runtime.v1.AuthConfig.auth = 3 string
field runtime.v1.AuthConfig.server_address = 4 string
field runtime.v1.AuthConfig.identity_token = 5 string
field runtime.v1.AuthConfig.registry_token = 6 string
field runtime.v1.ImageFilter.image = 1 runtime.v1.ImageSpec
field runtime.v1.ListImagesRequest.filter = 1 runtime.v1.ImageFilter
field runtime.v1.ListImagesResponse.images = 1 repeated runtime.v1.Image
field runtime.v1.Image.id = 1 string
field runtime.v1.Image.repo_tags = 2 repeated string
field runtime.v1.Image.repo_digests = 3 repeated string
field runtime.v1.Image.size = 4 uint64
field runtime.v1.Image.username = 6 string
field runtime.v1.Image.spec = 7 runtime.v1.ImageSpec
field runtime.v1.Image.pinned = 8 bool
field runtime.v1.ImageStatusRequest.image = 1 runtime.v1.ImageSpec
field runtime.v1.ImageStatusRequest.verbose = 2 bool
field runtime.v1.ImageStatusResponse.image = 1 runtime.v1.Image
field runtime.v1.ImageStatusResponse.info = 2 map<string, string>
field runtime.v1.PullImageRequest.image = 1 runtime.v1.ImageSpec
field runtime.v1.PullImageRequest.auth = 2 runtime.v1.AuthConfig
field runtime.v1.PullImageResponse.image_ref = 1 string

# containerd's image service (the subset hybridlet calls)
rpc containerd.services.images.v1.Images/Get containerd.services.images.v1.GetImageRequest -> containerd.services.images.v1.GetImageResponse
rpc containerd.services.images.v1.Images/Update containerd.services.images.v1.UpdateImageRequest -> containerd.services.images.v1.UpdateImageResponse
field containerd.services.images.v1.Image.name = 1 string
field containerd.services.images.v1.Image.labels = 2 map<string, string>
field containerd.services.images.v1.GetImageRequest.name = 1 string
field containerd.services.images.v1.GetImageResponse.image = 1 containerd.services.images.v1.Image
field containerd.services.images.v1.UpdateImageRequest.image = 1 containerd.services.images.v1.Image
field containerd.services.images.v1.UpdateImageRequest.update_mask = 2 google.protobuf.FieldMask
field containerd.services.images.v1.UpdateImageResponse.image = 1 containerd.services.images.v1.Image
";

const OURS: [&str; 8] = [
    "pluginregistration/v1/api.proto",
    "dra/v1/api.proto",
    "dra/v1beta1/api.proto",
    "dra-health/v1alpha1/api.proto",
    "dra-health/v1/api.proto",
    "csi/v1/csi.proto",
    "cri/v1/api.proto",
    "containerd/images.proto",
];

fn compile() -> FileDescriptorSet {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    protox::compile(OURS, [root.join("proto")]).expect("compile our .proto files")
}

fn scalar(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        Type::Group | Type::Message | Type::Enum => unreachable!("not a scalar"),
    }
}

/// The facts lines of a message and its nested messages and enums.
fn render_message(prefix: &str, m: &DescriptorProto, out: &mut BTreeSet<String>) {
    let name = format!("{prefix}.{}", m.name());
    let maps: BTreeMap<String, &DescriptorProto> = m
        .nested_type
        .iter()
        .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
        .map(|n| (format!("{name}.{}", n.name()), n))
        .collect();
    let type_of = |f: &prost_types::FieldDescriptorProto| match f.r#type() {
        Type::Message | Type::Enum => f.type_name().trim_start_matches('.').to_string(),
        t => scalar(t).to_string(),
    };
    if m.field.is_empty() {
        out.insert(format!("message {name}"));
    }
    for f in &m.field {
        let ty = type_of(f);
        let rendered = if let Some(entry) = maps.get(&ty) {
            format!(
                "map<{}, {}>",
                type_of(&entry.field[0]),
                type_of(&entry.field[1])
            )
        } else if f.label() == Label::Repeated {
            format!("repeated {ty}")
        } else if f.proto3_optional() {
            format!("optional {ty}")
        } else {
            ty
        };
        let oneof = match f.oneof_index {
            Some(i) if !f.proto3_optional() => {
                format!(" oneof {}", m.oneof_decl[i as usize].name())
            }
            _ => String::new(),
        };
        out.insert(format!(
            "field {name}.{} = {} {rendered}{oneof}",
            f.name(),
            f.number()
        ));
    }
    for nested in &m.nested_type {
        if !maps.contains_key(&format!("{name}.{}", nested.name())) {
            render_message(&name, nested, out);
        }
    }
    for e in &m.enum_type {
        for v in &e.value {
            out.insert(format!(
                "enum {name}.{}.{} = {}",
                e.name(),
                v.name(),
                v.number()
            ));
        }
    }
}

/// Every fact our files state, for the packages of `OURS` (imports excluded).
fn ours() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in compile().file {
        if !OURS.contains(&file.name()) {
            continue;
        }
        let package = file.package().to_string();
        for m in &file.message_type {
            render_message(&package, m, &mut out);
        }
        for e in &file.enum_type {
            for v in &e.value {
                out.insert(format!(
                    "enum {package}.{}.{} = {}",
                    e.name(),
                    v.name(),
                    v.number()
                ));
            }
        }
        for s in &file.service {
            for m in &s.method {
                out.insert(format!(
                    "rpc {package}.{}/{} {} -> {}{}",
                    s.name(),
                    m.name(),
                    m.input_type().trim_start_matches('.'),
                    if m.server_streaming() { "stream " } else { "" },
                    m.output_type().trim_start_matches('.')
                ));
            }
        }
    }
    out
}

fn upstream() -> BTreeSet<String> {
    UPSTREAM
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn our_protos_state_exactly_the_upstream_wire_contract() {
    let (ours, upstream) = (ours(), upstream());
    let missing: Vec<&String> = upstream.difference(&ours).collect();
    let extra: Vec<&String> = ours.difference(&upstream).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "our .proto files differ from the upstream APIs\nupstream states, we do not:\n  {}\nwe state, upstream does not:\n  {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn the_comparison_sees_a_renumbered_field() {
    // The check itself: a field moved to another number in a copy of one of our files
    // shows up on both sides of the difference.
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    for f in OURS {
        let to = dir.path().join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root.join(f), &to).unwrap();
    }
    let claim = dir.path().join("dra/v1/api.proto");
    let text = std::fs::read_to_string(&claim).unwrap();
    assert!(text.contains("string uid = 2;"));
    std::fs::write(&claim, text.replace("string uid = 2;", "string uid = 4;")).unwrap();
    let fds = protox::compile(OURS, [dir.path()]).unwrap();
    let mut out = BTreeSet::new();
    for file in fds.file.iter().filter(|f| f.name() == "dra/v1/api.proto") {
        for m in &file.message_type {
            render_message(file.package(), m, &mut out);
        }
    }
    assert!(out.contains("field k8s.io.kubelet.pkg.apis.dra.v1.Claim.uid = 4 string"));
    assert!(!upstream().contains("field k8s.io.kubelet.pkg.apis.dra.v1.Claim.uid = 4 string"));
    assert!(!out.contains("field k8s.io.kubelet.pkg.apis.dra.v1.Claim.uid = 2 string"));
}
