//! `wsedge` command line: parse arguments, load the config, start the shards, wait for
//! SIGTERM/SIGINT (drain) or SIGHUP (reload TLS certificates). No logic of its own beyond that.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mimalloc::MiMalloc;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use wsedge::config::{Config, DEFAULT_CONFIG_TOML, IoMode};
use wsedge::shard::Server;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// A shard-per-core WebSocket edge proxy.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default when no command is given).
    Run(RunArgs),
    /// Validate a configuration file and explain the first error; exit 1 if invalid.
    Check {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Print the embedded default configuration, with comments.
    PrintConfig,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Configuration file (TOML); without it the embedded default is served.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Number of shards (overrides runtime.shards); default one per core.
    #[arg(long)]
    shards: Option<std::num::NonZeroUsize>,
    /// I/O backend: auto, uring or epoll (overrides runtime.io).
    #[arg(long)]
    io: Option<IoMode>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::PrintConfig) => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Some(Command::Check { file }) => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} route(s))",
                    file.display(),
                    c.listeners.len(),
                    c.listeners.iter().map(|l| l.routes.len()).sum::<usize>()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid configuration: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut cfg = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: invalid configuration: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded_default(),
    };
    if let Some(n) = args.shards {
        cfg.runtime.shards = Some(n);
    }
    if let Some(io) = args.io {
        cfg.runtime.io = io;
    }
    raise_fd_limit(&cfg);
    // Block the signals before any thread starts so that only this thread receives them.
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsedge: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server = match Server::start(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsedge: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads TLS certificates; SIGTERM/SIGINT drain.
    for sig in signals.forever() {
        if sig == SIGHUP {
            // Failures are logged per listener; the old certificates stay in use.
            let _ = server.reload_tls();
            continue;
        }
        tracing::info!(signal = sig, "draining; a second signal exits immediately");
        std::thread::spawn(move || {
            if signals.forever().any(|s| s != SIGHUP) {
                std::process::exit(130);
            }
        });
        break;
    }
    server.shutdown();
    ExitCode::SUCCESS
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor; service
/// managers often start processes with a soft limit of 1024) and warn when the configured
/// connection caps cannot all be reached.
fn raise_fd_limit(cfg: &Config) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let wanted: u64 = cfg
        .listeners
        .iter()
        .map(|l| l.max_connections.get() as u64)
        .sum();
    if wanted + 64 > limit {
        tracing::warn!(
            fd_limit = limit,
            max_connections = wanted,
            "RLIMIT_NOFILE is below the configured max_connections: accepts will fail with \
             EMFILE before the cap (raise the hard limit, e.g. LimitNOFILE= in systemd)"
        );
    } else {
        tracing::info!(fd_limit = limit, "file descriptor limit");
    }
}
