//! `whittle`: with no arguments opens the workbench window on the embedded default model; subcommands are the CLI.

use clap::Parser;
use whittle_app::cli::Cli;

fn main() {
    whittle_app::allocator::tune();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(cmd) => whittle_app::cli::run(cmd),
        None => whittle_app::cli::run_default(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
