//! `interceptor`: attach, detach, inspect and upgrade the eBPF interception, and run the
//! daemon. One module per verb; each parses its arguments and calls the loader library
//! (`interceptor`) or the daemon (`interceptor-daemon`).
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use interceptor::paths::{PinLayout, DEFAULT_PIN_DIR};

mod attach;
mod check;
mod detach;
mod logs;
mod register;
mod run;
mod stats;
mod status;
mod upgrade;

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Transparent eBPF interception for service-mesh sidecars"
)]
struct Args {
    /// bpffs directory that holds the pinned maps and links.
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR, env = "INTERCEPTOR_PIN_DIR")]
    pin_dir: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Logging of the kernel programs that `attach` and `upgrade` load: off, or debug (one
    /// line per decision, read with `interceptor logs`).
    #[arg(long, global = true, value_enum, default_value_t = KernelLog::Off, env = "INTERCEPTOR_KERNEL_LOG")]
    kernel_log: KernelLog,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelLog {
    Off,
    Debug,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Intercept a cgroup's outbound or a network namespace's inbound TCP connections
    /// (updates an attached scope in place).
    Attach(attach::AttachArgs),
    /// Probe the running kernel for every hook, helper, map type and link kind the programs
    /// use: what is there, what is missing (exit 1 when a required one is).
    Check(check::CheckArgs),
    /// Put the proxy's inbound listener into an attached network namespace's map (again after
    /// a proxy restart).
    Register(register::RegisterArgs),
    /// Stop intercepting a cgroup or a network namespace.
    Detach(detach::DetachArgs),
    /// Show attached cgroups, their settings and pinned links.
    Status(status::StatusArgs),
    /// Show the kernel programs' decision counters.
    Stats(stats::StatsArgs),
    /// Replace the programs on every pinned link with the ones built into this binary, in
    /// place (BPF_LINK_UPDATE), keeping the links, maps and settings.
    Upgrade(upgrade::UpgradeArgs),
    /// Print the log lines of the kernel programs (loaded with --kernel-log debug).
    Logs(logs::LogsArgs),
    /// Run the daemon: keep the scopes of a config file attached (systemd units, slices,
    /// cgroups; pods of this node in node agent mode), serve health and metrics over HTTP.
    Run(run::RunArgs),
    /// Wait until a URL answers 200 (the readiness gate: an init container polls the node
    /// agent's /pods/NS/NAME/ready before the application starts).
    WaitReady(run::WaitReadyArgs),
    /// Mount bpffs at /sys/fs/bpf unless it is mounted (the DaemonSet's init step).
    MountBpffs(run::MountBpffsArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let layout = PinLayout::new(args.pin_dir);
    interceptor::kernel_log::set_kernel_log(args.kernel_log == KernelLog::Debug);
    let result = match args.command {
        Command::Attach(a) => attach::run(&layout, a),
        Command::Check(a) => check::run(a),
        Command::Detach(a) => detach::run(&layout, a),
        Command::Register(a) => register::run(&layout, a),
        Command::Status(a) => status::run(&layout, a),
        Command::Stats(a) => stats::run(&layout, a),
        Command::Upgrade(a) => upgrade::run(&layout, a),
        Command::Logs(a) => logs::run(&layout, a),
        Command::Run(a) => run::run(a),
        Command::WaitReady(a) => run::wait_ready(a),
        Command::MountBpffs(a) => run::mount_bpffs(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
