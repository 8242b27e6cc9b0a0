//! `baton`: a deliverability-focused outbound SMTP gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use baton::{config, dkim_cmd, dns_cmd, policy, queue_cmd, serve, users};

use clap::{Parser, Subcommand};

/// Allocator: jemalloc in place of glibc's. With glibc, Baton's RSS peaked
/// at 4.3 GiB while it drained a queue of 1,000,000 messages
/// (benches/big_queue.sh). A limit of one glibc arena also kept it low, so
/// the likely cause is freed memory held in glibc's per-thread arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "baton", version, about = "Outbound SMTP gateway: DKIM signing, durable queue, shaped delivery")]
struct Cli {
    /// YAML configuration file; without it the built-in defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: SMTP intake, delivery, HTTP metrics.
    Serve,
    /// Inspect the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Check the DNS records of every sending domain and source IP.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
    },
    /// Validate the policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Make DKIM keys and check their DNS records.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Manage the users who may send with SMTP AUTH (smtp.auth.users_file).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user, or set a new password for one. The password is read
    /// from a prompt, or from the first line of standard input when that
    /// is not a terminal. It is never taken from the command line.
    Add {
        /// User name as the client sends it in AUTH (case-sensitive).
        name: String,
    },
    /// Remove a user.
    Remove { name: String },
    /// Print the user names, one per line.
    List,
}

#[derive(Subcommand)]
enum DnsCommand {
    /// Print the SPF, DKIM and DMARC records to publish for each domain of
    /// policies/senders.yaml next to what DNS has, and check each source
    /// IP's PTR record. Exits non-zero when something must be fixed.
    Check {
        /// Check only this domain.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Write a new private key to keys/<domain>/<selector>.pem (mode 0600)
    /// and print the DNS TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa-2048")]
        algorithm: dkim_cmd::Algorithm,
    },
    /// Look up each selector of policies/senders.yaml in DNS and compare the
    /// published key with the private key.
    Check {
        /// Check only this domain.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages per recipient domain, with their next attempt.
    List {
        /// Maximum number of messages to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Explain why a message is waiting: its site, the limit or rule that
    /// delays it, and its next attempt.
    Explain {
        /// Queue id, as `baton queue list` shows it.
        queue_id: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load every policy file and key as `baton serve` would, and report
    /// the first error with its file, line and field.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let config = match config::Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("baton: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(serve::run(config))),
        Command::Queue {
            command: QueueCommand::List { limit },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(async { queue_cmd::list(&config, limit) })),
        Command::Queue {
            command: QueueCommand::Explain { queue_id },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(async { queue_cmd::explain(&config, &queue_id) })),
        Command::Policy {
            command: PolicyCommand::Check,
        } => policy::check(&config.policies, &config.keys),
        Command::Dns {
            command: DnsCommand::Check { domain },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(dns_cmd::check(&config, domain.as_deref()))),
        Command::Dkim {
            command: DkimCommand::Keygen { domain, selector, algorithm },
        } => dkim_cmd::keygen(&config, &domain, &selector, algorithm),
        Command::Dkim {
            command: DkimCommand::Check { domain },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(dkim_cmd::check(&config, domain.as_deref()))),
        Command::User {
            command: UserCommand::Add { name },
        } => users::add(&config, &name),
        Command::User {
            command: UserCommand::Remove { name },
        } => users::remove(&config, &name),
        Command::User {
            command: UserCommand::List,
        } => users::list(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("baton: {error:#}");
            ExitCode::FAILURE
        }
    }
}
