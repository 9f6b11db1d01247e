//! `interceptor`: attach, detach and inspect the eBPF interception per cgroup.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use interceptor::paths::{PinLayout, DEFAULT_PIN_DIR};

mod cli;

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
    Attach(cli::attach::AttachArgs),
    /// Put the proxy's inbound listener into an attached network namespace's map (again after
    /// a proxy restart).
    Register(cli::register::RegisterArgs),
    /// Stop intercepting a cgroup or a network namespace.
    Detach(cli::detach::DetachArgs),
    /// Show attached cgroups, their settings and pinned links.
    Status(cli::status::StatusArgs),
    /// Show the kernel programs' decision counters.
    Stats(cli::stats::StatsArgs),
    /// Replace the programs on every pinned link with the ones built into this binary, in
    /// place (BPF_LINK_UPDATE), keeping the links, maps and settings.
    Upgrade(cli::upgrade::UpgradeArgs),
    /// Print the log lines of the kernel programs (loaded with --kernel-log debug).
    Logs(cli::logs::LogsArgs),
    /// Run the daemon: keep the scopes of a config file attached (systemd units, slices,
    /// cgroups; pods of this node in node agent mode), serve health and metrics over HTTP.
    Run(cli::run::RunArgs),
    /// Wait until a URL answers 200 (the readiness gate: an init container polls the node
    /// agent's /pods/NS/NAME/ready before the application starts).
    WaitReady(cli::run::WaitReadyArgs),
    /// Mount bpffs at /sys/fs/bpf unless it is mounted (the DaemonSet's init step).
    MountBpffs(cli::run::MountBpffsArgs),
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
        Command::Attach(a) => cli::attach::run(&layout, a),
        Command::Detach(a) => cli::detach::run(&layout, a),
        Command::Register(a) => cli::register::run(&layout, a),
        Command::Status(a) => cli::status::run(&layout, a),
        Command::Stats(a) => cli::stats::run(&layout, a),
        Command::Upgrade(a) => cli::upgrade::run(&layout, a),
        Command::Logs(a) => cli::logs::run(&layout, a),
        Command::Run(a) => cli::run::run(a),
        Command::WaitReady(a) => cli::run::wait_ready(a),
        Command::MountBpffs(a) => cli::run::mount_bpffs(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
