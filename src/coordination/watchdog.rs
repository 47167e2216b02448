//! The fencing watchdog: a dead man's switch in its own process.
//!
//! The lease keeper runs inside the agent; a frozen agent (SIGSTOP, a stalled VM, a swap storm)
//! can neither renew nor fence, while its postgres keeps accepting writes. So the agent also
//! starts a small watchdog process and, after every successful renewal, tells it how long postgres
//! may still run ("arm <ms>"). When that time passes without a new "arm", the watchdog sends
//! SIGQUIT (immediate shutdown) to the postmaster, then SIGKILL if it lingers. "disarm" when the
//! instance stops being primary. If the agent dies, the last deadline still holds.
//!
//! The watchdog's deadline is computed when a line arrives, so it can only be later than the
//! keeper's by the pipe latency; the shutdown budget in the lease timings covers it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::time::Instant;

use super::clock::FenceInstant;
use super::keeper::LeaseKeeper;

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("failed to start the fencing watchdog {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the fencing watchdog has no stdin pipe")]
    NoPipe,
}

/// A command line for the watchdog: the `pgrs` binary and its arguments before `--data-dir`.
#[derive(Debug, Clone)]
pub struct WatchdogCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl WatchdogCommand {
    /// `<this executable> local fence-watchdog`.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(WatchdogCommand {
            program: std::env::current_exe()?,
            args: vec!["local".to_string(), "fence-watchdog".to_string()],
        })
    }
}

/// Delay before a watchdog that exited is started again.
const RESPAWN_DELAY: Duration = Duration::from_millis(500);

fn start(
    command: &WatchdogCommand,
    data_dir: &Path,
) -> Result<(tokio::process::Child, tokio::process::ChildStdin), WatchdogError> {
    let mut child = tokio::process::Command::new(&command.program)
        .args(&command.args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Its own process group: signals aimed at the agent's group must not reach it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| WatchdogError::Spawn {
            program: command.program.display().to_string(),
            source,
        })?;
    let stdin = child.stdin.take().ok_or(WatchdogError::NoPipe)?;
    Ok((child, stdin))
}

/// Why feeding a watchdog ended.
enum Fed {
    /// The watchdog exited (or its pipe broke): start another.
    WatchdogGone,
    /// The keeper is gone: stop.
    KeeperGone,
}

/// Feeds the keeper's deadline to one watchdog process until it exits or the keeper is gone.
async fn feed(
    child: &mut tokio::process::Child,
    stdin: &mut tokio::process::ChildStdin,
    deadlines: &mut watch::Receiver<Option<FenceInstant>>,
) -> Fed {
    loop {
        let line = match *deadlines.borrow_and_update() {
            Some(deadline) => format!("arm {}\n", deadline.remaining().as_millis()),
            None => "disarm\n".to_string(),
        };
        if let Err(error) = stdin.write_all(line.as_bytes()).await {
            tracing::error!(%error, "failed to feed the fencing watchdog");
            return Fed::WatchdogGone;
        }
        let _ = stdin.flush().await;
        tokio::select! {
            status = child.wait() => {
                tracing::error!(?status, "the fencing watchdog exited");
                return Fed::WatchdogGone;
            }
            changed = deadlines.changed() => if changed.is_err() {
                return Fed::KeeperGone;
            },
            // A missed SIGCHLD (several runtimes in one process) must not hide an exit: look
            // every second; the deadline is sent again, unchanged.
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                match child.try_wait() {
                    Ok(None) => {}
                    // Err: not our child any more (reaped elsewhere): gone all the same.
                    status => {
                        tracing::error!(?status, "the fencing watchdog exited");
                        return Fed::WatchdogGone;
                    }
                }
            }
        }
    }
}

/// Starts the watchdog for the postgres of `data_dir` and feeds it the keeper's deadline until the
/// returned task is dropped (then the watchdog keeps the last deadline). A watchdog that exits is
/// started again and fed the current deadline.
pub fn spawn_watchdog(
    command: &WatchdogCommand,
    data_dir: &Path,
    keeper: Arc<LeaseKeeper>,
) -> Result<tokio::task::JoinHandle<()>, WatchdogError> {
    let mut current = Some(start(command, data_dir)?);
    let mut deadlines = keeper.subscribe_deadline();
    let (command, data_dir) = (command.clone(), data_dir.to_path_buf());
    Ok(tokio::spawn(async move {
        // Held for as long as the watchdog is fed: its deadline channel lives in the keeper.
        let _keeper = keeper;
        loop {
            let (mut child, mut stdin) = match current.take() {
                Some(started) => started,
                None => match start(&command, &data_dir) {
                    Ok(started) => {
                        tracing::warn!(data_dir = %data_dir.display(), "fencing watchdog started again");
                        started
                    }
                    Err(error) => {
                        tracing::error!(%error, "failed to start the fencing watchdog again; retrying");
                        tokio::time::sleep(RESPAWN_DELAY).await;
                        continue;
                    }
                },
            };
            let fed = feed(&mut child, &mut stdin, &mut deadlines).await;
            drop(stdin);
            match fed {
                Fed::KeeperGone => {
                    // Reap the child when it exits so it does not linger as a zombie.
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                    return;
                }
                Fed::WatchdogGone => {
                    // A broken pipe with the process still alive: never run two watchdogs.
                    let _ = child.start_kill();
                    // Bounded: a missed SIGCHLD must not stop the respawn.
                    let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                    tokio::time::sleep(RESPAWN_DELAY).await;
                }
            }
        }
    }))
}

/// The postmaster pid from `postmaster.pid`, only if that process is still a postgres.
fn running_postmaster(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "postgres" || comm.trim() == "postmaster").then_some(pid)
}

/// Immediate shutdown of the postmaster of `data_dir`, escalating to SIGKILL after `grace`.
pub async fn kill_postmaster(data_dir: &Path, grace: Duration) -> bool {
    let Some(pid) = running_postmaster(data_dir) else {
        return false;
    };
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    let give_up = Instant::now() + grace;
    while Instant::now() < give_up {
        if kill(Pid::from_raw(pid), None).is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    true
}

/// The watchdog process itself: reads "arm <ms>" / "disarm" lines from stdin. Deadlines are
/// checked on the boot clock too (see `coordination::clock`): a suspend does not extend them.
pub async fn run_watchdog(data_dir: &Path) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut deadline: Option<FenceInstant> = None;
    let mut agent_gone = false;
    loop {
        if agent_gone && deadline.is_none() {
            return Ok(());
        }
        // Wake at most every 100 ms to look at the boot clock, which tokio's timers ignore.
        let pause = deadline.map(|d| d.remaining().min(Duration::from_millis(100)));
        tokio::select! {
            line = lines.next_line(), if !agent_gone => match line {
                Ok(Some(line)) => {
                    let line = line.trim();
                    if line == "disarm" {
                        deadline = None;
                    } else if let Some(ms) = line.strip_prefix("arm ").and_then(|ms| ms.parse::<u64>().ok()) {
                        deadline = Some(FenceInstant::now() + Duration::from_millis(ms));
                    } else {
                        tracing::warn!(line, "fencing watchdog: unknown command");
                    }
                }
                // The agent is gone: its last deadline still holds.
                Ok(None) | Err(_) => agent_gone = true,
            },
            () = async { match pause { Some(p) => tokio::time::sleep(p).await, None => std::future::pending().await } } => {
                if deadline.is_some_and(FenceInstant::has_passed) {
                    deadline = None;
                    let at = chrono::Utc::now();
                    if kill_postmaster(data_dir, Duration::from_millis(500)).await {
                        tracing::error!(data_dir = %data_dir.display(), fenced_at = %at, "fencing watchdog: lease deadline passed without renewal; postmaster stopped immediately");
                    }
                }
            }
        }
    }
}
