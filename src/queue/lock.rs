//! The per-payout distributed lock: `SET key token NX PX ttl`, renewed while
//! held, released by a compare-and-delete script. It keeps two workers from
//! doing the same payout at the same time; it is an optimisation, never the
//! guarantee (a paused process can outlive its lock): the fenced writes in
//! Postgres are.
//!
//! A lock whose payout no worker needs again soon (paid, failed for good, in
//! transit) is not released but left to expire ([`LockGuard::leave`]): a job
//! delivered again within the TTL is skipped as locked, and after it the
//! claim is refused by the final row; either way no gateway call. That saves
//! the release script (3 of the 4 Redis commands a payout's lock costs, and
//! one round trip). A payout that will be worked on again soon (retrying,
//! held, given back, refused by the fence, an infrastructure error) is
//! released, so its next job is not skipped; an operator's retry or enqueue
//! clears the lock of the payouts it pushes ([`crate::queue::Queue::push_manual`]).
//! A crash costs what it always did: the lock is gone within one TTL.

use std::time::Duration;

use std::sync::LazyLock;

use redis::{Script, aio::ConnectionManager};
use tokio::task::JoinHandle;

/// Deletes KEYS[1] only while it still holds ARGV[1] (the holder's token).
/// Built once: `Script::new` hashes its source.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
    )
});

/// Extends KEYS[1] to ARGV[2] ms only while it still holds ARGV[1].
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
    )
});

/// The key of payout `id`'s lock under `prefix`.
pub fn key(prefix: &str, id: i64) -> String {
    format!("{{{prefix}}}:lock:{id}")
}

/// Takes per-payout locks.
#[derive(Clone)]
pub struct Locks {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// A held lock; renewed in the background until released or dropped.
#[derive(Debug)]
pub struct LockGuard {
    conn: ConnectionManager,
    key: String,
    token: String,
    renewer: JoinHandle<()>,
}

impl Locks {
    /// Locks under `{prefix}:lock:` with time-to-live `ttl`.
    pub fn new(conn: ConnectionManager, prefix: &str, ttl: Duration) -> Self {
        Locks {
            conn,
            prefix: prefix.to_string(),
            ttl,
        }
    }

    /// The key of payout `id`'s lock.
    pub fn key(&self, id: i64) -> String {
        key(&self.prefix, id)
    }

    /// Tries once; `None` when another holder has it.
    pub async fn try_acquire(&self, id: i64) -> redis::RedisResult<Option<LockGuard>> {
        let key = self.key(id);
        let token = ulid::Ulid::new().to_string();
        let mut conn = self.conn.clone();
        let ok: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if ok.is_none() {
            return Ok(None);
        }
        let renewer = {
            let (mut conn, key, token, ttl) = (conn.clone(), key.clone(), token.clone(), self.ttl);
            tokio::spawn(async move {
                let script = &*RENEW;
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let renewed: redis::RedisResult<i64> = script
                        .key(&key)
                        .arg(&token)
                        .arg(ttl.as_millis() as u64)
                        .invoke_async(&mut conn)
                        .await;
                    match renewed {
                        Ok(1) => {}
                        Ok(_) => {
                            tracing::warn!(%key, "lock lost before release; the fence still protects the write");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(%key, error = %format_args!("{e:#}"), "lock renewal failed")
                        }
                    }
                }
            })
        };
        Ok(Some(LockGuard {
            conn,
            key,
            token,
            renewer,
        }))
    }
}

impl LockGuard {
    /// Stops renewing and leaves the lock to expire by its TTL (no Redis
    /// command): for a payout no worker needs again soon. Until it expires,
    /// a job delivered again for the payout is skipped as locked.
    pub fn leave(self) {
        self.renewer.abort();
    }

    /// Releases the lock if it is still ours.
    pub async fn release(mut self) -> redis::RedisResult<bool> {
        self.renewer.abort();
        let n: i64 = RELEASE
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(n == 1)
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}
