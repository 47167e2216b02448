//! Running a pod's process "inside the pod": its own network namespace (the pod IP),
//! a private mount namespace holding the pod's volume mounts, and its own hostname.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::process::die_with_parent;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("failed to open namespace {path}")]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the mount point {path}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {path} contains a NUL byte")]
    Nul { path: String },
}

/// A bind mount of a prepared volume directory at a container's mountPath.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Where a process runs.
#[derive(Debug, Clone)]
pub enum Sandbox {
    /// A new container of the pod whose network namespace is `netns`.
    Container {
        netns: PathBuf,
        hostname: String,
        binds: Vec<Bind>,
        workdir: Option<PathBuf>,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// Inside the namespaces of a running container process (exec probes).
    Join { pid: u32 },
}

/// Everything the pre-exec hook needs, allocated before fork.
struct Prepared {
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    new_mount_and_uts: bool,
    hostname: Vec<u8>,
    binds: Vec<(CString, CString, bool)>,
    workdir: Option<CString>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn open_ns(path: &Path) -> Result<OwnedFd, SandboxError> {
    File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| SandboxError::OpenNamespace {
            path: path.to_owned(),
            source,
        })
}

fn cstring(path: &Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SandboxError::Nul {
        path: path.display().to_string(),
    })
}

/// Creates a missing mount point the way a container runtime would inside the image.
/// The (empty) directory or file is created on the host filesystem; the bind mount
/// itself is only visible inside the pod's mount namespace.
fn ensure_mount_point(bind: &Bind) -> Result<(), SandboxError> {
    if bind.target.exists() {
        return Ok(());
    }
    let result = if bind.source.is_dir() {
        std::fs::create_dir_all(&bind.target)
    } else {
        bind.target
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|()| File::create(&bind.target).map(|_| ()))
    };
    result.map_err(|source| SandboxError::MountPoint {
        path: bind.target.clone(),
        source,
    })
}

impl Sandbox {
    fn prepare(&self) -> Result<Prepared, SandboxError> {
        match self {
            Sandbox::Container {
                netns,
                hostname,
                binds,
                workdir,
                uid,
                gid,
            } => {
                for bind in binds {
                    ensure_mount_point(bind)?;
                }
                Ok(Prepared {
                    namespaces: vec![(open_ns(netns)?, libc::CLONE_NEWNET)],
                    new_mount_and_uts: true,
                    hostname: hostname.as_bytes().to_vec(),
                    binds: binds
                        .iter()
                        .map(|b| Ok((cstring(&b.source)?, cstring(&b.target)?, b.read_only)))
                        .collect::<Result<_, SandboxError>>()?,
                    workdir: workdir.as_deref().map(cstring).transpose()?,
                    uid: *uid,
                    gid: *gid,
                })
            }
            Sandbox::Join { pid } => {
                let ns = |kind: &str| PathBuf::from(format!("/proc/{pid}/ns/{kind}"));
                Ok(Prepared {
                    namespaces: vec![
                        (open_ns(&ns("net"))?, libc::CLONE_NEWNET),
                        (open_ns(&ns("uts"))?, libc::CLONE_NEWUTS),
                        (open_ns(&ns("mnt"))?, libc::CLONE_NEWNS),
                    ],
                    new_mount_and_uts: false,
                    hostname: Vec::new(),
                    binds: Vec::new(),
                    workdir: None,
                    uid: None,
                    gid: None,
                })
            }
        }
    }

    /// Makes `command` enter this sandbox between fork and exec (and die with the
    /// harness, and lead its own process group).
    pub fn apply(&self, command: &mut tokio::process::Command) -> Result<(), SandboxError> {
        let prepared = self.prepare()?;
        command.process_group(0);
        // SAFETY: the hook only makes raw syscalls on memory prepared before fork
        // (no allocation, no locks), which is async-signal-safe.
        unsafe {
            command.pre_exec(move || enter(&prepared));
        }
        Ok(())
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs in the forked child: raw syscalls only.
fn enter(p: &Prepared) -> std::io::Result<()> {
    die_with_parent()?;
    // SAFETY: plain syscalls on fds and C strings owned by `p`, alive until exec.
    unsafe {
        for (fd, kind) in &p.namespaces {
            check(libc::setns(fd.as_raw_fd(), *kind))?;
        }
        if p.new_mount_and_uts {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
            // Keep our mounts out of the host's mount namespace.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            if !p.hostname.is_empty() {
                check(libc::sethostname(
                    p.hostname.as_ptr().cast(),
                    p.hostname.len(),
                ))?;
            }
            for (source, target, read_only) in &p.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if *read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
        }
        if let Some(dir) = &p.workdir {
            check(libc::chdir(dir.as_ptr()))?;
        }
        // Drop privileges last: entering namespaces and mounting need root.
        if let Some(gid) = p.gid {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
        }
        if let Some(uid) = p.uid {
            check(libc::setuid(uid))?;
        }
    }
    Ok(())
}
