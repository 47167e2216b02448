//! Pod volumes as host directories, bind-mounted into the pod's mount namespace.
//!
//! - persistentVolumeClaim: `<state>/pvc/<namespace>/<claim>`, kept across pod
//!   deletion (a StatefulSet pod that comes back finds its data);
//! - emptyDir: a directory of the pod, removed with the pod;
//! - configMap, secret, projected (serviceAccountToken, configMap, secret,
//!   downwardAPI) and downwardAPI: files written once at pod start, with their `mode` or the
//!   volume's `defaultMode` (0644 when unset).
//!
//! An emptyDir is created world-writable (0777) as by the kubelet. With the pod's `fsGroup`,
//! every volume is then given to that group (see `security::set_volume_ownership`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::Api;

use super::sandbox::Bind;
use super::security::{OwnershipError, set_volume_ownership};

/// Mode of a file of a ConfigMap/Secret/downwardAPI/projected volume without one.
const DEFAULT_FILE_MODE: i32 = 0o644;
/// Mode of an emptyDir, as the kubelet creates it.
const EMPTY_DIR_MODE: u32 = 0o777;

/// A file of a ConfigMap, Secret, downwardAPI or projected volume: path in the volume,
/// contents, and its own `mode` if the item has one.
type VolumeFile = (String, Vec<u8>, Option<i32>);

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume:?}: {kind} volumes are not supported by the fake kubelet")]
    Unsupported { volume: String, kind: &'static str },
    #[error("volume mount {mount:?} names no volume of the pod")]
    NoSuchVolume { mount: String },
    #[error("volume {volume:?}: failed to read {what}")]
    Api {
        volume: String,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("volume {volume:?}: {what} does not exist")]
    Missing { volume: String, what: String },
    #[error("volume {volume:?}: field {field:?} is not supported in downwardAPI")]
    Field { volume: String, field: String },
    #[error("volume {volume:?}: failed to write {path}")]
    Write {
        volume: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume:?}: failed to apply fsGroup {group}")]
    Ownership {
        volume: String,
        group: i64,
        #[source]
        source: OwnershipError,
    },
}

/// Host directories of a pod's volumes, by volume name.
#[derive(Debug, Default)]
pub struct PodVolumes {
    dirs: BTreeMap<String, PathBuf>,
}

impl PodVolumes {
    /// Bind mounts for a container's volumeMounts.
    pub fn binds(
        &self,
        mounts: &[k8s_openapi::api::core::v1::VolumeMount],
    ) -> Result<Vec<Bind>, VolumeError> {
        mounts
            .iter()
            .map(|m| {
                let dir = self
                    .dirs
                    .get(&m.name)
                    .ok_or_else(|| VolumeError::NoSuchVolume {
                        mount: m.name.clone(),
                    })?;
                let source = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => dir.join(sub),
                    _ => dir.clone(),
                };
                Ok(Bind {
                    source,
                    target: PathBuf::from(&m.mount_path),
                    read_only: m.read_only.unwrap_or(false),
                })
            })
            .collect()
    }
}

/// Directory of a PersistentVolumeClaim's data; survives the pods that use it.
pub fn claim_dir(state: &Path, namespace: &str, claim: &str) -> PathBuf {
    state.join("pvc").join(namespace).join(claim)
}

/// Prepares every volume of `pod` under `pod_dir` (and PVCs under `state`).
pub async fn prepare(
    client: &kube::Client,
    pod: &Pod,
    pod_dir: &Path,
    state: &Path,
) -> Result<PodVolumes, VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let security = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let fs_group = security.and_then(|s| s.fs_group);
    let on_root_mismatch = security
        .and_then(|s| s.fs_group_change_policy.as_deref())
        .is_some_and(|p| p == "OnRootMismatch");
    let mut volumes = PodVolumes::default();
    let empty = Vec::new();
    let spec_volumes: &Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .unwrap_or(&empty);
    for volume in spec_volumes {
        let name = volume.name.clone();
        let dir = if let Some(pvc) = &volume.persistent_volume_claim {
            claim_dir(state, &namespace, &pvc.claim_name)
        } else {
            pod_dir.join("volumes").join(&name)
        };
        mkdir(&name, &dir)?;
        let mut files: Vec<VolumeFile> = Vec::new();
        // Only claims and emptyDirs are writable volumes.
        let mut read_only = true;
        let mut default_mode = None;
        if let Some(pvc) = &volume.persistent_volume_claim {
            read_only = pvc.read_only.unwrap_or(false);
        } else if volume.empty_dir.is_some() {
            read_only = false;
            set_mode(&name, &dir, EMPTY_DIR_MODE)?;
        } else if let Some(cm) = &volume.config_map {
            default_mode = cm.default_mode;
            files = config_map_files(
                client,
                &namespace,
                &name,
                &cm.name,
                cm.items.as_deref(),
                cm.optional,
            )
            .await?;
        } else if let Some(secret) = &volume.secret {
            default_mode = secret.default_mode;
            let secret_name = secret.secret_name.clone().unwrap_or_default();
            files = secret_files(
                client,
                &namespace,
                &name,
                &secret_name,
                secret.items.as_deref(),
                secret.optional,
            )
            .await?;
        } else if let Some(downward) = &volume.downward_api {
            default_mode = downward.default_mode;
            files = downward_files(pod, &name, downward.items.as_deref())?;
        } else if let Some(projected) = &volume.projected {
            default_mode = projected.default_mode;
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let jwt = service_account_token(
                        client,
                        pod,
                        &name,
                        token.audience.clone(),
                        token.expiration_seconds,
                    )
                    .await?;
                    files.push((token.path.clone(), jwt.into_bytes(), None));
                }
                if let Some(cm) = &source.config_map {
                    files.extend(
                        config_map_files(
                            client,
                            &namespace,
                            &name,
                            &cm.name,
                            cm.items.as_deref(),
                            cm.optional,
                        )
                        .await?,
                    );
                }
                if let Some(secret) = &source.secret {
                    files.extend(
                        secret_files(
                            client,
                            &namespace,
                            &name,
                            &secret.name,
                            secret.items.as_deref(),
                            secret.optional,
                        )
                        .await?,
                    );
                }
                if let Some(downward) = &source.downward_api {
                    files.extend(downward_files(pod, &name, downward.items.as_deref())?);
                }
            }
        } else {
            return Err(VolumeError::Unsupported {
                volume: name,
                kind: unsupported_kind(volume),
            });
        }
        for (path, contents, mode) in files {
            let file = dir.join(&path);
            if let Some(parent) = file.parent() {
                mkdir(&name, parent)?;
            }
            std::fs::write(&file, contents).map_err(|source| VolumeError::Write {
                volume: name.clone(),
                path: file.clone(),
                source,
            })?;
            let mode = mode.or(default_mode).unwrap_or(DEFAULT_FILE_MODE);
            set_mode(&name, &file, u32::try_from(mode & 0o777).unwrap_or(0o644))?;
        }
        if let Some(group) = fs_group {
            let ownership = u32::try_from(group).map_err(|_| OwnershipError::InvalidGroup);
            ownership
                .and_then(|g| set_volume_ownership(&dir, g, read_only, on_root_mismatch))
                .map_err(|source| VolumeError::Ownership {
                    volume: name.clone(),
                    group,
                    source,
                })?;
        }
        volumes.dirs.insert(name, dir);
    }
    Ok(volumes)
}

fn unsupported_kind(volume: &Volume) -> &'static str {
    if volume.host_path.is_some() {
        "hostPath"
    } else if volume.ephemeral.is_some() {
        "ephemeral"
    } else if volume.csi.is_some() {
        "csi"
    } else if volume.image.is_some() {
        "image"
    } else {
        "this kind of"
    }
}

fn set_mode(volume: &str, path: &Path, mode: u32) -> Result<(), VolumeError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        VolumeError::Write {
            volume: volume.to_owned(),
            path: path.to_owned(),
            source,
        }
    })
}

fn mkdir(volume: &str, dir: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(|source| VolumeError::Write {
        volume: volume.to_owned(),
        path: dir.to_owned(),
        source,
    })
}

/// Selected keys (`items`, with their modes) or all keys of a map.
fn select(data: BTreeMap<String, Vec<u8>>, items: Option<&[KeyToPath]>) -> Vec<VolumeFile> {
    match items {
        Some(items) => items
            .iter()
            .filter_map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone(), i.mode))
            })
            .collect(),
        None => data.into_iter().map(|(k, v)| (k, v, None)).collect(),
    }
}

async fn config_map_files(
    client: &kube::Client,
    namespace: &str,
    volume: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
) -> Result<Vec<VolumeFile>, VolumeError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_owned(),
        what: format!("ConfigMap {namespace}/{name}"),
        source,
    })?;
    let Some(cm) = cm else {
        return missing(volume, "ConfigMap", namespace, name, optional);
    };
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    Ok(select(data, items))
}

async fn secret_files(
    client: &kube::Client,
    namespace: &str,
    volume: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
) -> Result<Vec<VolumeFile>, VolumeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_owned(),
        what: format!("Secret {namespace}/{name}"),
        source,
    })?;
    let Some(secret) = secret else {
        return missing(volume, "Secret", namespace, name, optional);
    };
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    data.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    Ok(select(data, items))
}

fn missing(
    volume: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<Vec<VolumeFile>, VolumeError> {
    if optional.unwrap_or(false) {
        Ok(Vec::new())
    } else {
        Err(VolumeError::Missing {
            volume: volume.to_owned(),
            what: format!("{kind} {namespace}/{name}"),
        })
    }
}

fn downward_files(
    pod: &Pod,
    volume: &str,
    items: Option<&[DownwardAPIVolumeFile]>,
) -> Result<Vec<VolumeFile>, VolumeError> {
    items
        .unwrap_or_default()
        .iter()
        .filter_map(|item| item.field_ref.as_ref().map(|f| (item, f)))
        .map(|(item, field)| {
            super::env::field_value(pod, &field.field_path)
                .map(|v| (item.path.clone(), v.into_bytes(), item.mode))
                .ok_or_else(|| VolumeError::Field {
                    volume: volume.to_owned(),
                    field: field.field_path.clone(),
                })
        })
        .collect()
}

/// A token bound to the pod, minted through the TokenRequest API like the kubelet does.
pub async fn service_account_token(
    client: &kube::Client,
    pod: &Pod,
    volume: &str,
    audience: Option<String>,
    expiration_seconds: Option<i64>,
) -> Result<String, VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    // Built from JSON: the optional fields of TokenRequestSpec differ between API versions.
    let mut spec = serde_json::json!({
        "expirationSeconds": expiration_seconds.unwrap_or(3607).max(3600),
        "boundObjectRef": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        },
    });
    if let Some(audience) = audience {
        spec["audiences"] = serde_json::json!([audience]);
    }
    let request: TokenRequest = serde_json::from_value(serde_json::json!({ "spec": spec }))
        .map_err(|e| VolumeError::Api {
            volume: volume.to_owned(),
            what: "a TokenRequest".to_owned(),
            source: kube::Error::SerdeError(e),
        })?;
    let response = api
        .create_token_request(&account, &Default::default(), &request)
        .await
        .map_err(|source| VolumeError::Api {
            volume: volume.to_owned(),
            what: format!("a token for ServiceAccount {namespace}/{account}"),
            source,
        })?;
    Ok(response.status.and_then(|s| s.token).unwrap_or_default())
}
