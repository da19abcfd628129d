//! Child processes of the chaos harness (fleet binaries, redis-server): a
//! guard that logs the child's output to a file, sends it signals, and kills
//! it when dropped (also on panic), plus the temp-dir guard and small helpers.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

/// A child process, SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct ChildProc {
    name: String,
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl ChildProc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> anyhow::Result<ChildProc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("log file {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("failed to start {name} ({cmd:?})"))?;
        Ok(ChildProc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Its name in reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`STOP`, `CONT`, `TERM`, `KILL`...) with `kill(1)`: the
    /// crate forbids `unsafe`, so no `libc::kill`.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        signal(self.pid(), sig).with_context(|| format!("kill -{sig} {}", self.name))
    }

    /// SIGKILL and reap (a stopped process dies too).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("failed to run kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed ({status})");
    }
    Ok(())
}

pub(crate) use crate::testkit::demo::free_port;

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, empty directory under the system temp dir. World-traversable,
    /// because the private Postgres runs as user `postgres` below it.
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            ulid::Ulid::new().to_string().to_lowercase()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `check` every `every` until it returns `Some`, or fails after `deadline`
/// naming `what`. The only way the harness waits for work.
pub async fn poll<T, F, Fut>(
    deadline: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}
