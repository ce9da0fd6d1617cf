//! The `oci2uk` command line: parses arguments, calls the library, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::args::{Cli, Command, KernelCommand};
use cli::exit::{self, Failure};

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::args::with_default_subcommand(
        std::env::args_os().collect(),
    ));
    cli::init_logging(cli.command.quiet());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let e = anyhow::Error::new(e).context("cannot start the runtime");
            return exit::status(Err(Failure::Command(e)));
        }
    };
    let done = |r: anyhow::Result<()>| r.map(|()| 0).map_err(Failure::Command);
    exit::status(runtime.block_on(async {
        match cli.command {
            Command::Build(args) => done(cli::build::cmd_build(*args).await),
            Command::Push(args) => done(cli::push::cmd_push(args).await),
            Command::Kernel(KernelCommand::Build(args)) => {
                done(cli::kernel::cmd_kernel_build(args).await)
            }
            Command::Kernel(KernelCommand::Push(args)) => {
                done(cli::push::cmd_kernel_push(args).await)
            }
            Command::Inspect(args) => done(cli::inspect::cmd_inspect(args).await),
            Command::Run(args) => cli::run::cmd_run(args).await.map_err(Failure::Run),
        }
    }))
}
