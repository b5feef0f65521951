//! `peftrt serve`: runs `peftrt-server` (the `server/` crate), the OpenAI-compatible HTTP server,
//! with the same arguments. The server is a program of its own so that this binary and
//! libpeftrt never link an async runtime (tokio, axum).

use anyhow::{bail, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// The server's arguments (`peftrt serve --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

const SERVER: &str = "peftrt-server";

pub fn run(a: Args) -> Result<()> {
    let Some(server) = find_server() else {
        bail!(
            "`peftrt serve` runs the {SERVER} program, which is neither beside this peftrt executable nor on \
             PATH; build it with `cargo build --release -p peftrt-server` (`make build` builds it too) and keep \
             it in the same directory as peftrt"
        );
    };
    let mut cmd = std::process::Command::new(&server);
    cmd.args(&a.args);
    // On Unix the server replaces this process: Ctrl-C and SIGTERM reach it alone (it stops
    // gracefully, exit status 0), and its exit status is the command's.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let e = cmd.exec();
        bail!("cannot run {}: {e}", server.display());
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().map_err(|e| anyhow::anyhow!("cannot run {}: {e}", server.display()))?;
        std::process::exit(status.code().unwrap_or(1));
    }
}

/// `peftrt-server` beside the running executable, else the first on PATH.
fn find_server() -> Option<PathBuf> {
    let name = format!("{SERVER}{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(&name)));
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    beside.into_iter().chain(on_path.map(|d| d.join(&name))).find(|p| is_file(p))
}

fn is_file(p: &Path) -> bool {
    p.metadata().is_ok_and(|m| m.is_file())
}
