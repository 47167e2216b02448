//! `docs/replication.md` documents streaming replication by hand; its commands are
//! `docs/replication.sh`, included verbatim. This test checks the inclusion and runs the script
//! against real PostgreSQL 15, so the documentation cannot rot.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::{TestEnv, free_port, pg_command, postgres_ids};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn documentation_includes_the_script_verbatim() {
    let script = std::fs::read_to_string(Path::new(ROOT).join("docs/replication.sh")).unwrap();
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/replication.md")).unwrap();
    let begin =
        "<!-- BEGIN docs/replication.sh (verbatim; checked by tests/agent_docs.rs) -->\n```bash\n";
    let start = doc
        .find(begin)
        .expect("begin marker in docs/replication.md")
        + begin.len();
    let end = doc[start..]
        .find("```\n<!-- END docs/replication.sh -->")
        .expect("end marker in docs/replication.md");
    assert_eq!(
        &doc[start..start + end],
        script,
        "docs/replication.md must include docs/replication.sh verbatim"
    );
}

#[test]
fn documented_manual_setup_runs_green() {
    let env = TestEnv::new("docs");
    let workdir = env.path("demo");
    std::fs::create_dir(&workdir).unwrap();
    common::chown_to_postgres(&workdir);
    let mut command = Command::new("bash");
    command
        .arg(Path::new(ROOT).join("docs/replication.sh"))
        .env("WORKDIR", &workdir)
        .env("PRIMARY_PORT", free_port().to_string())
        .env("REPLICA_PORT", free_port().to_string())
        .env("REPLICATION_PASSWORD", "docs-test-pw")
        .env("HOME", &workdir)
        .env("LC_ALL", "C.UTF-8")
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .env_remove("PGPORT");
    if let Some((uid, gid)) = postgres_ids() {
        command.uid(uid).gid(gid);
    }
    let output = command.output().expect("run docs/replication.sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        // Leave no server running behind a failure.
        for dir in ["replica", "primary"] {
            let _ = pg_command("pg_ctl")
                .arg("-D")
                .arg(workdir.join(dir))
                .args(["-m", "immediate", "stop"])
                .output();
        }
        let logs: String = ["primary.log", "replica.log"]
            .iter()
            .map(|f| std::fs::read_to_string(workdir.join(f)).unwrap_or_default())
            .collect();
        panic!(
            "docs/replication.sh failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nlogs:\n{logs}",
            output.status
        );
    }
    assert!(
        stdout.contains("replica reads: written on the primary"),
        "{stdout}"
    );
    assert!(stdout.contains("replica1|streaming|async"), "{stdout}");
    assert!(stdout.contains("streaming replication works"), "{stdout}");
    // The archive received WAL from the primary.
    assert!(
        std::fs::read_dir(workdir.join("archive"))
            .unwrap()
            .next()
            .is_some()
    );
}
