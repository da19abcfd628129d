//! A webhook receiver for the benchmark: accepts every POST (200), and for
//! each `payout.paid` message records the payout and the lag from the event's
//! timestamp (the payout recorded paid) to its arrival.

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

async fn hook(State(seen): State<Arc<Mutex<Seen>>>, body: Bytes) -> StatusCode {
    // The wall clock on purpose: the lag is measured against the fleet's.
    let now = Utc::now();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = seen.lock().expect("receiver lock");
    s.requests += 1;
    if v["type"] == "payout.paid"
        && let (Some(id), Some(at)) = (
            v["data"]["id"].as_i64(),
            v["timestamp"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok()),
        )
    {
        let lag = (now - at.with_timezone(&Utc))
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e6;
        s.paid_lag.entry(id).or_insert(lag);
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
