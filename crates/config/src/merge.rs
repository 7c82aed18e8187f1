//! Merging of YAML documents: later files win.
//!
//! Rules (documented in docs/configuration.md):
//! * mappings merge key by key, recursively (so `spec.kubelet.config` deep-merges, as in
//!   nodeadm);
//! * `spec.kubelet.flags` lists are appended, as nodeadm does for multi-part user data;
//!   every other list is replaced;
//! * scalars are replaced;
//! * an explicit `null` removes the key set by an earlier file.

use serde_json::Value;

const APPEND_PATHS: &[&[&str]] = &[&["spec", "kubelet", "flags"]];

/// Merge `overlay` into `base`.
pub(crate) fn merge(base: &mut Value, overlay: Value) {
    let mut path = Vec::new();
    merge_at(base, overlay, &mut path);
}

fn merge_at(base: &mut Value, overlay: Value, path: &mut Vec<String>) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                if value.is_null() {
                    base.remove(&key);
                    continue;
                }
                path.push(key.clone());
                match base.get_mut(&key) {
                    Some(existing) => merge_at(existing, value, path),
                    None => {
                        base.insert(key, value);
                    }
                }
                path.pop();
            }
        }
        (Value::Array(base), Value::Array(overlay)) if is_append_path(path) => {
            base.extend(overlay);
        }
        (base, overlay) => *base = overlay,
    }
}

fn is_append_path(path: &[String]) -> bool {
    APPEND_PATHS
        .iter()
        .any(|p| p.len() == path.len() && p.iter().zip(path).all(|(a, b)| a == b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deep_merges_maps_and_appends_flags() {
        let mut base = json!({"spec": {
            "cluster": {"name": "a", "region": "eu-west-1"},
            "kubelet": {"flags": ["--a=1"], "config": {"maxPods": 110, "evictionHard": {"x": "1"}}},
            "other": [1, 2]
        }});
        merge(
            &mut base,
            json!({"spec": {
                "cluster": {"name": "b"},
                "kubelet": {"flags": ["--b=2"], "config": {"evictionHard": {"y": "2"}}},
                "other": [3]
            }}),
        );
        assert_eq!(
            base,
            json!({"spec": {
                "cluster": {"name": "b", "region": "eu-west-1"},
                "kubelet": {"flags": ["--a=1", "--b=2"], "config": {"maxPods": 110, "evictionHard": {"x": "1", "y": "2"}}},
                "other": [3]
            }})
        );
    }

    #[test]
    fn null_removes() {
        let mut base = json!({"spec": {"proxy": {"httpProxy": "http://p:3128"}}});
        merge(&mut base, json!({"spec": {"proxy": {"httpProxy": null}}}));
        assert_eq!(base, json!({"spec": {"proxy": {}}}));
    }
}
