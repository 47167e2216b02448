//! A container's environment, as the kubelet builds it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("env {name:?}: failed to read {what}")]
    Api {
        name: String,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("env {name:?}: {what} does not exist")]
    Missing { name: String, what: String },
    #[error("env {name:?}: field {field:?} is not supported")]
    Field { name: String, field: String },
}

/// Value of a downward-API `fieldPath` for `pod`.
pub fn field_value(pod: &Pod, field_path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if let Some(key) = field_path
        .strip_prefix("metadata.labels['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return meta.labels.as_ref().and_then(|l| l.get(key).cloned());
    }
    if let Some(key) = field_path
        .strip_prefix("metadata.annotations['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return meta.annotations.as_ref().and_then(|a| a.get(key).cloned());
    }
    match field_path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        "status.podIPs" => status.and_then(|s| {
            s.pod_ips.as_ref().map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        }),
        _ => None,
    }
}

/// Expands `$(NAME)` references to earlier variables; `$$` escapes, unknown
/// references stay as they are (the kubelet's rules).
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The environment of `container`: `base` (in-cluster variables etc.), then `envFrom`,
/// then `env` (later entries win, and may reference earlier ones).
pub async fn container_env(
    client: &kube::Client,
    pod: &Pod,
    container: &Container,
    base: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, EnvError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut vars = base;
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(cm) = &source.config_map_ref {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let name = &cm.name;
            match api.get_opt(name).await.map_err(|source| EnvError::Api {
                name: "envFrom".to_owned(),
                what: format!("ConfigMap {namespace}/{name}"),
                source,
            })? {
                Some(cm) => vars.extend(
                    cm.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), v)),
                ),
                None if cm.optional.unwrap_or(false) => {}
                None => {
                    return Err(EnvError::Missing {
                        name: "envFrom".to_owned(),
                        what: format!("ConfigMap {namespace}/{name}"),
                    });
                }
            }
        }
        if let Some(secret) = &source.secret_ref {
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let name = &secret.name;
            match api.get_opt(name).await.map_err(|source| EnvError::Api {
                name: "envFrom".to_owned(),
                what: format!("Secret {namespace}/{name}"),
                source,
            })? {
                Some(s) => vars.extend(s.data.unwrap_or_default().into_iter().map(|(k, v)| {
                    (
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v.0).into_owned(),
                    )
                })),
                None if secret.optional.unwrap_or(false) => {}
                None => {
                    return Err(EnvError::Missing {
                        name: "envFrom".to_owned(),
                        what: format!("Secret {namespace}/{name}"),
                    });
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            Some(expand(value, &vars))
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                Some(
                    field_value(pod, &field.field_path).ok_or_else(|| EnvError::Field {
                        name: var.name.clone(),
                        field: field.field_path.clone(),
                    })?,
                )
            } else if let Some(key) = &from.config_map_key_ref {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
                let cm = api
                    .get_opt(&key.name)
                    .await
                    .map_err(|source| EnvError::Api {
                        name: var.name.clone(),
                        what: format!("ConfigMap {namespace}/{}", key.name),
                        source,
                    })?;
                let value = cm
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get(&key.key).cloned());
                match value {
                    Some(v) => Some(v),
                    None if key.optional.unwrap_or(false) => None,
                    None => {
                        return Err(EnvError::Missing {
                            name: var.name.clone(),
                            what: format!(
                                "key {:?} of ConfigMap {namespace}/{}",
                                key.key, key.name
                            ),
                        });
                    }
                }
            } else if let Some(key) = &from.secret_key_ref {
                let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
                let secret = api
                    .get_opt(&key.name)
                    .await
                    .map_err(|source| EnvError::Api {
                        name: var.name.clone(),
                        what: format!("Secret {namespace}/{}", key.name),
                        source,
                    })?;
                let value = secret.and_then(|s| s.data).and_then(|d| {
                    d.get(&key.key)
                        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                });
                match value {
                    Some(v) => Some(v),
                    None if key.optional.unwrap_or(false) => None,
                    None => {
                        return Err(EnvError::Missing {
                            name: var.name.clone(),
                            what: format!("key {:?} of Secret {namespace}/{}", key.key, key.name),
                        });
                    }
                }
            } else {
                // resourceFieldRef and fileKeyRef: no resources to report here.
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            vars.insert(var.name.clone(), value);
        }
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_follows_the_kubelet_rules() {
        let vars: BTreeMap<String, String> =
            [("A".to_owned(), "1".to_owned())].into_iter().collect();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("cost $5", &vars), "cost $5");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn field_value_reads_metadata_and_status() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "x"}},
            "status": {"podIP": "10.213.0.2"}
        }))
        .unwrap();
        assert_eq!(field_value(&pod, "metadata.name").as_deref(), Some("p"));
        assert_eq!(
            field_value(&pod, "metadata.labels['app']").as_deref(),
            Some("x")
        );
        assert_eq!(
            field_value(&pod, "status.podIP").as_deref(),
            Some("10.213.0.2")
        );
        assert_eq!(field_value(&pod, "spec.bogus"), None);
    }
}
