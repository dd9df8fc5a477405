//! A TCP proxy between a test and a real Redis, for the faults a real
//! server does not produce on demand (a dropped call, a refusal, a reply
//! that never comes). `act` sees each chunk the client sends and says what
//! becomes of it. Test-only.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What becomes of a chunk the client sent.
pub enum Act {
    Forward,
    /// Both ends dropped: Redis never sees it.
    Drop,
    /// Unanswered for this long, then dropped (a client's timeout passes).
    HoldThenDrop(Duration),
    /// Answered with these bytes instead of Redis; the connection stays.
    Answer(&'static [u8]),
}

/// The address of the Redis the tests use (`IDEM_REDIS_URL`'s first node).
pub fn redis_address() -> String {
    let url = std::env::var("IDEM_REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
    let first = url.split(',').next().unwrap_or_default();
    first
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string()
}

/// Whether `chunk` holds the command `name` (as RESP sends it: a bulk
/// string of its own, so `CLIENT SETINFO` is not `INFO`).
pub fn sends_command(chunk: &[u8], name: &str) -> bool {
    let wanted = format!("${}\r\n{name}\r\n", name.len());
    chunk
        .windows(wanted.len())
        .any(|w| w.eq_ignore_ascii_case(wanted.as_bytes()))
}

/// A proxy on a free loopback port to `upstream`; returns the port.
pub async fn proxy(upstream: String, act: impl Fn(&[u8]) -> Act + Send + Sync + 'static) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let act = Arc::new(act);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, act) = (upstream.clone(), act.clone());
            tokio::spawn(async move { forward(client, &upstream, &*act).await });
        }
    });
    port
}

async fn forward(
    mut client: TcpStream,
    upstream: &str,
    act: &(dyn Fn(&[u8]) -> Act + Send + Sync),
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut up, mut down) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        tokio::select! {
            n = client.read(&mut up) => {
                let Ok(n @ 1..) = n else { return };
                match act(&up[..n]) {
                    Act::Forward => {
                        if server.write_all(&up[..n]).await.is_err() {
                            return;
                        }
                    }
                    Act::Drop => return,
                    Act::HoldThenDrop(hold) => {
                        tokio::time::sleep(hold).await;
                        return;
                    }
                    Act::Answer(reply) => {
                        if client.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            }
            n = server.read(&mut down) => {
                let Ok(n @ 1..) = n else { return };
                if client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
