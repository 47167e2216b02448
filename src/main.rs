use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pgrs::cli::init_tracing();
    let cli = pgrs::cli::Cli::parse();
    match pgrs::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
