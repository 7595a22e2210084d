//! The simulated `/ws`: ComfyUI's table of sockets, one per client id.
//!
//! Why so literal: the orchestrator's hardest failures live here. As in
//! ComfyUI's `server.py`, a new socket with a client id replaces the old one
//! in the table (the old one stays open, and hears nothing more), and when
//! *any* socket with that id ends, the id's entry is removed, even if it now
//! belongs to a newer socket. `feature_flags` is answered only as a
//! socket's first message, and through the table, so it tells a client
//! whether its socket is the registered one.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Sim, Socket, S};

#[derive(Deserialize)]
pub(super) struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

pub(super) async fn ws(
    State(sim): State<S>,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = q
        .client_id
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| session(sim, client_id, socket))
}

/// Registers a socket for `client_id`, replacing any other, and greets it.
fn register(sim: &Sim, client_id: &str, tx: &mpsc::UnboundedSender<Message>) {
    let mut inner = sim.lock();
    inner.socket_opens += 1;
    inner.sockets.insert(
        client_id.to_string(),
        Socket {
            tx: tx.clone(),
            preview_metadata: false,
        },
    );
    let remaining = Sim::queue_remaining(&inner);
    let hello = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id}});
    let _ = tx.send(Message::Text(hello.to_string().into()));
    // Reconnecting while our prompt runs: re-send the current node, without a prompt id.
    if let Some(r) = &inner.running {
        if r.prompt.client_id.as_deref() == Some(client_id) {
            if let Some(node) = &r.node {
                let m = json!({"type": "executing", "data": {"node": node}});
                let _ = tx.send(Message::Text(m.to_string().into()));
            }
        }
    }
}

/// A socket's first message, when it is `feature_flags`: noted, and
/// answered through the table (so only the registered socket hears it).
fn first_message(sim: &Sim, client_id: &str, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if v["type"] != "feature_flags" {
        return;
    }
    let mut inner = sim.lock();
    if let Some(s) = inner.sockets.get_mut(client_id) {
        s.preview_metadata = v["data"]["supports_preview_metadata"] == true;
        let answer = json!({"type": "feature_flags", "data": super::http::features(sim)});
        let _ = s.tx.send(Message::Text(answer.to_string().into()));
    }
}

async fn session(sim: S, client_id: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let mut life = sim.life.subscribe();
    let mut hung = sim.hung.subscribe();
    let mut silence = sim.silence.subscribe();
    life.borrow_and_update();
    silence.borrow_and_update();
    register(&sim, &client_id, &tx);
    let mut first = true;
    loop {
        if *hung.borrow_and_update() {
            // A frozen box: nothing is read or written, pings included.
            tokio::select! {
                _ = hung.changed() => continue,
                _ = life.changed() => return,
            }
        }
        tokio::select! {
            out = rx.recv() => match out {
                Some(m) => {
                    if socket.send(m).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    if first {
                        first_message(&sim, &client_id, t.as_str());
                    }
                    first = false;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = hung.changed() => {}
            // A crash (or a stop): what was sent before it is on the wire; then the connection drops.
            _ = life.changed() => {
                while let Ok(m) = rx.try_recv() {
                    if socket.send(m).await.is_err() {
                        break;
                    }
                }
                return;
            }
            _ = silence.changed() => {
                // Dropped by a NAT: silent both ways until the server dies.
                let _ = life.changed().await;
                return;
            }
        }
    }
    // As ComfyUI's `finally`: the id's entry goes, whoever holds it now.
    sim.lock().sockets.remove(&client_id);
}
