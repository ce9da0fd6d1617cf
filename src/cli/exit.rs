//! The one place that turns a command's result into an exit status, and prints the error
//! chain (once, on one line).

use std::process::ExitCode;

/// Exit status for a failure that was reported.
const EXIT_FAILURE: u8 = 1;

/// How a command failed.
pub enum Failure {
    /// The command could not do its work: status 1.
    Command(anyhow::Error),
    /// `run` failed before the application reported a status: status 125, as docker's.
    Run(anyhow::Error),
}

impl Failure {
    fn error(&self) -> &anyhow::Error {
        match self {
            Self::Command(e) | Self::Run(e) => e,
        }
    }
}

impl From<&Failure> for ExitCode {
    fn from(f: &Failure) -> Self {
        match f {
            Failure::Command(_) => ExitCode::from(EXIT_FAILURE),
            Failure::Run(_) => ExitCode::from(oci2uk::run::EXIT_VM_FAILED),
        }
    }
}

/// The exit status of a command that succeeded (the guest application's, for `run`) or
/// failed; a failure's error chain is printed on stderr.
pub fn status(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let chain: Vec<String> = f.error().chain().map(|c| c.to_string()).collect();
            eprintln!("oci2uk: error: {}", chain.join(": "));
            ExitCode::from(&f)
        }
    }
}
