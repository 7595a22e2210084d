//! A backend's WebSocket: opening it (with the backend's headers, over TLS
//! for an `https://` backend) and reading ComfyUI's messages from it.
//!
//! Why apart from the HTTP calls: the socket lives as long as the worker's
//! connection to its box and is read message by message, where each HTTP
//! call is one request and its answer; what a message means is
//! `protocol.rs`'s.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ComfyClient, ComfyError, WsEvent};

/// The backend's WebSocket, yielding parsed events.
pub struct EventStream {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl EventStream {
    /// The next event; `None` when the socket closed. A broken socket is an error.
    pub async fn next(&mut self) -> Option<Result<WsEvent, ComfyError>> {
        loop {
            let msg = self.ws.next().await?;
            return Some(match msg {
                Ok(Message::Text(t)) => Ok(WsEvent::parse_text(t.as_str())),
                Ok(Message::Binary(b)) => Ok(WsEvent::Preview(b)),
                Ok(Message::Pong(_)) => Ok(WsEvent::Pong),
                // tungstenite answers pings by itself.
                Ok(Message::Ping(_)) => continue,
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => Err(ComfyError::Unreachable(e.to_string())),
            });
        }
    }

    /// Sends a ping; the answer comes back as [`WsEvent::Pong`].
    pub async fn ping(&mut self) -> Result<(), ComfyError> {
        self.ws
            .send(Message::Ping(Bytes::from_static(b"orchestrator")))
            .await
            .map_err(|e| ComfyError::Unreachable(e.to_string()))
    }

    /// Sends our `feature_flags` (as the first message): ComfyUI answers it
    /// through its table of sockets, so the answer proves that this socket
    /// is the one our prompts' messages go to.
    pub async fn probe(&mut self) -> Result<(), ComfyError> {
        let m = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
        self.ws
            .send(Message::Text(m.to_string().into()))
            .await
            .map_err(|e| ComfyError::Unreachable(e.to_string()))
    }

    /// Closes the socket and waits (at most `wait`) for the server to close
    /// its end. ComfyUI forgets a client id's socket when *any* socket with
    /// that id ends: an old socket must be gone before its replacement opens.
    pub async fn close(mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            if self.ws.close(None).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

impl ComfyClient {
    /// Opens `GET /ws?clientId=...`.
    pub async fn connect(&self) -> Result<EventStream, ComfyError> {
        let url = format!("{}/ws?clientId={}", self.ws_base, self.client_id);
        // A socket per backend, mostly quiet: small buffers (tungstenite's
        // default is 128 KiB each way, 256 MB on a farm of 1,000 boxes); a
        // bigger message (a preview frame) still grows the read buffer.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0);
        let mut request = url
            .into_client_request()
            .map_err(|e| ComfyError::Unreachable(format!("{}/ws: {e}", self.ws_base)))?;
        request.headers_mut().extend(self.headers.clone());
        // Boxed: with TLS compiled in, the connect's state machine is about
        // 10 KB (a TLS handshake's, kept inline whatever the scheme), and
        // inline it would sit in every backend's worker task for the
        // worker's whole life (13 MB on a farm of 1,000 boxes), not only
        // while a socket opens.
        let connect = Box::pin(tokio_tungstenite::connect_async_with_config(
            request,
            Some(config),
            true,
        ));
        let (ws, _) = tokio::time::timeout(self.connections.timeout, connect)
            .await
            .map_err(|_| ComfyError::Timeout(self.connections.timeout))?
            .map_err(|e| ComfyError::Unreachable(crate::with_causes(&e)))?;
        Ok(EventStream { ws })
    }
}
