//! Starts the test bed for a person: `cargo run -p pgrs-testbed --bin testbed-up`.
//! Prints `export KUBECONFIG=...` and keeps running until Ctrl-C / SIGTERM.

use pgrs_testbed::testbed::error_chain;
use pgrs_testbed::{TestBed, TestBedOptions};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgrs_testbed=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let bed = match TestBed::start(TestBedOptions {
        keep_dir: std::env::var_os("PGRS_TESTBED_KEEP").is_some(),
        images: None,
        real_nodes: false,
    }) {
        Ok(bed) => bed,
        Err(e) => {
            eprintln!("testbed-up: {}", error_chain(&e));
            std::process::exit(1);
        }
    };
    println!("export KUBECONFIG={}", bed.admin_kubeconfig().display());
    println!("export PATH={}:$PATH", bed.binaries().dir().display());
    eprintln!(
        "testbed-up: Kubernetes {} at {} (node {}, pods reach the API at {}:443); \
         Ctrl-C stops it. State: {}",
        bed.versions().kubernetes,
        bed.server_url(),
        bed.node_name(),
        bed.gateway(),
        bed.dir().display()
    );
    let signals = nix::sys::signal::SigSet::from_iter([
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ]);
    if let Err(e) = signals.thread_block() {
        eprintln!("testbed-up: failed to block signals: {e}");
    }
    match signals.wait() {
        Ok(signal) => eprintln!("testbed-up: {signal}, shutting down"),
        Err(e) => eprintln!("testbed-up: waiting for a signal failed ({e}), shutting down"),
    }
    bed.shutdown();
}
