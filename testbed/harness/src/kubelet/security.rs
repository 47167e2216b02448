//! The pod's and containers' `securityContext`, applied the way the kubelet and a container
//! runtime apply them:
//!
//! - the effective settings of a container (its own fields override the pod's);
//! - `runAsNonRoot`: a container whose effective uid is 0 is refused, with the kubelet's
//!   messages (reason `CreateContainerConfigError`);
//! - the process credentials: `runAsUser`, `runAsGroup` (else the user's primary group), and
//!   as supplementary groups the user's groups from `/etc/group` (the runtime's default
//!   `Merge` policy), `fsGroup` and `supplementalGroups`;
//! - `allowPrivilegeEscalation: false` → `no_new_privs`; `readOnlyRootFilesystem`;
//! - `fsGroup` on volumes: group ownership, group rw (r for read-only volumes) and setgid on
//!   directories, skipped with `fsGroupChangePolicy: OnRootMismatch` when the volume's root
//!   already has them (the kubelet's `SetVolumeOwnership`).
//!
//! There is no image: the host's `/etc/passwd` and `/etc/group` stand in for the image's, and
//! a container without `runAsUser` runs as root (the fake images have no `USER`). A uid
//! without a passwd entry is refused: programs such as PostgreSQL's `initdb` need the user's
//! name, which a real image provides.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};

/// Group read/write, added to every file of a read-write volume with `fsGroup`.
const RW_MASK: u32 = 0o660;
/// Group read, for read-only volumes (Secret, ConfigMap, …).
const RO_MASK: u32 = 0o440;
/// Owner and group search on directories.
const EXEC_MASK: u32 = 0o110;
const SETGID: u32 = 0o2000;

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "container has runAsNonRoot and image will run as root (pod: {pod:?}, container: {container}): \
         the test bed's images have no USER, so set runAsUser"
    )]
    ImageRunsAsRoot { pod: String, container: String },
    #[error("container's runAsUser breaks non-root policy (pod: {pod:?}, container: {container})")]
    RunAsUserIsRoot { pod: String, container: String },
    #[error("container {container}: {field} {value} is not a valid id")]
    InvalidId {
        container: String,
        field: &'static str,
        value: i64,
    },
    #[error(
        "container {container}: runAsUser {uid} has no entry in this host's /etc/passwd; the fake \
         kubelet runs containers on the host's filesystem in place of the image's, and programs such \
         as initdb need their user's name: create the user (scripts/setup-debian creates uid/gid 999 \
         with `useradd --system --uid 999`)"
    )]
    NoSuchUser { container: String, uid: u32 },
    #[error("container {container}: failed to look up uid {uid} in /etc/passwd and /etc/group")]
    Lookup {
        container: String,
        uid: u32,
        #[source]
        source: nix::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("the group is not a valid id")]
    InvalidGroup,
    #[error("failed to read {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to give {path} to group {group}")]
    Chown {
        path: PathBuf,
        group: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set the mode of {path} to {mode:o}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The identity a container process takes before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// What the sandbox enforces for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSecurity {
    /// `None`: nothing asked for, the process keeps the kubelet's identity (root).
    pub credentials: Option<Credentials>,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
    /// `readOnlyRootFilesystem: true`.
    pub read_only_root: bool,
}

/// A container's settings after merging the pod's (container fields win).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: bool,
    pub fs_group: Option<i64>,
    pub supplemental_groups: Vec<i64>,
    pub allow_privilege_escalation: bool,
    pub read_only_root: bool,
}

/// The effective settings of a container (the kubelet's `DetermineEffectiveSecurityContext`).
pub fn effective(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Effective {
    let pod = pod.cloned().unwrap_or_default();
    let container = container.cloned().unwrap_or_default();
    Effective {
        run_as_user: container.run_as_user.or(pod.run_as_user),
        run_as_group: container.run_as_group.or(pod.run_as_group),
        run_as_non_root: container
            .run_as_non_root
            .or(pod.run_as_non_root)
            .unwrap_or(false),
        fs_group: pod.fs_group,
        supplemental_groups: pod.supplemental_groups.unwrap_or_default(),
        allow_privilege_escalation: container.allow_privilege_escalation.unwrap_or(true),
        read_only_root: container.read_only_root_filesystem.unwrap_or(false),
    }
}

/// A user of the host's `/etc/passwd` (standing in for the image's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub gid: u32,
    /// Its groups from `/etc/group`, the primary one included.
    pub groups: Vec<u32>,
}

/// Looks `uid` up in the host's `/etc/passwd` and `/etc/group`.
pub fn host_user(uid: u32) -> Result<Option<User>, nix::Error> {
    let Some(user) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))? else {
        return Ok(None);
    };
    let name = CString::new(user.name).map_err(|_| nix::Error::EINVAL)?;
    let groups = nix::unistd::getgrouplist(&name, user.gid)?;
    Ok(Some(User {
        gid: user.gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    }))
}

/// Checks `runAsNonRoot` and works out the process identity. `pod` names the pod in
/// messages (`name_namespace(uid)`, as the kubelet does).
pub fn resolve(
    settings: &Effective,
    pod: &str,
    container: &str,
    lookup: impl Fn(u32) -> Result<Option<User>, nix::Error>,
) -> Result<ContainerSecurity, SecurityError> {
    if settings.run_as_non_root {
        match settings.run_as_user {
            Some(0) => {
                return Err(SecurityError::RunAsUserIsRoot {
                    pod: pod.to_owned(),
                    container: container.to_owned(),
                });
            }
            Some(_) => {}
            // The fake images have no USER: they run as root.
            None => {
                return Err(SecurityError::ImageRunsAsRoot {
                    pod: pod.to_owned(),
                    container: container.to_owned(),
                });
            }
        }
    }
    let id = |field: &'static str, value: i64| {
        u32::try_from(value).map_err(|_| SecurityError::InvalidId {
            container: container.to_owned(),
            field,
            value,
        })
    };
    let asked = settings.run_as_user.is_some()
        || settings.run_as_group.is_some()
        || settings.fs_group.is_some()
        || !settings.supplemental_groups.is_empty();
    let credentials = if asked {
        let uid = settings
            .run_as_user
            .map(|u| id("runAsUser", u))
            .transpose()?
            .unwrap_or(0);
        let user = lookup(uid)
            .map_err(|source| SecurityError::Lookup {
                container: container.to_owned(),
                uid,
                source,
            })?
            .ok_or_else(|| SecurityError::NoSuchUser {
                container: container.to_owned(),
                uid,
            })?;
        let gid = match settings.run_as_group {
            Some(g) => id("runAsGroup", g)?,
            None => user.gid,
        };
        let mut groups = user.groups;
        if let Some(group) = settings.fs_group {
            groups.push(id("fsGroup", group)?);
        }
        for group in &settings.supplemental_groups {
            groups.push(id("supplementalGroups", *group)?);
        }
        let mut seen = std::collections::BTreeSet::new();
        groups.retain(|g| seen.insert(*g));
        Some(Credentials { uid, gid, groups })
    } else {
        None
    };
    Ok(ContainerSecurity {
        credentials,
        no_new_privs: !settings.allow_privilege_escalation,
        read_only_root: settings.read_only_root,
    })
}

/// The identity of a running process (`Uid:`, `Gid:` and `Groups:` of `/proc/<pid>/status`,
/// real ids), for commands run inside its container (exec probes).
pub fn parse_proc_status(status: &str) -> Option<(Credentials, bool)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let first = |name: &str| field(name)?.split_whitespace().next()?.parse::<u32>().ok();
    let groups = field("Groups")?
        .split_whitespace()
        .map(str::parse::<u32>)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let no_new_privs = field("NoNewPrivs").is_some_and(|v| v == "1");
    Some((
        Credentials {
            uid: first("Uid")?,
            gid: first("Gid")?,
            groups,
        },
        no_new_privs,
    ))
}

/// Mode bits a volume file gets under `fsGroup`: its mode with group rw (r when read-only)
/// added, and for directories setgid and owner/group search.
pub fn fs_group_mode(mode: u32, is_dir: bool, read_only: bool) -> u32 {
    let mut mask = if read_only { RO_MASK } else { RW_MASK };
    if is_dir {
        mask |= SETGID | EXEC_MASK;
    }
    (mode & 0o7777) | mask
}

/// Whether a volume whose root has `mode` and `gid` needs its ownership changed
/// (`OnRootMismatch`: only when the root does not already have the group, the bits and, for a
/// directory, setgid).
pub fn root_mismatch(mode: u32, gid: u32, is_dir: bool, fs_group: u32, read_only: bool) -> bool {
    gid != fs_group || fs_group_mode(mode, is_dir, read_only) != mode & 0o7777
}

/// Gives a prepared volume directory to `fs_group` the way the kubelet does: every file and
/// directory (symlinks not followed) gets the group and [`fs_group_mode`]. With
/// `on_root_mismatch`, nothing is done when the root is already right.
pub fn set_volume_ownership(
    dir: &Path,
    fs_group: u32,
    read_only: bool,
    on_root_mismatch: bool,
) -> Result<(), OwnershipError> {
    let root = std::fs::metadata(dir).map_err(|source| OwnershipError::Stat {
        path: dir.to_owned(),
        source,
    })?;
    if on_root_mismatch
        && !root_mismatch(root.mode(), root.gid(), root.is_dir(), fs_group, read_only)
    {
        return Ok(());
    }
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|source| OwnershipError::Stat {
            path: path.clone(),
            source,
        })?;
        std::os::unix::fs::lchown(&path, None, Some(fs_group)).map_err(|source| {
            OwnershipError::Chown {
                path: path.clone(),
                group: fs_group,
                source,
            }
        })?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = fs_group_mode(meta.mode(), meta.is_dir(), read_only);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| OwnershipError::Chmod {
                path: path.clone(),
                mode,
                source,
            },
        )?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| OwnershipError::Stat {
                path: path.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| OwnershipError::Stat {
                    path: path.clone(),
                    source,
                })?;
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(gid: u32) -> impl Fn(u32) -> Result<Option<User>, nix::Error> {
        move |uid| {
            Ok((uid == 0 || uid == 999).then(|| User {
                gid: if uid == 0 { 0 } else { gid },
                groups: vec![if uid == 0 { 0 } else { gid }],
            }))
        }
    }

    fn pod_context() -> PodSecurityContext {
        PodSecurityContext {
            run_as_user: Some(999),
            run_as_group: Some(999),
            fs_group: Some(999),
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        }
    }

    #[test]
    fn container_fields_override_the_pods() {
        let container = SecurityContext {
            run_as_user: Some(1000),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        };
        let e = effective(Some(&pod_context()), Some(&container));
        assert_eq!(e.run_as_user, Some(1000));
        assert_eq!(e.run_as_group, Some(999));
        assert_eq!(e.fs_group, Some(999));
        assert!(e.run_as_non_root && e.read_only_root && !e.allow_privilege_escalation);
        let nothing = effective(None, None);
        assert_eq!(
            nothing,
            Effective {
                allow_privilege_escalation: true,
                ..Effective::default()
            }
        );
    }

    #[test]
    fn the_database_pod_runs_as_999_with_fs_group_and_no_new_privileges() {
        let container = SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        };
        let e = effective(Some(&pod_context()), Some(&container));
        let s = resolve(&e, "pg-0_ns(u)", "postgres", user(999)).unwrap();
        assert_eq!(
            s,
            ContainerSecurity {
                credentials: Some(Credentials {
                    uid: 999,
                    gid: 999,
                    groups: vec![999],
                }),
                no_new_privs: true,
                read_only_root: true,
            }
        );
    }

    #[test]
    fn groups_merge_the_users_fs_group_and_supplemental_groups() {
        let e = Effective {
            run_as_user: Some(999),
            fs_group: Some(2000),
            supplemental_groups: vec![3000, 2000],
            ..Effective::default()
        };
        let s = resolve(&e, "p", "c", user(50)).unwrap();
        // runAsGroup unset: the user's primary group.
        assert_eq!(
            s.credentials,
            Some(Credentials {
                uid: 999,
                gid: 50,
                groups: vec![50, 2000, 3000],
            })
        );
    }

    #[test]
    fn run_as_non_root_refuses_uid_0_and_the_images_root_with_the_kubelets_messages() {
        let root = Effective {
            run_as_user: Some(0),
            run_as_non_root: true,
            ..Effective::default()
        };
        let err = resolve(&root, "pg-0_ns(u)", "postgres", user(999)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "container's runAsUser breaks non-root policy (pod: \"pg-0_ns(u)\", container: postgres)"
        );
        let image = Effective {
            run_as_non_root: true,
            ..Effective::default()
        };
        let err = resolve(&image, "p", "c", user(999)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("container has runAsNonRoot and image will run as root"),
            "{err}"
        );
        // Without runAsNonRoot root is fine, and nothing asked keeps the kubelet's identity.
        let s = resolve(&Effective::default(), "p", "c", user(999)).unwrap();
        assert_eq!(s.credentials, None);
    }

    #[test]
    fn a_uid_without_a_passwd_entry_or_a_negative_id_is_refused() {
        let e = Effective {
            run_as_user: Some(4242),
            ..Effective::default()
        };
        let err = resolve(&e, "p", "c", user(999)).unwrap_err();
        assert!(
            matches!(err, SecurityError::NoSuchUser { uid: 4242, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("useradd --system --uid 999"),
            "{err}"
        );
        let e = Effective {
            run_as_user: Some(999),
            fs_group: Some(-1),
            ..Effective::default()
        };
        let err = resolve(&e, "p", "c", user(999)).unwrap_err();
        assert!(
            matches!(
                err,
                SecurityError::InvalidId {
                    field: "fsGroup",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn proc_status_gives_the_real_ids_groups_and_no_new_privs() {
        let status = "Name:\tpgrs\nUid:\t999\t999\t999\t999\nGid:\t998\t998\t998\t998\n\
                      Groups:\t998 999 \nNoNewPrivs:\t1\n";
        let (credentials, no_new_privs) = parse_proc_status(status).unwrap();
        assert_eq!(
            credentials,
            Credentials {
                uid: 999,
                gid: 998,
                groups: vec![998, 999],
            }
        );
        assert!(no_new_privs);
        let (root, nnp) = parse_proc_status("Uid:\t0 0 0 0\nGid:\t0 0 0 0\nGroups:\t\n").unwrap();
        assert!(root.groups.is_empty() && root.uid == 0 && !nnp);
    }

    #[test]
    fn fs_group_adds_group_bits_and_setgid_like_the_kubelet() {
        assert_eq!(fs_group_mode(0o755, true, false), 0o2775);
        assert_eq!(fs_group_mode(0o777, true, false), 0o2777);
        assert_eq!(fs_group_mode(0o600, false, false), 0o660);
        assert_eq!(fs_group_mode(0o440, false, true), 0o440);
        assert_eq!(fs_group_mode(0o400, false, true), 0o440);
        assert!(root_mismatch(0o40755, 0, true, 999, false));
        assert!(root_mismatch(0o40775, 999, true, 999, false), "no setgid");
        assert!(!root_mismatch(0o42775, 999, true, 999, false));
        assert!(root_mismatch(0o42775, 998, true, 999, false));
    }

    #[test]
    fn volume_ownership_walks_the_tree_unless_the_root_already_matches() {
        let dir = tempfile::tempdir().unwrap();
        let group = nix::unistd::Gid::effective().as_raw();
        let root = dir.path().join("vol");
        std::fs::create_dir_all(root.join("pgdata")).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("pgdata/file"), "x").unwrap();
        std::fs::set_permissions(
            root.join("pgdata/file"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(root.join("pgdata"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        set_volume_ownership(&root, group, false, true).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&root), 0o2775);
        assert_eq!(mode(&root.join("pgdata")), 0o2770);
        assert_eq!(mode(&root.join("pgdata/file")), 0o660);
        // The root matches now: OnRootMismatch leaves what the program set since.
        std::fs::set_permissions(root.join("pgdata"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        set_volume_ownership(&root, group, false, true).unwrap();
        assert_eq!(mode(&root.join("pgdata")), 0o700);
        // Always walks again.
        set_volume_ownership(&root, group, false, false).unwrap();
        assert_eq!(mode(&root.join("pgdata")), 0o2770);
    }
}
