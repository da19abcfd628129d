//! A private redis-server for one scenario, on a free loopback port (never
//! the shared 6379), in its own directory: killed and restarted empty (S6),
//! killed and restarted from its append-only file (S7), stalled with SIGSTOP
//! (S8). Killed when dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::process::{ChildProc, free_port, poll};

/// A private redis-server.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    aof: bool,
    child: Option<ChildProc>,
    log: PathBuf,
    starts: u32,
}

impl PrivateRedis {
    /// Starts one in `dir` (created); with `aof`, every write is appended
    /// and fsynced (`appendfsync always`) so a SIGKILL loses nothing.
    pub async fn start(dir: &Path, log: &Path, aof: bool) -> anyhow::Result<PrivateRedis> {
        std::fs::create_dir_all(dir)?;
        let mut r = PrivateRedis {
            port: free_port()?,
            dir: dir.to_path_buf(),
            aof,
            child: None,
            log: log.to_path_buf(),
            starts: 0,
        };
        r.spawn().await?;
        Ok(r)
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server (same port, same directory) and waits until it
    /// answers PING (after loading its AOF, if any).
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--protected-mode", "no"]);
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.starts += 1;
        let name = format!("redis-{}", self.starts);
        self.child = Some(ChildProc::spawn(cmd, &name, &self.log)?);
        let port = self.port;
        poll(
            Duration::from_secs(20),
            Duration::from_millis(20),
            "redis-server to answer PING",
            || async move { ping(port).await.then_some(()) },
        )
        .await
    }

    /// SIGKILL: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill9();
        }
    }

    /// Starts it again after [`PrivateRedis::kill`]: empty without AOF, with
    /// its data from the AOF otherwise.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Sends `sig` (`STOP`, `CONT`) to the server.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        self.child
            .as_ref()
            .context("redis-server is not running")?
            .signal(sig)
    }
}

/// `true` when the server at `port` answers `+PONG` (not `-LOADING`).
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        buf[..n].starts_with(b"+PONG").then_some(())
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}
