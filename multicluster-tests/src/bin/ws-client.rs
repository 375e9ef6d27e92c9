//! A WebSocket client (tokio-tungstenite) for the network-namespace tests, run inside a
//! workload's namespace like any unmodified app: `ws-client ws://<name>/ws [messages]`. It
//! resolves the name through the pod's DNS, reads the server's greeting, sends each message and
//! checks the echo, then closes. Exit status 0 means every message came back.

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: ws-client ws://host/path [messages]")?;
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(20);
    let (mut ws, resp) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    anyhow::ensure!(resp.status() == 101, "expected 101, got {}", resp.status());
    let greeting = ws.next().await.context("no greeting")??;
    println!("greeting: {}", greeting.to_text()?);
    for i in 0..count {
        let msg = format!("message {i}");
        ws.send(Message::text(msg.clone())).await?;
        let echo = ws.next().await.context("connection closed before the echo")??;
        anyhow::ensure!(echo.to_text()? == msg, "echo {i} was {:?}", echo.to_text()?);
    }
    let big = vec![42u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await?;
    let echo = ws.next().await.context("no echo of the binary message")??;
    anyhow::ensure!(echo.into_data().to_vec() == big, "binary echo differs");
    ws.close(None).await?;
    println!("echoed {count} text messages and 256 KiB binary");
    Ok(())
}
