//! Worker liveness beats: each worker process writes its lease owner name
//! with the time into one sorted set (`{prefix}:workers:beats`) every
//! `worker.beat_ms`; the leading producer reads which owners stopped beating
//! for `producer.rescue_after_ms` and releases what they held
//! (`crate::producer::Producer::rescue`), instead of waiting for the leases.
//!
//! Every time is Redis' own `TIME`, read inside the scripts, so the hosts'
//! clocks never meet. A stall of Redis (or of the network to it) stops every
//! beat at once and is not a death: owners are reported stale only after the
//! set has had at least one fresh beat continuously for `rescue_after`
//! (tracked in `{prefix}:workers:beats:live_since`, shared by producer
//! replicas), so after an outage the live workers get one full
//! `rescue_after` to beat again.

use std::{sync::LazyLock, time::Duration};

use redis::{Script, aio::ConnectionManager};

/// KEYS[1] the beats set; ARGV[1] the member. Scores it with Redis' time in ms.
static BEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
         local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         redis.call('ZADD', KEYS[1], ms, ARGV[1])
         return ms",
    )
});

/// KEYS[1] the beats set, KEYS[2] the live-since key; ARGV[1] rescue_after in ms.
/// Returns a flat list of stale members and their scores, once the set has
/// had a fresh beat for at least ARGV[1] ms; else nothing.
static STALE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         local after = tonumber(ARGV[1])
         local cutoff = now - after
         local fresh = redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, '+inf')
         if fresh == 0 then
           redis.call('DEL', KEYS[2])
           return {}
         end
         local since = tonumber(redis.call('GET', KEYS[2]))
         if not since then
           redis.call('SET', KEYS[2], now)
           return {}
         end
         if now - since < after then
           return {}
         end
         return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'WITHSCORES')",
    )
});

/// KEYS[1] the beats set; ARGV pairs (member, score read). Removes each member
/// whose score is still the one read (a member that beat again stays).
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = 0
         for i = 1, #ARGV, 2 do
           local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
           if s and tonumber(s) == tonumber(ARGV[i + 1]) then
             n = n + redis.call('ZREM', KEYS[1], ARGV[i])
           end
         end
         return n",
    )
});

/// The beats of one fleet (one key prefix).
#[derive(Clone)]
pub struct Beats {
    conn: ConnectionManager,
    key: String,
    live_since: String,
}

impl std::fmt::Debug for Beats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beats").field("key", &self.key).finish()
    }
}

/// A worker that stopped beating: its name and its last beat (Redis ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    /// The lease owner name it beat under.
    pub owner: String,
    /// Its last beat, Redis time in ms.
    pub last_beat_ms: f64,
}

impl Beats {
    /// The beats under `{prefix}:workers:beats`.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        let key = format!("{{{prefix}}}:workers:beats");
        Beats {
            conn,
            live_since: format!("{key}:live_since"),
            key,
        }
    }

    /// Writes `owner`'s beat now; returns Redis' time in ms.
    pub async fn beat(&self, owner: &str) -> redis::RedisResult<i64> {
        let mut conn = self.conn.clone();
        BEAT.key(&self.key).arg(owner).invoke_async(&mut conn).await
    }

    /// Removes `owner` (a graceful stop: nothing to rescue).
    pub async fn remove(&self, owner: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("ZREM")
            .arg(&self.key)
            .arg(owner)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Owners whose last beat is older than `after`, once the set has had a
    /// fresh beat for at least `after` (see the module doc).
    pub async fn stale(&self, after: Duration) -> redis::RedisResult<Vec<Stale>> {
        let mut conn = self.conn.clone();
        let flat: Vec<(String, f64)> = STALE
            .key(&self.key)
            .key(&self.live_since)
            .arg(after.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(flat
            .into_iter()
            .map(|(owner, last_beat_ms)| Stale {
                owner,
                last_beat_ms,
            })
            .collect())
    }

    /// Removes the stale owners whose payouts were released, unless they
    /// beat again since they were read.
    pub async fn forget(&self, stale: &[Stale]) -> redis::RedisResult<u64> {
        if stale.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let mut inv = FORGET.key(&self.key);
        for s in stale {
            inv.arg(&s.owner).arg(s.last_beat_ms);
        }
        inv.invoke_async(&mut conn).await
    }
}
