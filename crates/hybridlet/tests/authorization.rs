//! Every request both DRA drivers make to the API server, against what the kubelet's
//! identity may do. The drivers use the kubelet's kubeconfig (`system:node:<name>`, group
//! `system:nodes`), and deploy/ ships no RBAC for them: the Node authorizer must allow each
//! request by itself. Its rules, transcribed as facts from kubernetes
//! `plugin/pkg/auth/authorizer/node/node_authorizer.go` (with AuthorizeNodeWithSelectors):
//! resourceslices `create` (NodeRestriction admission checks `spec.nodeName`), `get`,
//! `update`, `patch`, `delete` of a slice whose `spec.nodeName` is the node, `list`,
//! `watch`, `deletecollection` only with the field selector `spec.nodeName=<node>`;
//! resourceclaims `get` only (of a pod bound to the node); pods `list`/`watch` only with
//! `spec.nodeName=<node>`; its own Node object: `get` (by name), and `create`, `update`,
//! `patch` (authorizeNode allows them; NodeRestriction admission keeps a node to its own
//! object and out of the `node-restriction.kubernetes.io/` and most `kubernetes.io/` label
//! prefixes, so the capacity labels use `hybridlet.io/`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test code

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Daemon, NODE, is_socket, wait_until};
use hybridlet_proto::dra::v1;
use serde_json::json;

/// One request, as the Node authorizer sees it.
#[derive(Debug)]
struct Attrs {
    resource: String,
    verb: &'static str,
    name: Option<String>,
    field_selector: Option<String>,
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%2F", "/")
                .replace("%2C", ",")
        })
    })
}

/// `METHOD /path?query` → the authorizer's attributes.
fn attrs(request: &str) -> Attrs {
    let (method, target) = request.split_once(' ').unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/v1/<res>[/<name>], /apis/<group>/<version>/[namespaces/<ns>/]<res>[/<name>]
    let rest = if parts[0] == "api" {
        &parts[2..]
    } else {
        &parts[3..]
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let (resource, name) = (rest[0].to_string(), rest.get(1).map(|n| n.to_string()));
    let watch = query_param(query, "watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method, name.is_some()) {
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        other => panic!("unexpected request {other:?}: {request}"),
    };
    Attrs {
        resource,
        verb,
        name,
        field_selector: query_param(query, "fieldSelector"),
    }
}

/// The Node authorizer's decision for `node` (see the module docs); `slice_node` gives the
/// `spec.nodeName` of an existing slice.
fn node_may(
    node: &str,
    a: &Attrs,
    slice_node: impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    // Any one requirement of the selector naming this node is enough.
    let own = [
        format!("spec.nodeName={node}"),
        format!("spec.nodeName=={node}"),
    ];
    let own_selector = a
        .field_selector
        .as_deref()
        .is_some_and(|s| s.split(',').any(|r| own.iter().any(|o| o == r)));
    match (a.resource.as_str(), a.verb) {
        ("resourceslices", "create") => Ok(()),
        ("resourceslices", "get" | "update" | "patch" | "delete") => {
            let name = a.name.as_deref().unwrap();
            match slice_node(name) {
                Some(n) if n == node => Ok(()),
                other => Err(format!("slice {name} belongs to {other:?}")),
            }
        }
        ("resourceslices", "list" | "watch" | "deletecollection") => {
            if own_selector {
                Ok(())
            } else {
                Err(format!(
                    "{} without fieldSelector spec.nodeName={node}: {:?}",
                    a.verb, a.field_selector
                ))
            }
        }
        ("resourceclaims", "get") => Ok(()),
        // Pods: list/watch of the node's own (authorizePod with selectors).
        ("pods", "list" | "watch") if own_selector => Ok(()),
        ("nodes", "get") if a.name.as_deref() == Some(node) => Ok(()),
        ("nodes", "create" | "update" | "patch") if a.name.as_deref() == Some(node) => Ok(()),
        _ => Err("not granted to nodes".into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_one_the_kubelets_identity_may_make() {
    let d = Daemon::start(
        |root| {
            hybridlet_fixtures::dgx_h200(root, 2).unwrap();
        },
        |config| {
            config.replace(
                "  dra:\n    gpu:\n      driverName: gpu.example.com\n",
                "  dra:\n    gpu:\n      enabled: true\n    sriov:\n      enabled: true\n  nodeLabels:\n    enabled: true\n    minInterval: 1s\n",
            )
        },
        |root| {
            vec![
                "--nvml-fixture".into(),
                root.join("fake-nvml.json").display().to_string(),
            ]
        },
    )
    .await;
    let slices = "/apis/resource.k8s.io/v1/resourceslices";
    wait_until("both pools published", || {
        let drivers: BTreeSet<String> = d
            .api
            .list(slices)
            .iter()
            .map(|s| s["spec"]["driver"].as_str().unwrap().to_string())
            .collect();
        drivers.len() == 2
    })
    .await;
    // The kubelet wipes a slice (its restart): the watch sees it and republishes.
    wait_until("the slice watch", || d.api.watches() >= 1).await;
    let victim = d.api.list(slices)[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    d.api.remove(&format!("{slices}/{victim}"));
    wait_until("the slice republished", || {
        d.api
            .list(slices)
            .iter()
            .filter(|s| s["spec"]["driver"].is_string())
            .count()
            >= 2
            && d.api
                .requests()
                .iter()
                .filter(|r| r.starts_with("POST"))
                .count()
                >= 3
    })
    .await;
    // A claim prepared and unprepared.
    d.api.put(
        "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/train",
        json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
               "metadata": {"name": "train", "namespace": "ml", "uid": "uid-1"},
               "spec": {},
               "status": {"allocation": {"devices": {"results": [
                   {"request": "gpu", "driver": "gpu.hybridlet.io", "pool": NODE, "device": "gpu-0"}]}}}}),
    );
    let sock = d.kubelet.join("plugins/gpu.hybridlet.io/dra.sock");
    wait_until("the DRA socket", || is_socket(&sock)).await;
    let mut client = v1::dra_plugin_client::DraPluginClient::new(
        hybridlet_kubelet_plugin::connect(&sock).await.unwrap(),
    );
    let claims = vec![v1::Claim {
        namespace: "ml".into(),
        name: "train".into(),
        uid: "uid-1".into(),
    }];
    let r = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: claims.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.claims["uid-1"].error, "");
    client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest { claims })
        .await
        .unwrap();

    // Slices that ever existed, by name → node: those present now, and (for the one the
    // "kubelet" removed) what it was created with.
    let now: BTreeMap<String, String> = d
        .api
        .list(slices)
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap().to_string(),
                s["spec"]["nodeName"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    wait_until("the capacity labels written", || {
        d.api
            .requests()
            .iter()
            .any(|r| r.starts_with("PATCH /api/v1/nodes/"))
    })
    .await;
    let requests = d.api.requests();
    let mut verbs: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for request in &requests {
        let a = attrs(request);
        let decision = node_may(NODE, &a, |name| {
            now.get(name)
                .cloned()
                .or_else(|| (name == victim).then(|| NODE.to_string()))
        });
        assert!(decision.is_ok(), "{request}: {}", decision.unwrap_err());
        verbs.entry(a.resource).or_default().insert(a.verb);
    }
    // Exactly the table in docs/dra.md "Identity".
    let expected: BTreeMap<String, BTreeSet<&'static str>> = [
        ("nodes", vec!["get", "patch"]),
        (
            "resourceslices",
            vec!["create", "delete", "list", "update", "watch"],
        ),
        ("resourceclaims", vec!["get"]),
    ]
    .into_iter()
    .map(|(r, v)| (r.to_string(), v.into_iter().collect()))
    .collect();
    // `update` and `delete` need a change the run may not have made; the rest must show.
    for (resource, want) in &expected {
        let got = verbs.get(resource).cloned().unwrap_or_default();
        assert!(got.is_subset(want), "{resource}: {got:?} beyond {want:?}");
        for must in ["get", "list", "watch", "create", "patch"] {
            if want.contains(must) {
                assert!(got.contains(must), "{resource}: no {must} in {requests:#?}");
            }
        }
    }
    // Pods are listed only when a prepared claim's ResourceClaim is gone (not in this run).
    assert!(
        verbs
            .keys()
            .all(|r| expected.contains_key(r) || r == "pods"),
        "{verbs:?}"
    );
    let (status, log) = d.stop().await;
    assert!(status.success(), "{log}");
}

#[test]
fn the_transcribed_rules_refuse_what_a_node_may_not_do() {
    let slice_of = |n: &str| (n == "mine").then(|| "node-a".to_string());
    for (request, allowed) in [
        (
            "GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dnode-a&watch=true",
            true,
        ),
        ("GET /apis/resource.k8s.io/v1/resourceslices", false),
        (
            "GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dnode-b",
            false,
        ),
        (
            "GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.driver%3Dx%2Cspec.nodeName%3Dnode-a",
            true,
        ),
        (
            "GET /apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3Dnode-a2",
            false,
        ),
        ("PUT /apis/resource.k8s.io/v1/resourceslices/mine", true),
        (
            "DELETE /apis/resource.k8s.io/v1/resourceslices/theirs",
            false,
        ),
        (
            "GET /apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/c",
            true,
        ),
        ("GET /apis/resource.k8s.io/v1/resourceclaims", false),
        ("GET /api/v1/nodes/node-a", true),
        ("GET /api/v1/nodes/node-b", false),
        ("GET /api/v1/namespaces/ml/secrets/s", false),
        (
            "GET /api/v1/namespaces/ml/pods?fieldSelector=spec.nodeName%3Dnode-a",
            true,
        ),
        ("GET /api/v1/namespaces/ml/pods", false),
    ] {
        assert_eq!(
            node_may("node-a", &attrs(request), slice_of).is_ok(),
            allowed,
            "{request}"
        );
    }
}
