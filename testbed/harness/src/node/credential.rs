//! The kubelet's credential: a ServiceAccount token bound to `system:node`.

use std::path::Path;
use std::process::Command;

use super::{NodeError, run, write};

/// The ServiceAccount (in kube-system) whose token the kubelet uses, and the name of its
/// ClusterRoleBinding to `system:node`.
pub(super) fn account_name(index: u8) -> String {
    format!("pgrs-testbed-node-{index}")
}

pub(super) fn node_account(index: u8) -> String {
    format!("system:serviceaccount:kube-system:{}", account_name(index))
}

/// The kubelet's credential: a token of a ServiceAccount bound to the `system:node`
/// ClusterRole (everything a kubelet does, as the Node authorizer would grant it, but not
/// limited to this node's objects). A real node identity (`system:node:<name>` in
/// `system:nodes`) needs a certificate from the cluster CA, whose key the test bed does not
/// keep.
pub(super) fn node_credential(
    kubectl: &Path,
    admin_kubeconfig: &Path,
    index: u8,
) -> Result<String, NodeError> {
    let account = account_name(index);
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [{
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": "kube-system"}
        }, {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": account},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node"
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}]
        }]
    });
    let file = std::env::temp_dir().join(format!("pgrs-node-{index}-{}.json", std::process::id()));
    write(&file, &manifest.to_string())?;
    let mut apply = Command::new(kubectl);
    apply
        .env("KUBECONFIG", admin_kubeconfig)
        .arg("apply")
        .arg("--filename")
        .arg(&file);
    let applied = run(apply);
    let _ = std::fs::remove_file(&file);
    applied?;
    let mut token = Command::new(kubectl);
    token.env("KUBECONFIG", admin_kubeconfig).args([
        "create",
        "token",
        &account,
        "--namespace=kube-system",
        "--duration=48h",
    ]);
    Ok(run(token)?.trim().to_owned())
}
