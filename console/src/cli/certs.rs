//! `console certs init`: a cluster's certificates, and what to do with
//! them.

use std::path::Path;
use std::process::ExitCode;

use splitmirror_console::certs::{self, InitOptions};

use super::output::println;

/// Writes the CA and the four roles' certificates into `dir` and says
/// what each holds and how to use them.
pub fn init(
    dir: &Path,
    sans: Vec<String>,
    days: u32,
    force: bool,
    if_missing: bool,
) -> anyhow::Result<ExitCode> {
    let ca = dir.join(splitmirror_proto::security::CA_FILE);
    if if_missing && ca.exists() {
        println(&format!(
            "{} exists: the certificates in {} are left as they are",
            ca.display(),
            dir.display()
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let options = InitOptions {
        extra_sans: sans,
        validity_days: days,
        force,
    };
    let report = certs::init(dir, &options)?;
    println(&format!(
        "wrote {} files in {}",
        report.files.len(),
        dir.display()
    ))?;
    for identity in &report.identities {
        println(&format!(
            "  {:<14} valid until {}  names: {}",
            identity.identity,
            identity.not_after_utc,
            identity.sans.join(", ")
        ))?;
    }
    println(&format!(
        "give each program the directory: --tls-dir {0} (or SPLITMIRROR_TLS_DIR={0}); \
         keep ca.key offline once every certificate is issued",
        dir.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}
