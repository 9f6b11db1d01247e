//! `interceptor-proxy` binary: parse, set up logging and the runtime, run the library.

use std::process::ExitCode;

use clap::Parser;
use interceptor_proxy::{config::Cli, telemetry, Config};

fn main() -> ExitCode {
    let config = match Config::from_cli(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("interceptor-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(config.log_format);
    // Process-wide: raised once at start, before any connection.
    interceptor_proxy::limits::raise_open_file_limit();
    let runtime = match interceptor_proxy::runtime(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, workers = config.workers, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(interceptor_proxy::run(config)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
