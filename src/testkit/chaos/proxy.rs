//! A small TCP proxy for network faults on loopback (`tc netem` is not
//! available on these machines). The workers reach Redis and the gateway
//! through one each, the producer reaches Redis through its own; the harness
//! switches a proxy's [`Mode`] at run time:
//!
//! - [`Mode::Pass`]: bytes flow both ways;
//! - [`Mode::Delay`]: every chunk waits before it is forwarded (latency);
//! - [`Mode::Blackhole`]: connections stay open but every byte is swallowed
//!   and new connections are accepted and never answered (a partition: the
//!   peer only finds out by its own timeouts). A connection that lost bytes
//!   cannot be resumed, so it is reset when the partition heals;
//! - [`Mode::Reset`]: every open connection is reset (TCP RST) and new
//!   ones are reset on arrival;
//! - [`Mode::DropContaining`]: client chunks containing a pattern are
//!   swallowed, everything else passes (one kind of request is lost in the
//!   network, e.g. the producer's job pushes but not its leader lock).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward.
    Pass,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Swallow everything; answer nothing.
    Blackhole,
    /// Reset every connection.
    Reset,
    /// Swallow client-to-upstream chunks containing this pattern; pass the rest.
    DropContaining(&'static str),
}

/// Counters of one proxy.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections reset by a fault (not by a peer).
    pub reset: AtomicU64,
    /// Bytes swallowed by a blackhole.
    pub swallowed_bytes: AtomicU64,
}

/// A running proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    name: String,
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    upstream: watch::Sender<SocketAddr>,
    stop: CancellationToken,
    stats: Arc<ProxyStats>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(name: &str, upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (upstream, upstream_rx) = watch::channel(upstream);
        let stop = CancellationToken::new();
        let stats = Arc::new(ProxyStats::default());
        tokio::spawn(accept_loop(
            listener,
            upstream_rx,
            mode_rx,
            stop.clone(),
            stats.clone(),
        ));
        Ok(Proxy {
            name: name.to_string(),
            addr,
            mode,
            upstream,
            stop,
            stats,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode; open connections follow at once.
    pub fn set(&self, mode: Mode) {
        tracing::info!(proxy = %self.name, ?mode, "proxy mode");
        self.mode.send_replace(mode);
    }

    /// Points new connections at `addr` (what a DNS name or HAProxy does
    /// when a standby is promoted); open connections keep their upstream.
    pub fn set_upstream(&self, addr: SocketAddr) {
        tracing::info!(proxy = %self.name, %addr, "proxy upstream");
        self.upstream.send_replace(addr);
    }

    /// The counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: watch::Receiver<SocketAddr>,
    mode: watch::Receiver<Mode>,
    stop: CancellationToken,
    stats: Arc<ProxyStats>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((client, _)) => {
                let _ = client.set_nodelay(true);
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let to = *upstream.borrow();
                tokio::spawn(connection(
                    client,
                    to,
                    mode.clone(),
                    stop.clone(),
                    stats.clone(),
                ));
            }
            // Out of file descriptors and the like: wait a little, go on.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Closes with SO_LINGER 0: the peer gets a TCP RST, not a FIN.
fn reset(stream: Option<TcpStream>, stats: &ProxyStats) {
    if let Some(s) = stream {
        let _ = s.set_zero_linger();
        stats.reset.fetch_add(1, Ordering::Relaxed);
    }
}

async fn read_opt(s: Option<&mut TcpStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match s {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// What to do with a chunk that arrived from one side.
enum Forward {
    Write,
    Swallow,
    Reset,
}

/// The rule for `chunk`, sent by the client (`from_client`) or the upstream.
fn forward_rule(mode: Mode, chunk: &[u8], from_client: bool) -> (Forward, Option<Duration>) {
    match mode {
        Mode::Pass => (Forward::Write, None),
        Mode::Delay(d) => (Forward::Write, Some(d)),
        Mode::Blackhole => (Forward::Swallow, None),
        Mode::Reset => (Forward::Reset, None),
        Mode::DropContaining(p) => {
            let hit = from_client && chunk.windows(p.len()).any(|w| w == p.as_bytes());
            (
                if hit {
                    Forward::Swallow
                } else {
                    Forward::Write
                },
                None,
            )
        }
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
    stats: Arc<ProxyStats>,
) {
    let mut client = Some(client);
    let mut up: Option<TcpStream> = None;
    // Copied out: a watch borrow must not be held across an await.
    let initial = *mode.borrow_and_update();
    match initial {
        Mode::Reset => return reset(client, &stats),
        Mode::Blackhole => {}
        Mode::Pass | Mode::Delay(_) | Mode::DropContaining(_) => {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(upstream)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    up = Some(s);
                }
                // Upstream down: the client sees its connection reset, as if refused.
                _ => return reset(client, &stats),
            }
        }
    }
    // A connection that lost bytes to a blackhole is desynchronised for good.
    let mut swallowed = false;
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    loop {
        let c = client.as_mut().expect("client present while looping");
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *mode.borrow_and_update();
                match now {
                    Mode::Reset => {
                        reset(client, &stats);
                        return reset(up, &stats);
                    }
                    Mode::Blackhole => {}
                    Mode::Pass | Mode::Delay(_) | Mode::DropContaining(_) => {
                        if swallowed || up.is_none() {
                            reset(client, &stats);
                            return reset(up, &stats);
                        }
                    }
                }
            }
            r = c.read(&mut cbuf) => {
                let n = match r {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(_) => return reset(up, &stats),
                };
                let now = *mode.borrow();
                // Once a request was lost, later ones on this connection would
                // get its answers: the connection stays cut, as a partition would.
                let (rule, delay) = if swallowed && matches!(now, Mode::DropContaining(_)) {
                    (Forward::Swallow, None)
                } else {
                    forward_rule(now, &cbuf[..n], true)
                };
                match rule {
                    Forward::Swallow => {
                        swallowed = true;
                        stats.swallowed_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Forward::Reset => {
                        reset(client, &stats);
                        return reset(up, &stats);
                    }
                    Forward::Write => {
                        if let Some(d) = delay {
                            tokio::time::sleep(d).await;
                        }
                        let Some(u) = up.as_mut() else {
                            return reset(client, &stats);
                        };
                        if u.write_all(&cbuf[..n]).await.is_err() {
                            return reset(client, &stats);
                        }
                    }
                }
            }
            r = read_opt(up.as_mut(), &mut ubuf) => {
                let n = match r {
                    Ok(0) => return,
                    Ok(n) => n,
                    // Upstream reset (e.g. Redis killed): pass the reset on.
                    Err(_) => return reset(client, &stats),
                };
                let (rule, delay) = forward_rule(*mode.borrow(), &ubuf[..n], false);
                match rule {
                    Forward::Swallow => {
                        swallowed = true;
                        stats.swallowed_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Forward::Reset => {
                        reset(client, &stats);
                        return reset(up, &stats);
                    }
                    Forward::Write => {
                        if let Some(d) = delay {
                            tokio::time::sleep(d).await;
                        }
                        let c = client.as_mut().expect("client present while looping");
                        if c.write_all(&ubuf[..n]).await.is_err() {
                            return reset(up, &stats);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn pass_delay_blackhole_and_reset_behave_as_named() {
        let proxy = Proxy::start("test", echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");

        proxy.set(Mode::Delay(Duration::from_millis(100)));
        let t = std::time::Instant::now();
        assert_eq!(roundtrip(&mut s, b"slow").await.unwrap(), b"slow");
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );

        proxy.set(Mode::Blackhole);
        s.write_all(b"lost").await.unwrap();
        let mut buf = [0u8; 4];
        let silent = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(silent.is_err(), "a blackhole answers nothing");
        // Healing resets the connection that lost bytes; a new one works.
        proxy.set(Mode::Pass);
        let after = s.read(&mut buf).await;
        assert!(matches!(after, Err(_) | Ok(0)), "{after:?}");
        let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s2, b"again").await.unwrap(), b"again");

        proxy.set(Mode::Reset);
        let err = s2.read(&mut buf).await;
        assert_eq!(
            err.map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::ConnectionReset
        );
        assert!(proxy.stats().reset.load(Ordering::Relaxed) >= 2);

        // Only chunks with the pattern are lost.
        proxy.set(Mode::DropContaining("push"));
        let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s3, b"ping").await.unwrap(), b"ping");
        s3.write_all(b"push 1").await.unwrap();
        let lost = tokio::time::timeout(Duration::from_millis(300), s3.read(&mut buf)).await;
        assert!(lost.is_err(), "the matching chunk got no answer");
        assert!(proxy.stats().swallowed_bytes.load(Ordering::Relaxed) >= 4);
    }
}
