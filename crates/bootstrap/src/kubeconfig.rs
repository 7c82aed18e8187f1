//! The kubelet's kubeconfig: the API server, its CA, and `hybridlet token` as the exec
//! credential plugin.

use std::fmt::Write as _;

use crate::model::{ClusterCoordinates, NodeIdentity};

pub(crate) fn kubeconfig(cluster: &ClusterCoordinates, node: &NodeIdentity) -> String {
    let mut env = String::new();
    if let Some(file) = &node.aws_config_file {
        let _ = write!(
            env,
            "\n      env:\n      - name: AWS_CONFIG_FILE\n        value: {file}\n      - name: AWS_PROFILE\n        value: default"
        );
    }
    format!(
        r#"# Written by hybridlet init. No secrets: the token comes from `hybridlet token`.
apiVersion: v1
kind: Config
clusters:
- name: kubernetes
  cluster:
    server: {endpoint}
    certificate-authority: /etc/kubernetes/pki/ca.crt
contexts:
- name: kubelet
  context:
    cluster: kubernetes
    user: kubelet
current-context: kubelet
users:
- name: kubelet
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: /usr/bin/hybridlet
      args: [token, --cluster-id, {name}, --region, {region}]
      interactiveMode: Never{env}
"#,
        endpoint = cluster.endpoint,
        name = cluster.name,
        region = cluster.region,
    )
}
