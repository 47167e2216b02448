//! Running a pod's process "inside the pod": its own network namespace (the pod IP),
//! a private mount namespace holding the pod's volume mounts, its own hostname, and the
//! identity and restrictions of its securityContext (see `security.rs`).
//!
//! Inside the mount namespace the volumes are bind-mounted at their mountPaths, sorted so
//! that a parent path is mounted before the paths below it (as container runtimes do). The
//! sources are opened (`O_PATH`, in the new mount namespace, before anything is mounted: a
//! bind source must belong to the caller's namespace) and mounted through
//! `/proc/self/fd/<n>`, so a volume mounted over a directory that holds the kubelet's state
//! (an emptyDir at `/tmp`) hides nothing the later mounts need. The container's program, a file of the host
//! standing in for the image's, is bind-mounted back read-only at its own path when a
//! volume covers it (a cargo target directory under `/tmp`). Then, with
//! `readOnlyRootFilesystem`, `/` is remounted read-only in that namespace only; the volume
//! mounts stay as they are.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::security::{ContainerSecurity, Credentials, parse_proc_status};
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
    #[error("failed to read the flags of the root filesystem")]
    RootFlags(#[source] nix::Error),
    #[error("failed to read the identity of process {pid} from {path}")]
    ProcStatus {
        pid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no Uid/Gid/Groups lines")]
    ProcStatusFormat { path: PathBuf },
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
        /// Host files (the image's program) that must stay visible at their own paths.
        keep_visible: Vec<PathBuf>,
        security: ContainerSecurity,
    },
    /// Inside the namespaces of a running container process, with its identity (exec
    /// probes).
    Join { pid: u32 },
}

/// Room for `/proc/self/fd/<n>` and its NUL.
const FD_PATH_LEN: usize = 32;

/// A bind mount ready for the child, which opens `source` and mounts it through
/// `fd_path` (`/proc/self/fd/<n>`, written in place: no allocation after fork).
struct PreparedBind {
    source: CString,
    target: CString,
    read_only: bool,
    fd_path: [u8; FD_PATH_LEN],
}

/// Everything the pre-exec hook needs, allocated before fork.
struct Prepared {
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    new_mount_and_uts: bool,
    hostname: Vec<u8>,
    binds: Vec<PreparedBind>,
    /// `MS_*` flags of `/` to keep when remounting it read-only; `None`: leave it writable.
    read_only_root: Option<libc::c_ulong>,
    workdir: Option<CString>,
    credentials: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    no_new_privs: bool,
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
fn ensure_mount_point(source: &Path, target: &Path) -> Result<(), SandboxError> {
    if target.exists() {
        return Ok(());
    }
    let result = if source.is_dir() {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|()| File::create(target).map(|_| ()))
    };
    result.map_err(|source| SandboxError::MountPoint {
        path: target.to_owned(),
        source,
    })
}

/// The binds in mount order: parents before the paths below them (stable otherwise).
pub fn mount_order(binds: &[Bind]) -> Vec<Bind> {
    let mut sorted = binds.to_vec();
    sorted.sort_by_key(|b| b.target.components().count());
    sorted
}

/// Where `path` lands once `binds` (in mount order) are mounted: the host path under the
/// source of the deepest bind covering it, or `None` when no bind covers it.
pub fn covered_by(binds: &[Bind], path: &Path) -> Option<PathBuf> {
    binds
        .iter()
        .filter_map(|b| Some(b.source.join(path.strip_prefix(&b.target).ok()?)))
        .next_back()
}

fn prepare_bind(
    source: &Path,
    target: &Path,
    read_only: bool,
) -> Result<PreparedBind, SandboxError> {
    Ok(PreparedBind {
        source: cstring(source)?,
        target: cstring(target)?,
        read_only,
        fd_path: [0; FD_PATH_LEN],
    })
}

/// Writes `/proc/self/fd/<fd>` and a NUL into `buffer` (async-signal-safe: no allocation).
fn write_fd_path(buffer: &mut [u8; FD_PATH_LEN], fd: libc::c_int) {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buffer[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 12];
    let mut count = 0;
    let mut n = fd.unsigned_abs();
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        buffer[PREFIX.len() + i] = digits[count - 1 - i];
    }
    buffer[PREFIX.len() + count] = 0;
}

/// The `MS_*` flags of the mount at `/` that a bind remount must repeat.
fn root_mount_flags() -> Result<libc::c_ulong, SandboxError> {
    use nix::sys::statvfs::FsFlags;
    let flags = nix::sys::statvfs::statvfs("/")
        .map_err(SandboxError::RootFlags)?
        .flags();
    let pairs = [
        (FsFlags::ST_NOSUID, libc::MS_NOSUID),
        (FsFlags::ST_NODEV, libc::MS_NODEV),
        (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
        (FsFlags::ST_NOATIME, libc::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st, _)| flags.contains(*st))
        .fold(0, |acc, (_, ms)| acc | ms))
}

fn credentials(c: &Credentials) -> (libc::uid_t, libc::gid_t, Vec<libc::gid_t>) {
    (c.uid, c.gid, c.groups.clone())
}

impl Sandbox {
    fn prepare(&self) -> Result<Prepared, SandboxError> {
        match self {
            Sandbox::Container {
                netns,
                hostname,
                binds,
                workdir,
                keep_visible,
                security,
            } => {
                let ordered = mount_order(binds);
                let mut prepared = Vec::new();
                for bind in &ordered {
                    ensure_mount_point(&bind.source, &bind.target)?;
                    prepared.push(prepare_bind(&bind.source, &bind.target, bind.read_only)?);
                }
                for file in keep_visible {
                    // The mount point lives in the covering volume, on the host's side of it.
                    if let Some(point) = covered_by(&ordered, file) {
                        ensure_mount_point(file, &point)?;
                        prepared.push(prepare_bind(file, file, true)?);
                    }
                }
                Ok(Prepared {
                    namespaces: vec![(open_ns(netns)?, libc::CLONE_NEWNET)],
                    new_mount_and_uts: true,
                    hostname: hostname.as_bytes().to_vec(),
                    binds: prepared,
                    read_only_root: security.read_only_root.then(root_mount_flags).transpose()?,
                    workdir: workdir.as_deref().map(cstring).transpose()?,
                    credentials: security.credentials.as_ref().map(credentials),
                    no_new_privs: security.no_new_privs,
                })
            }
            Sandbox::Join { pid } => {
                let ns = |kind: &str| PathBuf::from(format!("/proc/{pid}/ns/{kind}"));
                let status_path = PathBuf::from(format!("/proc/{pid}/status"));
                let status = std::fs::read_to_string(&status_path).map_err(|source| {
                    SandboxError::ProcStatus {
                        pid: *pid,
                        path: status_path.clone(),
                        source,
                    }
                })?;
                let (identity, no_new_privs) = parse_proc_status(&status)
                    .ok_or(SandboxError::ProcStatusFormat { path: status_path })?;
                Ok(Prepared {
                    namespaces: vec![
                        (open_ns(&ns("net"))?, libc::CLONE_NEWNET),
                        (open_ns(&ns("uts"))?, libc::CLONE_NEWUTS),
                        (open_ns(&ns("mnt"))?, libc::CLONE_NEWNS),
                    ],
                    new_mount_and_uts: false,
                    hostname: Vec::new(),
                    binds: Vec::new(),
                    read_only_root: None,
                    workdir: None,
                    credentials: Some(credentials(&identity)),
                    no_new_privs,
                })
            }
        }
    }

    /// Makes `command` enter this sandbox between fork and exec (and die with the
    /// harness, and lead its own process group).
    pub fn apply(&self, command: &mut tokio::process::Command) -> Result<(), SandboxError> {
        let mut prepared = self.prepare()?;
        command.process_group(0);
        // SAFETY: the hook only makes raw syscalls on memory prepared before fork
        // (no allocation, no locks), which is async-signal-safe.
        unsafe {
            command.pre_exec(move || enter(&mut prepared));
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
fn enter(p: &mut Prepared) -> std::io::Result<()> {
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
            // Every source is opened before the first mount, which may cover the others.
            for bind in &mut p.binds {
                let fd = libc::open(bind.source.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                write_fd_path(&mut bind.fd_path, fd);
            }
            for bind in &p.binds {
                check(libc::mount(
                    bind.fd_path.as_ptr().cast(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if bind.read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        bind.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
            // Only the mount at `/` itself: the volumes (and /proc, /dev, /dev/shm) keep
            // their own flags.
            if let Some(flags) = p.read_only_root {
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                    std::ptr::null(),
                ))?;
            }
        }
        if let Some(dir) = &p.workdir {
            check(libc::chdir(dir.as_ptr()))?;
        }
        if p.no_new_privs {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        // Drop privileges last: entering namespaces and mounting need root.
        if let Some((uid, gid, groups)) = &p.credentials {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(*gid))?;
            check(libc::setuid(*uid))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(source: &str, target: &str) -> Bind {
        Bind {
            source: PathBuf::from(source),
            target: PathBuf::from(target),
            read_only: false,
        }
    }

    #[test]
    fn fd_paths_are_written_without_allocating() {
        let mut buffer = [0xffu8; FD_PATH_LEN];
        write_fd_path(&mut buffer, 1047);
        let end = buffer.iter().position(|b| *b == 0).unwrap();
        assert_eq!(&buffer[..end], b"/proc/self/fd/1047");
        write_fd_path(&mut buffer, 0);
        let end = buffer.iter().position(|b| *b == 0).unwrap();
        assert_eq!(&buffer[..end], b"/proc/self/fd/0");
    }

    #[test]
    fn parents_are_mounted_before_the_paths_below_them() {
        let binds = [
            bind("/s/a", "/tmp/x/y"),
            bind("/s/b", "/tmp"),
            bind("/s/c", "/etc/c"),
        ];
        let order: Vec<PathBuf> = mount_order(&binds).into_iter().map(|b| b.target).collect();
        assert_eq!(
            order,
            [PathBuf::from("/tmp"), "/etc/c".into(), "/tmp/x/y".into()]
        );
    }

    #[test]
    fn a_program_under_a_volume_lands_in_the_deepest_covering_source() {
        let binds = mount_order(&[
            bind("/state/tmp", "/tmp"),
            bind("/state/cache", "/tmp/cache"),
        ]);
        assert_eq!(
            covered_by(&binds, Path::new("/tmp/ci/target/debug/pgrs")),
            Some(PathBuf::from("/state/tmp/ci/target/debug/pgrs"))
        );
        assert_eq!(
            covered_by(&binds, Path::new("/tmp/cache/bin")),
            Some(PathBuf::from("/state/cache/bin"))
        );
        assert_eq!(
            covered_by(&binds, Path::new("/work/target/debug/pgrs")),
            None
        );
        // A path component, not a string prefix.
        assert_eq!(covered_by(&binds, Path::new("/tmpfoo/pgrs")), None);
    }
}
