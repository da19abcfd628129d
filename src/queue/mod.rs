//! The Redis side: the apalis-redis queue of payout jobs, the per-payout lock,
//! and the housekeeping apalis-redis does not do for us.
//!
//! Known faults of apalis-redis 1.0 and what this module (with the producer and
//! worker) does about each:
//! - fetch fails ("too many results to unpack") once ~8,000 jobs are due at
//!   once: the producer keeps at most `producer.window` jobs in Redis;
//! - finished jobs stay in Redis forever (`done` set, data and meta hashes):
//!   [`Queue::janitor`] removes them;
//! - `max_attempts` is ignored: the handler always acknowledges; retries are
//!   rows in Postgres;
//! - losing Redis loses jobs: Postgres still says `queued`; the producer sees
//!   the epoch key gone, or set by another server process after a Sentinel
//!   failover or a restart ([`Queue::check_epoch`]), and enqueues them again,
//!   and the lease sweep catches anything else;
//! - a worker stopped gracefully can leave a batch of jobs it had fetched
//!   but not run in its in-flight set, which nothing re-enqueues once the
//!   worker is gone (in a rolling restart, chaos S16 with the defaults, 32
//!   payouts waited for the lease sweep, a minute): the stopping worker
//!   hands them back ([`Queue::hand_back`]).
//!
//! Every key starts with `{prefix}` in braces (a Redis Cluster hash tag).

pub mod beat;
pub mod lock;
pub mod sentinel;

use std::{sync::LazyLock, time::Duration};

use anyhow::Context;
use apalis_core::task::builder::TaskBuilder;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::{config::RedisSettings, domain::PayoutId};

/// The job: which payout to work on. Nothing else travels through Redis; the
/// worker reads the truth from Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutJob {
    /// The payout id (a plain number in the JSON payload).
    pub payout_id: PayoutId,
}

/// The key a payload that is not JSON arrives under (see [`LenientJson`]).
pub const UNDECODABLE: &str = "_undecodable";

/// A JSON codec that never fails to decode. apalis decodes a job before the
/// handler sees it, and a decoding error ends the whole apalis worker; the
/// job then comes back as an orphan and ends the next one (a crash loop on
/// one stray payload). With this codec bytes that are not JSON become
/// `{"_undecodable": "<first 64 bytes, lossy>"}`, which the handler counts as
/// malformed and acknowledges.
#[derive(Debug, Clone, Copy, Default)]
pub struct LenientJson;

impl apalis_core::backend::codec::Codec<serde_json::Value> for LenientJson {
    type Compact = Vec<u8>;
    type Error = serde_json::Error;

    fn encode(&self, val: &serde_json::Value) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(val)
    }

    fn decode(&self, compact: &Vec<u8>) -> Result<serde_json::Value, Self::Error> {
        Ok(serde_json::from_slice(compact).unwrap_or_else(|_| {
            let head = &compact[..compact.len().min(64)];
            serde_json::json!({ UNDECODABLE: String::from_utf8_lossy(head) })
        }))
    }
}

/// Most jobs per push script (ARGV grows by 7 per job).
const PUSH_CHUNK: usize = 500;

const JANITOR: &str = r#"
-- KEYS[1] done set, KEYS[2] dead set, KEYS[3] data hash; ARGV[1] meta key prefix, ARGV[2] max per set
local n = 0
for i = 1, 2 do
  local ids = redis.call('SPOP', KEYS[i], tonumber(ARGV[2]))
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[3], id)
    redis.call('DEL', ARGV[1] .. ':' .. id)
    n = n + 1
  end
end
return n
"#;

/// KEYS[1] the active job list, KEYS[2] the scheduled set; ARGV task ids just
/// pushed, in the order they should be fetched. apalis-redis 1.0 pushes
/// every job into the scheduled set (scored by the push's second; a fetch
/// first appends the due ones to the active list's tail), so each is taken
/// from the scheduled set, or else from the active list, and put at the
/// list's head: fetched next. An id in neither (already fetched) is left alone.
const TO_FRONT: &str = r#"
local found = {}
for i = 1, #ARGV do
  local n = redis.call('ZREM', KEYS[2], ARGV[i])
  if n == 0 then
    n = redis.call('LREM', KEYS[1], -1, ARGV[i])
  end
  if n > 0 then
    table.insert(found, ARGV[i])
  end
end
for i = #found, 1, -1 do
  redis.call('LPUSH', KEYS[1], found[i])
end
return #found
"#;

/// A handle on the payout queue in Redis.
#[derive(Clone)]
pub struct Queue {
    conn: ConnectionManager,
    config: Config,
    prefix: String,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The apalis-redis configuration of the payout queue under `prefix`.
pub fn apalis_config(prefix: &str, fetch_batch: usize, heartbeat: Duration) -> Config {
    Config::default()
        .queue(format!("{{{prefix}}}:jobs"))
        .batch_size(fetch_batch.max(1))
        .heartbeat_interval(heartbeat)
        .missed_heartbeats(3)
        .emit_events(false)
}

/// Connects to Redis with a connection manager (it reconnects by itself, to
/// the same address). With `redis.sentinels`, to the master they name.
pub async fn connect(settings: &RedisSettings) -> anyhow::Result<ConnectionManager> {
    let client = if settings.sentinels.is_empty() {
        redis::Client::open(settings.url.expose_secret()).context("invalid Redis URL")?
    } else {
        let info = sentinel::master_info(settings, 10)
            .await
            .context("failed to find the Redis master through Sentinel")?;
        redis::Client::open(info).context("invalid Redis master address")?
    };
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    client
        .get_connection_manager_with_config(cfg)
        .await
        .context("failed to connect to Redis")
}

/// Moves the in-flight jobs of the named apalis workers back to the active
/// list and forgets those workers (apalis-redis's own orphan re-enqueue, for
/// workers that are stopping rather than dead).
/// KEYS: workers set, active list, signal list, in-flight set prefix.
/// ARGV: worker names.
static HAND_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local n = 0
        for _, w in ipairs(ARGV) do
            local key = KEYS[4] .. ':' .. w
            local jobs = redis.call('smembers', key)
            for i = 1, #jobs, 1000 do
                redis.call('rpush', KEYS[2], unpack(jobs, i, math.min(i + 999, #jobs)))
            end
            n = n + #jobs
            redis.call('del', key)
            redis.call('zrem', KEYS[1], w)
        end
        if n > 0 then
            redis.call('del', KEYS[3])
            redis.call('lpush', KEYS[3], 1)
        end
        return n
        ",
    )
});

impl Queue {
    /// The queue under `settings.prefix`.
    pub fn new(
        conn: ConnectionManager,
        prefix: &str,
        fetch_batch: usize,
        heartbeat: Duration,
    ) -> Self {
        Queue {
            conn,
            config: apalis_config(prefix, fetch_batch, heartbeat),
            prefix: prefix.to_string(),
        }
    }

    /// The queue as `settings` configure it.
    pub fn from_settings(conn: ConnectionManager, settings: &crate::config::Settings) -> Self {
        Queue::new(
            conn,
            &settings.redis.prefix,
            settings.worker.fetch_batch,
            Duration::from_secs(settings.worker.heartbeat_secs),
        )
    }

    /// The apalis-redis storage for a worker.
    pub fn storage(&self) -> RedisStorage<serde_json::Value> {
        RedisStorage::new(self.conn.clone()).with_config(self.config.clone())
    }

    /// The apalis-redis configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A connection (shared, multiplexed).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hands the jobs the apalis workers `names` fetched and did not finish
    /// back to the queue, for other workers to take now; returns how many.
    /// For a stopping worker process, once its consumers ended: a job whose
    /// payout is still held is harmless twice (its claim is refused).
    pub async fn hand_back(&self, names: &[String]) -> anyhow::Result<u64> {
        if names.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let mut call = HAND_BACK.prepare_invoke();
        call.key(self.config.workers_set())
            .key(self.config.active_jobs_list())
            .key(self.config.signal_list())
            .key(self.config.inflight_jobs_set());
        for n in names {
            call.arg(n);
        }
        call.invoke_async(&mut conn)
            .await
            .context("failed to hand the fetched jobs back to Redis")
    }

    /// Pushes one job per payout, in chunks of one Lua call each.
    pub async fn push(&self, payout_ids: &[PayoutId]) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        for chunk in payout_ids.chunks(PUSH_CHUNK) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|id| {
                    let data =
                        serde_json::to_vec(&PayoutJob { payout_id: *id }).expect("plain struct");
                    TaskBuilder::new(data).build()
                })
                .collect();
            apalis_redis::queries::push_tasks(&mut conn, &self.config, &tasks)
                .await
                .context("failed to push jobs to Redis")?;
        }
        Ok(())
    }

    /// Pushes one job per payout at the *front* of the queue, so they are
    /// fetched before the window already waiting: payouts that were being
    /// worked on (a dead worker's, an expired lease's) and are overdue.
    /// apalis-redis only appends, so the jobs are pushed as usual under task
    /// ids chosen here, then moved to the head of the list by one script.
    pub async fn push_front(&self, payout_ids: &[PayoutId]) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let script = redis::Script::new(TO_FRONT);
        for chunk in payout_ids.chunks(PUSH_CHUNK) {
            let ids: Vec<String> = chunk
                .iter()
                .map(|_| ulid::Ulid::new().to_string())
                .collect();
            let tasks = chunk
                .iter()
                .zip(&ids)
                .map(|(id, task_id)| {
                    let data =
                        serde_json::to_vec(&PayoutJob { payout_id: *id }).expect("plain struct");
                    let task_id = task_id
                        .parse::<apalis_core::task::task_id::TaskId>()
                        .map_err(|e| anyhow::anyhow!("task id {task_id}: {e}"))?;
                    Ok(TaskBuilder::new(data).task_id(task_id).build())
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            apalis_redis::queries::push_tasks(&mut conn, &self.config, &tasks)
                .await
                .context("failed to push jobs to Redis")?;
            let mut inv = script.key(self.config.active_jobs_list());
            inv.key(self.config.scheduled_jobs_set());
            for id in &ids {
                inv.arg(id);
            }
            let _moved: i64 = inv
                .invoke_async(&mut conn)
                .await
                .context("failed to move jobs to the front of the queue")?;
        }
        Ok(())
    }

    /// Pushes jobs an operator asked for (enqueue now, retry, bulk retry),
    /// counted as `manual` in `payout_jobs_enqueued_total`.
    pub async fn push_manual(&self, payout_ids: &[PayoutId]) -> anyhow::Result<()> {
        self.push(payout_ids).await?;
        crate::metrics::JOBS_ENQUEUED
            .with_label_values(&["manual"])
            .inc_by(payout_ids.len() as u64);
        Ok(())
    }

    /// [`Queue::push_manual`] at the front of the queue (an operator's
    /// "process now": ahead of the window already waiting).
    pub async fn push_manual_front(&self, payout_ids: &[PayoutId]) -> anyhow::Result<()> {
        self.push_front(payout_ids).await?;
        crate::metrics::JOBS_ENQUEUED
            .with_label_values(&["manual"])
            .inc_by(payout_ids.len() as u64);
        Ok(())
    }

    /// Pushes raw bytes as a job (tests of malformed payloads).
    pub async fn push_raw(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        apalis_redis::queries::push_tasks(
            &mut conn,
            &self.config,
            &[TaskBuilder::new(payload).build()],
        )
        .await
        .context("failed to push job to Redis")?;
        Ok(())
    }

    /// Jobs waiting in Redis (scheduled + active), not counting in-flight ones.
    pub async fn waiting(&self) -> anyhow::Result<u64> {
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) = redis::pipe()
            .llen(self.config.active_jobs_list())
            .zcard(self.config.scheduled_jobs_set())
            .query_async(&mut conn)
            .await?;
        Ok(active + scheduled)
    }

    /// Removes finished jobs (their data, metadata and set entries), at most
    /// `max` per set; returns how many.
    pub async fn janitor(&self, max: usize) -> anyhow::Result<u64> {
        let mut conn = self.conn.clone();
        let n: u64 = redis::Script::new(JANITOR)
            .key(self.config.done_jobs_set())
            .key(self.config.dead_jobs_set())
            .key(self.config.job_data_hash())
            .arg(self.config.job_meta_hash())
            .arg(max)
            .invoke_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Checks that the Redis the queue talks to still holds every job the
    /// producer pushed: the epoch key names the server process (`run_id`)
    /// that has held the data since it was set. `Missing`: Redis is new or
    /// lost its data. `OtherServer`: another server process holds it now (a
    /// Sentinel failover promoted a replica, which may lack the master's last
    /// writes, or Redis restarted from a file that may lack its last second).
    /// Either way every `queued` job must be pushed again; the key is then
    /// stamped with the current server. One script call.
    pub async fn check_epoch(&self) -> anyhow::Result<Epoch> {
        let mut conn = self.conn.clone();
        let key = format!("{{{}}}:epoch", self.prefix);
        let stamp = crate::clock::Clock::now(&crate::clock::SystemClock).to_rfc3339();
        let state: i64 = CHECK_EPOCH
            .key(&key)
            .arg(stamp)
            .invoke_async(&mut conn)
            .await?;
        Ok(match state {
            0 => Epoch::Same,
            1 => Epoch::Missing,
            _ => Epoch::OtherServer,
        })
    }
}

/// What [`Queue::check_epoch`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    /// The same server process has held the data since the key was set.
    Same,
    /// No epoch key: Redis is new or lost its data.
    Missing,
    /// The key was set on another server process (a failover or a restart).
    OtherServer,
}

impl Epoch {
    /// Whether every `queued` job must be pushed again.
    pub fn lost_jobs(self) -> bool {
        self != Epoch::Same
    }
}

/// KEYS: the epoch key. ARGV: a timestamp. The key holds `<run_id> <stamp>`;
/// returns 0 when `run_id` is this server's, else stamps it with this
/// server's and returns 1 (it was missing) or 2 (another server's).
static CHECK_EPOCH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
        local info = redis.call('INFO', 'server')
        -- A server that does not say its run_id is always the same one.
        local run = string.match(info, 'run_id:(%x+)') or 'unknown'
        local cur = redis.call('GET', KEYS[1])
        if cur and string.sub(cur, 1, #run + 1) == run .. ' ' then
            return 0
        end
        redis.call('SET', KEYS[1], run .. ' ' .. ARGV[1])
        if cur then return 2 end
        return 1
        ",
    )
});

#[cfg(test)]
mod tests {
    use apalis_core::backend::codec::Codec;

    use super::*;

    #[test]
    fn lenient_json_decodes_json_and_wraps_anything_else() {
        let job = LenientJson
            .decode(&br#"{"payout_id": 7}"#.to_vec())
            .unwrap();
        assert_eq!(
            serde_json::from_value::<PayoutJob>(job).unwrap().payout_id,
            PayoutId::new(7)
        );
        // The wire format is the plain number, as before the newtype.
        assert_eq!(
            serde_json::to_string(&PayoutJob {
                payout_id: PayoutId::new(7)
            })
            .unwrap(),
            r#"{"payout_id":7}"#
        );
        let junk = LenientJson.decode(&b"\xff\xfe not json".to_vec()).unwrap();
        let text = junk[UNDECODABLE].as_str().unwrap();
        assert!(text.ends_with(" not json"), "{text}");
        assert!(serde_json::from_value::<PayoutJob>(junk).is_err());
        let long = LenientJson.decode(&vec![b'x'; 10_000]).unwrap();
        assert_eq!(long[UNDECODABLE].as_str().unwrap().len(), 64);
    }
}
