//! What `RealNode::stop` does after the kubelet: kill the CRI's tasks, the shims containerd
//! leaves, and unmount what they left under the node's directory.

use std::path::{Path, PathBuf};

use super::{NodeBinaries, ctr, run};

/// SIGKILLs and deletes every task (pod sandboxes and containers) of the CRI's namespace.
pub(super) fn kill_all_tasks(binaries: &NodeBinaries, socket: &Path) {
    let mut list = ctr(binaries, socket);
    list.args(["tasks", "ls", "--quiet"]);
    let Ok(ids) = run(list) else { return };
    for id in ids.lines().map(str::trim).filter(|id| !id.is_empty()) {
        let mut kill = ctr(binaries, socket);
        kill.args(["tasks", "kill", "--all", "--signal=SIGKILL", id]);
        let _ = run(kill);
    }
    for id in ids.lines().map(str::trim).filter(|id| !id.is_empty()) {
        let mut delete = ctr(binaries, socket);
        delete.args(["tasks", "delete", "--force", id]);
        let _ = run(delete);
    }
}

/// runc shims outlive containerd: SIGKILL those of this node's containerd (their command
/// line names its socket).
pub(super) fn kill_leftover_shims(socket: &Path) {
    let socket = socket.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("containerd-shim-runc-v2") && cmdline.contains(&socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
pub(super) fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}
