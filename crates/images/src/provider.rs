//! `hybridlet credential-provider`: the kubelet's image credential provider protocol
//! (`credentialprovider.kubelet.k8s.io/v1`). The kubelet runs the program named in its
//! `CredentialProviderConfig` for images matching `matchImages`, writes a
//! `CredentialProviderRequest` on stdin and reads a `CredentialProviderResponse` from
//! stdout; a non-zero exit means "no credentials" and the kubelet logs stderr.
//!
//! The answer carries the login of the image's registry (`spec.images.credentials`),
//! keyed by that registry and cached per registry for the entry's `cacheDuration`.

use std::path::Path;

use hybridlet_config::ImagesSpec;
use serde_json::{Value, json};

use crate::ImagesError;
use crate::logins::read_login;

/// The protocol version hybridlet speaks (the kubelet's v1, GA since 1.26).
pub const API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";

/// The registry part of an image as the kubelet keys its cache (everything before the
/// first `/`, port included).
pub fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or(image)
}

/// Answer one request (the kubelet's stdin); the response JSON for stdout.
pub fn respond(request: &[u8], spec: &ImagesSpec) -> Result<String, ImagesError> {
    let bad = |m: String| ImagesError::Provider(m);
    let value: Value = serde_json::from_slice(request)
        .map_err(|e| bad(format!("the request on stdin is not JSON: {e}")))?;
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if api_version != API_VERSION {
        return Err(bad(format!(
            "apiVersion {api_version:?} is not served; set apiVersion: {API_VERSION} for this provider in the kubelet's CredentialProviderConfig"
        )));
    }
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind != "CredentialProviderRequest" {
        return Err(bad(format!(
            "kind {kind:?} is not CredentialProviderRequest"
        )));
    }
    let image = value
        .get("image")
        .and_then(Value::as_str)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("the request names no image".into()))?;
    let registry = registry_of(image);
    let entry = spec
        .credentials
        .iter()
        .find(|c| c.registry.eq_ignore_ascii_case(registry));
    let mut auth = serde_json::Map::new();
    let mut cache = std::time::Duration::from_secs(300);
    if let Some(entry) = entry {
        let login = read_login(Path::new(&entry.file))?;
        auth.insert(
            entry.registry.clone(),
            json!({"username": login.username, "password": login.password}),
        );
        cache = entry.cache_duration.0;
    }
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": "Registry",
        "cacheDuration": go_duration(cache),
        "auth": auth,
    })
    .to_string())
}

/// A duration as Go's `time.Duration.String` writes it (`5m0s`), which `metav1.Duration`
/// parses.
fn go_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_config::{GoDuration, RegistryCredentials};
    use std::os::unix::fs::PermissionsExt as _;

    /// What the kubelet does with our stdout, step by step (kubernetes
    /// `pkg/credentialprovider/plugin/plugin.go`: `ExecPlugin`, `decodeResponse`, and the
    /// cache-key switch in `provide`): the GroupVersion read from the response must equal
    /// the configured apiVersion; kind `CredentialProviderResponse`; `cacheKeyType` one of
    /// Image, Registry, Global (else the kubelet uses no credentials); `cacheDuration` a
    /// Go duration; `auth` a map of match patterns to username/password.
    fn kubelet_accepts(stdout: &str) -> Value {
        let v: Value = serde_json::from_str(stdout).unwrap();
        assert_eq!(
            v["apiVersion"], API_VERSION,
            "apiVersion from credential plugin response did not match"
        );
        assert_eq!(v["kind"], "CredentialProviderResponse");
        assert!(["Image", "Registry", "Global"].contains(&v["cacheKeyType"].as_str().unwrap()));
        let d = v["cacheDuration"].as_str().unwrap();
        assert!(
            d.ends_with('s') && d.chars().next().unwrap().is_ascii_digit(),
            "{d}"
        );
        for (_, login) in v["auth"].as_object().unwrap() {
            assert!(login["username"].is_string() && login["password"].is_string());
        }
        v
    }

    #[test]
    fn answers_the_kubelets_request_with_the_registry_login() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("robot.json");
        std::fs::write(&file, r#"{"name":"robot$ml","secret":"s3cr3t"}"#).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spec = ImagesSpec {
            credentials: vec![RegistryCredentials {
                registry: "harbor.example.com:8443".into(),
                file: file.display().to_string(),
                cache_duration: GoDuration(std::time::Duration::from_secs(3660)),
            }],
            ..ImagesSpec::default()
        };
        // The request exactly as the kubelet encodes it (1.33+ may add fields we ignore).
        let request = br#"{"kind":"CredentialProviderRequest","apiVersion":"credentialprovider.kubelet.k8s.io/v1","image":"harbor.example.com:8443/ml/triton:24.08"}"#;
        let v = kubelet_accepts(&respond(request, &spec).unwrap());
        assert_eq!(v["cacheDuration"], "1h1m0s");
        assert_eq!(v["auth"]["harbor.example.com:8443"]["username"], "robot$ml");
        // Another registry: an empty answer, which the kubelet takes as "no login".
        let other = br#"{"kind":"CredentialProviderRequest","apiVersion":"credentialprovider.kubelet.k8s.io/v1","image":"docker.io/library/busybox"}"#;
        let v = kubelet_accepts(&respond(other, &spec).unwrap());
        assert!(v["auth"].as_object().unwrap().is_empty());
        // A request in a version we do not speak is refused with the fix.
        let old = br#"{"kind":"CredentialProviderRequest","apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","image":"x"}"#;
        assert!(
            respond(old, &spec)
                .unwrap_err()
                .to_string()
                .contains("set apiVersion")
        );
    }
}
