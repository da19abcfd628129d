//! A private redis-server for one scenario, on a free loopback port (never
//! the shared 6379), in its own directory: killed and restarted empty (S6),
//! killed and restarted from its append-only file (S7), stalled with SIGSTOP
//! (S8); for S14, a master with a replica and a sentinel watching them
//! ([`PrivateSentinel`]). Killed when dropped.

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
    /// `--replicaof 127.0.0.1 <port>` (S14's replica).
    replica_of: Option<u16>,
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
            replica_of: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    /// Starts a replica of the server on `master` (no AOF) and waits until
    /// its replication link is up.
    pub async fn start_replica_of(
        dir: &Path,
        log: &Path,
        master: u16,
    ) -> anyhow::Result<PrivateRedis> {
        std::fs::create_dir_all(dir)?;
        let mut r = PrivateRedis {
            port: free_port()?,
            dir: dir.to_path_buf(),
            aof: false,
            child: None,
            log: log.to_path_buf(),
            starts: 0,
            replica_of: Some(master),
        };
        r.spawn().await?;
        let port = r.port;
        poll(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the replica's link to its master",
            || async move {
                let info: String = query(port, redis::cmd("INFO").arg("replication")).await?;
                info.contains("master_link_status:up").then_some(())
            },
        )
        .await?;
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
        if let Some(master) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
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

/// Runs `cmd` on the server at `port`; `None` when it cannot be reached or
/// the answer is not a `T`.
pub async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async(&mut conn).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// `master` or `slave`, as `ROLE` says.
pub async fn role(port: u16) -> Option<String> {
    let v: Vec<redis::Value> = query(port, &redis::cmd("ROLE")).await?;
    match v.first()? {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// The master name S14's sentinel monitors.
pub const SENTINEL_MASTER: &str = "mymaster";

/// S14's Redis: a master, its replica and one sentinel (quorum 1) that
/// promotes the replica when the master has not answered for a second.
#[derive(Debug)]
pub struct PrivateSentinel {
    /// The sentinel process.
    sentinel: Option<ChildProc>,
    /// Its port.
    port: u16,
    /// The replica (the master is the fleet's [`PrivateRedis`]).
    pub replica: PrivateRedis,
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            c.kill9();
        }
    }
}

impl PrivateSentinel {
    /// Starts a replica of `master` and a sentinel watching both; returns
    /// once the sentinel knows the replica (it can fail over).
    pub async fn start(dir: &Path, logs: &Path, master: &PrivateRedis) -> anyhow::Result<Self> {
        let replica = PrivateRedis::start_replica_of(
            &dir.join("redis-replica"),
            &logs.join("redis-replica.log"),
            master.port(),
        )
        .await?;
        let port = free_port()?;
        let sdir = dir.join("sentinel");
        std::fs::create_dir_all(&sdir)?;
        let conf = sdir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                sdir.display(),
                master.port()
            ),
        )?;
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel");
        let sentinel = ChildProc::spawn(cmd, "sentinel", &logs.join("sentinel.log"))?;
        let s = PrivateSentinel {
            sentinel: Some(sentinel),
            port,
            replica,
        };
        poll(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the sentinel to know the replica",
            || async move {
                let replicas: Vec<redis::Value> = query(
                    port,
                    redis::cmd("SENTINEL").arg("replicas").arg(SENTINEL_MASTER),
                )
                .await?;
                (!replicas.is_empty()).then_some(())
            },
        )
        .await?;
        Ok(s)
    }

    /// `127.0.0.1:port` of the sentinel.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The sentinel's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}
