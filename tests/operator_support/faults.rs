//! Faults injected into a pod's processes on the test bed (the fake kubelet runs them as local
//! processes): find them through `/proc`, SIGKILL them all (a hard kill without any API call),
//! or SIGSTOP one agent (a frozen agent) with a guard that resumes it.

use std::collections::BTreeSet;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpgid};

/// The processes of pod `pod`: those started with its `PGRS_NAME`/`PGRS_NAMESPACE` (the agent
/// and its watchdog), everything in the agent's process group (postgres rewrites its own
/// environment area, so the postmaster is found through the group), and their descendants.
pub fn pod_processes(ns: &str, pod: &str) -> BTreeSet<i32> {
    let wanted_name = format!("PGRS_NAME={pod}");
    let wanted_ns = format!("PGRS_NAMESPACE={ns}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    let pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for &pid in &pids {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if vars.contains(&wanted_name.as_bytes()) && vars.contains(&wanted_ns.as_bytes()) {
            found.insert(pid);
            if is_agent(pid)
                && let Ok(group) = getpgid(Some(Pid::from_raw(pid)))
            {
                groups.insert(group.as_raw());
            }
        }
    }
    for &pid in &pids {
        if let Ok(group) = getpgid(Some(Pid::from_raw(pid)))
            && groups.contains(&group.as_raw())
        {
            found.insert(pid);
        }
    }
    // postgres' children make themselves session leaders (setsid): add descendants by parent.
    loop {
        let children: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|pid| !found.contains(pid))
            .filter(|pid| parent(*pid).is_some_and(|p| found.contains(&p)))
            .collect();
        if children.is_empty() {
            return found;
        }
        found.extend(children);
    }
}

/// `pgrs agent …` (not its watchdog).
fn is_agent(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.get(1) == Some(&b"agent".as_slice())
}

/// The parent pid from `/proc/<pid>/stat` (after the parenthesised command name).
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILLs every process of the pod; returns how many there were.
pub fn hard_kill(ns: &str, pod: &str) -> usize {
    let pids = pod_processes(ns, pod);
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    pids.len()
}

/// The pid of the `pgrs agent` process of pod `pod` in namespace `ns` (not its watchdog).
pub fn agent_pid(ns: &str, pod: &str) -> Option<i32> {
    let wanted_name = format!("PGRS_NAME={pod}");
    let wanted_ns = format!("PGRS_NAMESPACE={ns}");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        if !is_agent(pid) {
            return None;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        (vars.contains(&wanted_name.as_bytes()) && vars.contains(&wanted_ns.as_bytes()))
            .then_some(pid)
    })
}

/// A process stopped with SIGSTOP; resumed (SIGCONT) by `resume` or on drop, even when the
/// test fails, so that the bed can stop the pod.
pub struct Frozen(i32);

impl Frozen {
    /// SIGSTOPs `pid`.
    pub fn freeze(pid: i32) -> Frozen {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        Frozen(pid)
    }

    pub fn pid(&self) -> i32 {
        self.0
    }

    /// SIGCONTs the process.
    pub fn resume(self) {
        drop(self);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}
