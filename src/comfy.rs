//! The ComfyUI protocol client: HTTP calls and the WebSocket, nothing else.
//!
//! Why a module that knows nothing of jobs or the database: the protocol is
//! ComfyUI's (see `shared/comfyui/PROTOCOL.md` and the recorded exchanges),
//! and keeping it in one place means one place to check against a real
//! server. Every call has a timeout; a backend that hangs or answers garbage
//! is a [`ComfyError`] for that backend, never a stuck or crashed caller. No
//! request carries an `Origin` header (ComfyUI refuses foreign origins).

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What can go wrong talking to a backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComfyError {
    /// No connection, or the connection broke.
    #[error("cannot reach the backend: {0}")]
    Unreachable(String),
    /// The call took longer than the timeout.
    #[error("the backend did not answer within {0:?}")]
    Timeout(Duration),
    /// An answer we cannot use (not JSON, wrong shape, unexpected status).
    #[error("the backend answered something unusable: {0}")]
    BadResponse(String),
    /// `POST /prompt` answered `400`: the graph is invalid on this backend.
    #[error("the backend rejected the prompt: {}", rejection_summary(.0))]
    Rejected(Value),
}

/// One sentence from a `400` body of `POST /prompt`: the error and each node's errors.
pub fn rejection_summary(body: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = body["error"]["message"].as_str() {
        let details = body["error"]["details"].as_str().unwrap_or("");
        parts.push(if details.is_empty() {
            m.to_string()
        } else {
            format!("{m} ({details})")
        });
    }
    if let Some(nodes) = body["node_errors"].as_object() {
        for (node, e) in nodes {
            let class = e["class_type"].as_str().unwrap_or("?");
            for err in e["errors"].as_array().into_iter().flatten() {
                parts.push(format!(
                    "node {node} ({class}): {}{}",
                    err["message"].as_str().unwrap_or("error"),
                    err["details"]
                        .as_str()
                        .filter(|d| !d.is_empty())
                        .map(|d| format!(" [{d}]"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if parts.is_empty() {
        body.to_string()
    } else {
        parts.join("; ")
    }
}

/// A file that ComfyUI lists in `/history` outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    /// Node that produced it.
    pub node_id: String,
    /// Output kind (`images`, `gifs`, `videos`, `audio`, ...).
    pub kind: String,
    /// Name on the backend (untrusted).
    pub filename: String,
    /// Sub-folder on the backend (untrusted).
    pub subfolder: String,
    /// `output` or `temp`.
    pub file_type: String,
}

/// What `/history/{prompt_id}` says about a finished prompt.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// `success` or `error`.
    pub status_str: String,
    /// ComfyUI's `completed` flag.
    pub completed: bool,
    /// Files it produced.
    pub outputs: Vec<OutputFile>,
    /// `[event, data]` pairs (`execution_error`, `execution_interrupted`, ...).
    pub messages: Vec<(String, Value)>,
}

impl HistoryEntry {
    /// Parses one entry of `/history` (the value under the prompt id).
    pub fn parse(v: &Value) -> Result<HistoryEntry, ComfyError> {
        let status = v
            .get("status")
            .ok_or_else(|| ComfyError::BadResponse("history entry without status".into()))?;
        let mut outputs = Vec::new();
        if let Some(nodes) = v.get("outputs").and_then(Value::as_object) {
            for (node_id, kinds) in nodes {
                let Some(kinds) = kinds.as_object() else {
                    continue;
                };
                for (kind, files) in kinds {
                    // Only lists of file entries are files; custom nodes put text and other values here too.
                    for f in files.as_array().into_iter().flatten() {
                        if let (Some(filename), Some(file_type)) =
                            (f["filename"].as_str(), f["type"].as_str())
                        {
                            outputs.push(OutputFile {
                                node_id: node_id.clone(),
                                kind: kind.clone(),
                                filename: filename.to_string(),
                                subfolder: f["subfolder"].as_str().unwrap_or("").to_string(),
                                file_type: file_type.to_string(),
                            });
                        }
                    }
                }
            }
        }
        let messages = status["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let a = m.as_array()?;
                Some((
                    a.first()?.as_str()?.to_string(),
                    a.get(1).cloned().unwrap_or(Value::Null),
                ))
            })
            .collect();
        Ok(HistoryEntry {
            status_str: status["status_str"].as_str().unwrap_or("").to_string(),
            completed: status["completed"].as_bool().unwrap_or(false),
            outputs,
            messages,
        })
    }

    /// The data of the first message of this kind.
    pub fn message(&self, kind: &str) -> Option<&Value> {
        self.messages
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, d)| d)
    }
}

/// Prompt ids in ComfyUI's queue.
#[derive(Debug, Clone, Default)]
pub struct QueueState {
    /// Running now.
    pub running: Vec<String>,
    /// Waiting.
    pub pending: Vec<String>,
}

impl QueueState {
    /// Is this prompt running or waiting there?
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.running
            .iter()
            .chain(&self.pending)
            .any(|p| p == prompt_id)
    }
}

/// What `/system_stats` says.
#[derive(Debug, Clone, Default)]
pub struct SystemStats {
    /// `system.comfyui_version`.
    pub comfyui_version: Option<String>,
    /// First device's VRAM, bytes.
    pub vram_total: Option<i64>,
    /// First device's free VRAM, bytes.
    pub vram_free: Option<i64>,
}

/// Oldest version with client-chosen prompt ids (0.3.44).
pub const MIN_VERSION: (u32, u32, u32) = (0, 3, 44);

/// Parses `"0.3.64"` (with an optional leading `v` or trailing text).
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next().and_then(|s| s.parse().ok()).unwrap_or(0),
    ))
}

/// A message from the backend's WebSocket that the dispatcher cares about.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    /// Queue length (sent to everyone).
    Status {
        /// Prompts left.
        queue_remaining: Option<i64>,
    },
    /// A prompt started.
    ExecutionStart {
        /// Prompt.
        prompt_id: String,
    },
    /// A node runs. `node: None` with a prompt id: the prompt is finished.
    /// `prompt_id: None`: re-sent on reconnect for the running prompt.
    Executing {
        /// Prompt, when given.
        prompt_id: Option<String>,
        /// Node, or `None` at the end.
        node: Option<String>,
    },
    /// Sampler steps of a node.
    Progress {
        /// Prompt.
        prompt_id: Option<String>,
        /// Node.
        node: Option<String>,
        /// Step.
        value: f64,
        /// Steps.
        max: f64,
    },
    /// An output node produced files.
    Executed {
        /// Prompt.
        prompt_id: String,
        /// Node.
        node: String,
    },
    /// Finished well (history may not be written yet: wait for `Executing { node: None }`).
    ExecutionSuccess {
        /// Prompt.
        prompt_id: String,
    },
    /// Failed at run time.
    ExecutionError {
        /// Prompt.
        prompt_id: String,
        /// The whole message data.
        data: Value,
    },
    /// Interrupted.
    ExecutionInterrupted {
        /// Prompt.
        prompt_id: String,
        /// The whole message data.
        data: Value,
    },
    /// A binary preview frame (relayed or dropped, never parsed as JSON).
    Preview(Bytes),
    /// Anything else (`progress_state`, `execution_cached`, `feature_flags`, ...).
    Other(String),
}

impl WsEvent {
    /// Parses one text frame; garbage is `Other`, never an error.
    pub fn parse_text(text: &str) -> WsEvent {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return WsEvent::Other("unparsable".into());
        };
        let kind = v["type"].as_str().unwrap_or("").to_string();
        let d = &v["data"];
        let pid = || d["prompt_id"].as_str().map(str::to_string);
        match kind.as_str() {
            "status" => WsEvent::Status {
                queue_remaining: d["status"]["exec_info"]["queue_remaining"].as_i64(),
            },
            "execution_start" => match pid() {
                Some(prompt_id) => WsEvent::ExecutionStart { prompt_id },
                None => WsEvent::Other(kind),
            },
            "executing" => WsEvent::Executing {
                prompt_id: pid(),
                node: d["node"].as_str().map(str::to_string),
            },
            "progress" => WsEvent::Progress {
                prompt_id: pid(),
                node: d["node"].as_str().map(str::to_string),
                value: d["value"].as_f64().unwrap_or(0.0),
                max: d["max"].as_f64().unwrap_or(0.0),
            },
            "executed" => match (pid(), d["node"].as_str()) {
                (Some(prompt_id), Some(node)) => WsEvent::Executed {
                    prompt_id,
                    node: node.to_string(),
                },
                _ => WsEvent::Other(kind),
            },
            "execution_success" => match pid() {
                Some(prompt_id) => WsEvent::ExecutionSuccess { prompt_id },
                None => WsEvent::Other(kind),
            },
            "execution_error" => match pid() {
                Some(prompt_id) => WsEvent::ExecutionError {
                    prompt_id,
                    data: d.clone(),
                },
                None => WsEvent::Other(kind),
            },
            "execution_interrupted" => match pid() {
                Some(prompt_id) => WsEvent::ExecutionInterrupted {
                    prompt_id,
                    data: d.clone(),
                },
                None => WsEvent::Other(kind),
            },
            _ => WsEvent::Other(kind),
        }
    }

    /// The prompt this event is about, if it says.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            WsEvent::ExecutionStart { prompt_id }
            | WsEvent::Executed { prompt_id, .. }
            | WsEvent::ExecutionSuccess { prompt_id }
            | WsEvent::ExecutionError { prompt_id, .. }
            | WsEvent::ExecutionInterrupted { prompt_id, .. } => Some(prompt_id),
            WsEvent::Executing { prompt_id, .. } | WsEvent::Progress { prompt_id, .. } => {
                prompt_id.as_deref()
            }
            _ => None,
        }
    }
}

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
                Ok(Message::Ping(p)) => {
                    let _ = self.ws.send(Message::Pong(p)).await;
                    continue;
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(e) => Err(ComfyError::Unreachable(e.to_string())),
            });
        }
    }
}

/// A client for one ComfyUI server.
#[derive(Clone)]
pub struct ComfyClient {
    base: String,
    ws_base: String,
    client_id: String,
    http: reqwest::Client,
    timeout: Duration,
}

fn net_error(e: reqwest::Error, timeout: Duration) -> ComfyError {
    if e.is_timeout() {
        ComfyError::Timeout(timeout)
    } else if e.is_decode() || e.is_body() {
        ComfyError::BadResponse(e.to_string())
    } else {
        ComfyError::Unreachable(e.to_string())
    }
}

impl ComfyClient {
    /// A client for `host:port`, identifying itself with `client_id`.
    pub fn new(host: &str, port: u16, client_id: &str, timeout: Duration) -> ComfyClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(8)
            .build()
            .expect("http client");
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        ComfyClient {
            base: format!("http://{host}:{port}"),
            ws_base: format!("ws://{host}:{port}"),
            client_id: client_id.to_string(),
            http,
            timeout,
        }
    }

    /// The base URL, for logs.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn json_of(&self, r: reqwest::Response) -> Result<Value, ComfyError> {
        let status = r.status();
        let body = r.bytes().await.map_err(|e| net_error(e, self.timeout))?;
        if !status.is_success() {
            return Err(ComfyError::BadResponse(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ComfyError::BadResponse(format!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })
    }

    async fn get_json(&self, path: &str) -> Result<Value, ComfyError> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| net_error(e, self.timeout))?;
        self.json_of(r).await
    }

    async fn post_empty(&self, path: &str, body: Value) -> Result<(), ComfyError> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| net_error(e, self.timeout))?;
        if !r.status().is_success() {
            return Err(ComfyError::BadResponse(format!(
                "HTTP {} on {path}",
                r.status()
            )));
        }
        Ok(())
    }

    /// `POST /prompt` with our prompt id and client id. `Rejected` carries
    /// ComfyUI's `400` body (error and node_errors).
    pub async fn submit(&self, prompt_id: &str, graph: &Value) -> Result<(), ComfyError> {
        let body = json!({
            "prompt": graph,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        });
        let r = self
            .http
            .post(format!("{}/prompt", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| net_error(e, self.timeout))?;
        if r.status() == reqwest::StatusCode::BAD_REQUEST {
            let body = r.bytes().await.map_err(|e| net_error(e, self.timeout))?;
            let v: Value = serde_json::from_slice(&body).map_err(|_| {
                ComfyError::BadResponse(format!(
                    "400 without JSON: {}",
                    String::from_utf8_lossy(&body)
                ))
            })?;
            return Err(ComfyError::Rejected(v));
        }
        let v = self.json_of(r).await?;
        match v["prompt_id"].as_str() {
            Some(p) if p == prompt_id => Ok(()),
            Some(other) => Err(ComfyError::BadResponse(format!(
                "asked for prompt id {prompt_id}, got {other} (ComfyUI older than 0.3.44?)"
            ))),
            None => Err(ComfyError::BadResponse(format!(
                "no prompt_id in answer: {v}"
            ))),
        }
    }

    /// `GET /history/{prompt_id}`: `None` when the backend does not know it.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let v = self.get_json(&format!("/history/{prompt_id}")).await?;
        let obj = v
            .as_object()
            .ok_or_else(|| ComfyError::BadResponse("history is not an object".into()))?;
        match obj.get(prompt_id) {
            None => Ok(None),
            Some(entry) => HistoryEntry::parse(entry).map(Some),
        }
    }

    /// `GET /queue`: prompt ids running and waiting.
    pub async fn queue(&self) -> Result<QueueState, ComfyError> {
        let v = self.get_json("/queue").await?;
        let ids = |key: &str| -> Result<Vec<String>, ComfyError> {
            v[key]
                .as_array()
                .ok_or_else(|| ComfyError::BadResponse(format!("/queue without {key}")))?
                .iter()
                .map(|item| {
                    item.get(1)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            ComfyError::BadResponse("queue item without prompt id".into())
                        })
                })
                .collect()
        };
        Ok(QueueState {
            running: ids("queue_running")?,
            pending: ids("queue_pending")?,
        })
    }

    /// `GET /system_stats`.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let v = self.get_json("/system_stats").await?;
        let version = v["system"]["comfyui_version"].as_str().map(str::to_string);
        if v.get("system").is_none() {
            return Err(ComfyError::BadResponse(
                "/system_stats without system".into(),
            ));
        }
        let dev = &v["devices"][0];
        Ok(SystemStats {
            comfyui_version: version,
            vram_total: dev["vram_total"].as_i64(),
            vram_free: dev["vram_free"].as_i64(),
        })
    }

    /// `GET /prompt`: prompts left in the queue.
    pub async fn queue_remaining(&self) -> Result<i64, ComfyError> {
        let v = self.get_json("/prompt").await?;
        v["exec_info"]["queue_remaining"].as_i64().ok_or_else(|| {
            ComfyError::BadResponse("/prompt without exec_info.queue_remaining".into())
        })
    }

    /// `GET /view` of one output, as a response to stream from.
    pub async fn view(&self, f: &OutputFile) -> Result<reqwest::Response, ComfyError> {
        let r = self
            .http
            .get(format!("{}/view", self.base))
            .query(&[
                ("filename", &f.filename),
                ("subfolder", &f.subfolder),
                ("type", &f.file_type),
            ])
            // Outputs can be large videos: no overall timeout, but a stall still ends (read timeout).
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(|e| net_error(e, self.timeout))?;
        if !r.status().is_success() {
            return Err(ComfyError::BadResponse(format!(
                "/view of {} answered HTTP {}",
                f.filename,
                r.status()
            )));
        }
        Ok(r)
    }

    /// `POST /history {"delete": [...]}`: forget finished prompts.
    pub async fn delete_history(&self, prompt_ids: &[String]) -> Result<(), ComfyError> {
        self.post_empty("/history", json!({ "delete": prompt_ids }))
            .await
    }

    /// `POST /queue {"delete": [...]}`: remove pending prompts.
    pub async fn delete_queued(&self, prompt_ids: &[String]) -> Result<(), ComfyError> {
        self.post_empty("/queue", json!({ "delete": prompt_ids }))
            .await
    }

    /// `POST /interrupt {"prompt_id"}`: stop it if it is the running prompt.
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), ComfyError> {
        self.post_empty("/interrupt", json!({ "prompt_id": prompt_id }))
            .await
    }

    /// Opens `GET /ws?clientId=...`.
    pub async fn connect(&self) -> Result<EventStream, ComfyError> {
        let url = format!("{}/ws?clientId={}", self.ws_base, self.client_id);
        let (ws, _) = tokio::time::timeout(self.timeout, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| ComfyError::Timeout(self.timeout))?
            .map_err(|e| ComfyError::Unreachable(e.to_string()))?;
        Ok(EventStream { ws })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("0.3.64"), Some((0, 3, 64)));
        assert_eq!(parse_version("v0.3.44-rc1"), Some((0, 3, 44)));
        assert!(parse_version("0.3.43").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn garbage_frames_are_other_never_errors() {
        assert_eq!(
            WsEvent::parse_text("not json"),
            WsEvent::Other("unparsable".into())
        );
        assert_eq!(
            WsEvent::parse_text("{\"type\": 5}"),
            WsEvent::Other("".into())
        );
        assert_eq!(
            WsEvent::parse_text(r#"{"type":"executing","data":{"node":"2"}}"#),
            WsEvent::Executing {
                prompt_id: None,
                node: Some("2".into())
            }
        );
    }
}
