//! A webhook receiver for the benchmark: accepts every POST (200), and for
//! each `payout.paid` message records the payout and the lag from the event's
//! timestamp (the payout recorded paid) to its arrival. It verifies nothing
//! and reads only the three fields it needs (type, timestamp, data.id), so it
//! costs the shared cores little (the bench reports its CPU).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use chrono::{DateTime, Utc};

/// What the receiver has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every request.
    pub requests: u64,
    /// Per paid payout, the first arrival's lag in seconds.
    pub paid_lag: HashMap<i64, f64>,
}

/// A running receiver.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// Its URL (`http://127.0.0.1:port/hook`).
    pub url: String,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
}

/// The part of a message the receiver reads (the rest is skipped unparsed).
#[derive(serde::Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    timestamp: DateTime<Utc>,
    data: MessageData,
}

#[derive(serde::Deserialize)]
struct MessageData {
    id: i64,
}

async fn hook(State(seen): State<Arc<Mutex<Seen>>>, body: Bytes) -> StatusCode {
    // The wall clock on purpose: the lag is measured against the fleet's.
    let now = Utc::now();
    let m: Option<Message<'_>> = serde_json::from_slice(&body).ok();
    let mut s = seen.lock().expect("receiver lock");
    s.requests += 1;
    if let Some(m) = m
        && m.kind == "payout.paid"
    {
        let lag = (now - m.timestamp).num_microseconds().unwrap_or(0) as f64 / 1e6;
        s.paid_lag.entry(m.data.id).or_insert(lag);
    }
    StatusCode::OK
}

impl Receiver {
    /// Starts one on 127.0.0.1, port 0, for the life of the runtime.
    pub async fn start() -> anyhow::Result<Receiver> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Receiver {
            url: format!("http://{addr}/hook"),
            seen,
        })
    }

    /// How many distinct payouts' `payout.paid` arrived.
    pub fn paid(&self) -> usize {
        self.seen.lock().expect("receiver lock").paid_lag.len()
    }

    /// The lag percentiles (p50, p99) in seconds of the paid messages.
    pub fn lag(&self) -> (f64, f64) {
        let mut v: Vec<f64> = self
            .seen
            .lock()
            .expect("receiver lock")
            .paid_lag
            .values()
            .copied()
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() - 1) as f64 * q).round() as usize]
            }
        };
        (at(0.5), at(0.99))
    }
}
