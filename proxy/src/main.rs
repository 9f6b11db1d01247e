//! `interceptor-proxy` binary: parse, set up logging and the runtime, run the library;
//! start a successor on SIGUSR2, and as PID 1 stay as the container's init after the
//! hand-off ([`interceptor_proxy::restart`]).

use std::process::ExitCode;

use clap::Parser;
use interceptor_proxy::{config::Cli, restart, telemetry, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(pid) = cli.signal_upgrade {
        return signal_upgrade(pid);
    }
    let config = match Config::from_cli(cli) {
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
    let successor = restart::Successor::from_env(
        config.upgrade_binary.as_deref(),
        config.upgrade_socket.is_some(),
    );
    successor.install();
    let code = runtime.block_on(async move {
        let mut signals = match restart::Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGUSR2/SIGCHLD handlers");
                return 1;
            }
        };
        let served = restart::serve_with(
            successor.clone(),
            &mut signals,
            interceptor_proxy::run(config),
        )
        .await;
        let own = match served {
            Ok(_) => 0,
            Err(e) => {
                tracing::error!("{e}");
                1
            }
        };
        if restart::is_pid1() {
            restart::init(successor, &mut signals, own).await
        } else {
            own
        }
    });
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// `--signal-upgrade PID`: SIGUSR2 to the serving proxy, which starts its successor.
fn signal_upgrade(pid: i32) -> ExitCode {
    use nix::sys::signal::{kill, Signal};
    match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGUSR2) {
        Ok(()) => {
            eprintln!("interceptor-proxy: sent SIGUSR2 to pid {pid}: it starts its successor (--upgrade); its log says how the hand-off went");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("interceptor-proxy: --signal-upgrade {pid}: {e}; give the pid of the serving proxy (1 in its container), run as its user");
            ExitCode::FAILURE
        }
    }
}
