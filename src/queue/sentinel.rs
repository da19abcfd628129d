//! Redis Sentinel: where the master is, asked of the sentinels
//! (`SENTINEL get-master-addr-by-name`, then `ROLE` on the answer, as the
//! Sentinel client guide asks), and a watch that tells a process when the
//! master moved. The fleet follows a failover by restarting: a process whose
//! master moved stops gracefully (in-flight payouts finish; Postgres is the
//! truth) and exits non-zero, and its supervisor starts it again against the
//! new master. Jobs the old master had and the new one lacks are enqueued
//! again by the lease sweep, as after any Redis loss.

use std::time::Duration;

use anyhow::{Context, bail};
use redis::{ConnectionAddr, IntoConnectionInfo};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// How long one sentinel or master may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The master's `host:port` as the first sentinel that knows it says.
pub async fn master_addr(settings: &RedisSettings) -> anyhow::Result<(String, u16)> {
    let mut last = None;
    for s in &settings.sentinels {
        match ask(s, &settings.sentinel_master).await {
            Ok(Some(addr)) => return Ok(addr),
            Ok(None) => {
                last = Some(format!(
                    "sentinel {s} does not know master {:?}",
                    settings.sentinel_master
                ))
            }
            Err(e) => last = Some(format!("sentinel {s}: {e:#}")),
        }
    }
    bail!(
        "no sentinel named the Redis master {:?}: {}",
        settings.sentinel_master,
        last.unwrap_or_else(|| "no sentinels configured".into())
    )
}

async fn ask(sentinel: &str, master: &str) -> anyhow::Result<Option<(String, u16)>> {
    let client = redis::Client::open(format!("redis://{sentinel}"))?;
    let mut conn = tokio::time::timeout(ASK_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .context("timed out")??;
    let addr: Option<(String, u16)> = tokio::time::timeout(
        ASK_TIMEOUT,
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(&mut conn),
    )
    .await
    .context("timed out")??;
    Ok(addr)
}

/// The connection info of the master: `settings.url`'s credentials and
/// database at the address the sentinels give, once that node says it is
/// the master (`ROLE`); tried for up to `tries` rounds of the sentinels.
pub async fn master_info(
    settings: &RedisSettings,
    tries: u32,
) -> anyhow::Result<redis::ConnectionInfo> {
    let base = settings
        .url
        .expose_secret()
        .into_connection_info()
        .context("invalid Redis URL")?;
    let mut last = anyhow::anyhow!("not asked");
    for round in 0..tries.max(1) {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (host, port) = match master_addr(settings).await {
            Ok(a) => a,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let info = base
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.clone(), port));
        match role(info.clone()).await {
            Ok(r) if r == "master" => return Ok(info),
            Ok(r) => last = anyhow::anyhow!("{host}:{port}, named master, says it is a {r}"),
            Err(e) => last = e.context(format!("{host}:{port}, named master")),
        }
    }
    Err(last)
}

async fn role(info: redis::ConnectionInfo) -> anyhow::Result<String> {
    let client = redis::Client::open(info)?;
    let mut conn = tokio::time::timeout(ASK_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .context("timed out")??;
    let role: Vec<redis::Value> =
        tokio::time::timeout(ASK_TIMEOUT, redis::cmd("ROLE").query_async(&mut conn))
            .await
            .context("timed out")??;
    match role.first() {
        Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
        other => bail!("unexpected ROLE answer {other:?}"),
    }
}

/// Resolves when the sentinels name another master than `connected` (the
/// new `host:port`); never, without sentinels. A sentinel that cannot be
/// asked is not a move.
pub async fn master_moved(settings: RedisSettings, connected: (String, u16)) -> (String, u16) {
    if settings.sentinels.is_empty() {
        return std::future::pending().await;
    }
    let every = Duration::from_millis(settings.sentinel_check_ms);
    loop {
        tokio::time::sleep(every).await;
        if let Ok(now) = master_addr(&settings).await {
            if now != connected {
                return now;
            }
        }
    }
}

/// A long-running process's watch on the master: started before the process
/// connects to Redis, it cancels `shutdown` when the master moves, and
/// [`MasterWatch::outcome`] then says why the process ends.
#[derive(Debug, Clone, Default)]
pub struct MasterWatch {
    moved: std::sync::Arc<std::sync::OnceLock<(String, u16)>>,
}

impl MasterWatch {
    /// Without sentinels, a watch that never fires.
    pub async fn start(
        settings: &RedisSettings,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<MasterWatch> {
        let watch = MasterWatch::default();
        if settings.sentinels.is_empty() {
            return Ok(watch);
        }
        let connected = master_addr(settings).await?;
        let (settings, moved) = (settings.clone(), watch.moved.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                to = master_moved(settings, connected.clone()) => {
                    tracing::warn!(
                        from = %format_args!("{}:{}", connected.0, connected.1),
                        to = %format_args!("{}:{}", to.0, to.1),
                        "the Redis master moved (Sentinel failover): stopping gracefully to restart against it"
                    );
                    let _ = moved.set(to);
                    shutdown.cancel();
                }
            }
        });
        Ok(watch)
    }

    /// `Err` when the process stopped because the master moved: the
    /// process exits non-zero and its supervisor restarts it.
    pub fn outcome(&self) -> anyhow::Result<()> {
        match self.moved.get() {
            Some((host, port)) => bail!(
                "the Redis master moved to {host}:{port}; exiting so that the supervisor restarts this process against it"
            ),
            None => Ok(()),
        }
    }
}
