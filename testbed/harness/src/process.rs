//! Child processes the harness owns: each in its own process group, output in a log
//! file, stopped with SIGTERM to the group, then SIGKILL.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("failed to create the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start {name} ({program})")]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Makes a child die with the harness even when the harness is SIGKILLed, so a crashed
/// test run leaves no control plane behind. Runs between fork and exec.
///
/// # Safety
/// Only calls the async-signal-safe `prctl`.
pub fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A long-running component (etcd, kube-apiserver, ...).
#[derive(Debug)]
pub struct Component {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Component {
    /// Starts `program args` with stdout and stderr appended to `<log_dir>/<name>.log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Self, ProcessError> {
        let log = log_dir.join(format!("{name}.log"));
        let open_log = || {
            File::options()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|source| ProcessError::Log {
                    path: log.clone(),
                    source,
                })
        };
        let stdout = open_log()?;
        let stderr = open_log()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // SAFETY: die_with_parent only calls prctl.
        unsafe {
            command.pre_exec(die_with_parent);
        }
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_owned(),
            program: program.to_owned(),
            source,
        })?;
        tracing::debug!(component = name, pid = child.id(), "started");
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// True while the process has been started, not stopped, and not exited.
    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The last `lines` lines of the component's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// SIGTERM to the process group, up to `grace` to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        stop_group(&mut child, grace);
        tracing::debug!(component = %self.name, "stopped");
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Stops a child that leads its own process group.
fn stop_group(child: &mut Child, grace: Duration) {
    let Ok(raw) = i32::try_from(child.id()) else {
        return;
    };
    let group = Pid::from_raw(raw);
    // Errors mean the group is already gone.
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The leader may have exited while others in its group still run.
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// True while `pid` exists and is not a zombie (an unreaped zombie cannot run).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_ends_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        // The shell ignores SIGTERM, so only the SIGKILL after the grace period ends it;
        // its background child must die with it.
        let args = vec![
            "-c".to_owned(),
            "trap '' TERM; sleep 1000 & echo child $!; wait".to_owned(),
        ];
        let mut sh = Component::start("sh", Path::new("/bin/sh"), &args, dir.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let child_pid = loop {
            let log = sh.log_tail(5);
            if let Some(pid) = log.strip_prefix("child ") {
                break pid.trim().parse::<i32>().unwrap();
            }
            assert!(Instant::now() < deadline, "no child pid in log: {log}");
            std::thread::sleep(Duration::from_millis(20));
        };
        sh.stop(Duration::from_millis(200));
        assert!(sh.exited().is_none(), "child handle is released after stop");
        // The sleep was reparented and reaped by init; give it a moment.
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !process_alive(child_pid)
        });
        assert!(gone, "background child {child_pid} survived the group kill");
    }

    #[test]
    fn tail_file_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail_file(&path, 2), "c\nd");
        assert_eq!(tail_file(&path, 10), "a\nb\nc\nd");
    }
}
