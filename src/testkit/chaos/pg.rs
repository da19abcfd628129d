//! A private Postgres for the chaos harness: `initdb` in a temp dir, the
//! server on a free loopback port (never the shared 5432), `pg_ctl stop -m
//! immediate` for scenario S9, and a stop when dropped. Postgres refuses to
//! run as root, so as root every `initdb`/`pg_ctl` runs as OS user
//! `postgres` (`runuser`), with the data dir chowned to it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use sqlx::Connection;

use super::process::free_port;

/// A running private Postgres (trust auth, user `postgres`, fsync off: it is
/// crash-tested with `-m immediate`, not power-cut-tested).
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    /// Server options on top of the defaults (`-c name=value ...`).
    extra_opts: String,
}

/// The directory of `pg_ctl` and `initdb`: `PAYOUTS_CHAOS_PG_BIN`, else the
/// newest `/usr/lib/postgresql/*/bin` (Debian's layout), else `pg_config --bindir`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PAYOUTS_CHAOS_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(out) = out {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "Postgres server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin; \
         install them (apt-get install postgresql) or set PAYOUTS_CHAOS_PG_BIN"
    )
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PrivatePostgres {
    /// `initdb` under `dir` (created) and starts the server.
    pub fn start(dir: &Path) -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_with(dir, "")
    }

    /// A primary whose commits wait for a synchronous streaming standby
    /// (`synchronous_commit = on`, `synchronous_standby_names = '*'`): a
    /// commit is acknowledged only once the standby has it. Start the
    /// standby with [`PrivatePostgres::standby_of`] before the first write,
    /// or commits wait for it. The setting is a server option, not in the
    /// data directory, so the standby it is copied into does not inherit it
    /// (a promoted standby must not wait for a standby of its own).
    pub fn start_sync_primary(dir: &Path) -> anyhow::Result<PrivatePostgres> {
        PrivatePostgres::start_with(
            dir,
            "-c synchronous_commit=on -c synchronous_standby_names='*' -c wal_level=replica",
        )
    }

    /// A streaming standby of `primary` under `dir`: `pg_basebackup -R`
    /// (the copy and `primary_conninfo`), then the server in recovery on its
    /// own port; returns once the primary reports it streaming as its
    /// synchronous standby.
    pub async fn standby_of(
        primary: &PrivatePostgres,
        dir: &Path,
    ) -> anyhow::Result<PrivatePostgres> {
        let mut sb = PrivatePostgres::prepare(dir, "")?;
        let data = sb.data.to_string_lossy().into_owned();
        let port = primary.port.to_string();
        sb.run(
            "pg_basebackup",
            &[
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        sb.start_server()?;
        let mut admin = sqlx::PgConnection::connect(&primary.url("postgres"))
            .await
            .context("connect to the primary")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let sync = crate::db::synchronous_standbys(&mut admin).await?;
            if sync > 0 {
                return Ok(sb);
            }
            if std::time::Instant::now() >= deadline {
                bail!("the standby did not stream synchronously within 30 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `pg_ctl promote -w`: the standby leaves recovery and takes writes.
    pub fn promote(&mut self) -> anyhow::Result<()> {
        let data = self.data.to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-w", "-t", "60", "promote"])
    }

    fn start_with(dir: &Path, extra_opts: &str) -> anyhow::Result<PrivatePostgres> {
        let mut pg = PrivatePostgres::prepare(dir, extra_opts)?;
        let data = pg.data.to_string_lossy().into_owned();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    /// The directory (created, owned by `postgres` when run as root) and a
    /// free port; no data directory yet, nothing running.
    fn prepare(dir: &Path, extra_opts: &str) -> anyhow::Result<PrivatePostgres> {
        let bin = find_bin_dir()?;
        std::fs::create_dir_all(dir)?;
        let as_postgres = running_as_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()
                .context("chown")?;
            if !ok.success() {
                bail!("chown postgres {} failed", dir.display());
            }
        }
        let pg = PrivatePostgres {
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            dir: dir.to_path_buf(),
            bin,
            port: free_port()?,
            as_postgres,
            running: false,
            extra_opts: extra_opts.to_string(),
        };
        Ok(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("failed to run {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c synchronous_commit=off -c max_connections=200 {}",
            self.port,
            self.dir.display(),
            self.extra_opts
        );
        let data = self.data.to_string_lossy().into_owned();
        let log = self.log.to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "60", "start",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: every backend is killed, no checkpoint;
    /// the next start runs crash recovery.
    pub fn stop_immediate(&mut self) -> anyhow::Result<()> {
        let data = self.data.to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"],
        )?;
        self.running = false;
        Ok(())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `name` as user `postgres`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .context("connect to the private Postgres")?;
        crate::db::create_database(&mut admin, name, false).await?;
        Ok(self.url(name))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            if let Err(e) = self.stop_immediate() {
                tracing::warn!(error = %format_args!("{e:#}"), "private Postgres did not stop");
            }
        }
    }
}
