//! The ComfyUI protocol: HTTP calls, the WebSocket, and what their answers
//! mean. Nothing else in the service knows ComfyUI's routes or field names.
//!
//! Why a module that knows nothing of jobs or the database: the protocol is
//! ComfyUI's (`docs/architecture.md` lists what we rely on; the recorded
//! exchanges in `tests/fixtures/comfyui/` are the ground truth), and keeping
//! it in one place means one place to check against a real server. Every
//! call has a timeout and every answer a size cap: a backend that hangs or
//! answers garbage is a [`ComfyError`] for that backend, never a stuck or
//! crashed caller, nor memory growth. No request carries an `Origin` header
//! (ComfyUI refuses foreign origins).

mod error;
pub mod graph;
mod protocol;
mod socket;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

pub use error::ComfyError;
use error::{credentials_hint, net_error};
pub use protocol::*;
pub use socket::EventStream;

/// Size caps on what a backend may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A JSON answer (`/history`, `/queue`, `/object_info`).
    pub max_reply_bytes: u64,
    /// One output file (`/view`).
    pub max_output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_reply_bytes: 64 << 20,
            max_output_bytes: 16 << 30,
        }
    }
}

/// A client for one ComfyUI server.
#[derive(Clone)]
pub struct ComfyClient {
    base: String,
    ws_base: String,
    /// Sent with every request (a proxy's `Authorization`).
    headers: reqwest::header::HeaderMap,
    client_id: String,
    connections: Connections,
    limits: Limits,
}

/// How long an unused connection to a backend is kept.
const IDLE_CONNECTION: Duration = Duration::from_secs(3);

/// The HTTP clients (and their pools of kept connections) that backends'
/// clients share.
///
/// Why shared: connections are pooled per host and port inside a client, so
/// one pair serves a whole farm as a pair per backend would, without a
/// thousand copies of each client's machinery (its connector, resolver and
/// pool: about 6 MB on a farm of 1,000, measured with heaptrack).
#[derive(Clone)]
pub struct Connections {
    http: reqwest::Client,
    /// For `/view`: no overall timeout (large videos), but a read timeout.
    downloads: reqwest::Client,
    timeout: Duration,
}

impl Connections {
    /// Clients whose requests time out after `timeout` (a download: after
    /// `timeout` without a byte).
    pub fn new(timeout: Duration) -> Connections {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(8)
            // A kept connection holds about 25 KB of buffers: a farm of a
            // thousand quiet boxes (polled every few seconds) would keep
            // 25 MB for the price of a connect per quiet poll.
            .pool_idle_timeout(IDLE_CONNECTION)
            .build()
            .expect("http client");
        let downloads = reqwest::Client::builder()
            // An idle download connection holds a buffer grown to the size
            // of the outputs it carried: let it go once the box is quiet.
            .pool_idle_timeout(IDLE_CONNECTION)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .read_timeout(timeout)
            .build()
            .expect("http client");
        Connections {
            http,
            downloads,
            timeout,
        }
    }
}

impl ComfyClient {
    /// A client for `host:port`, identifying itself with `client_id`.
    pub fn new(host: &str, port: u16, client_id: &str, timeout: Duration) -> ComfyClient {
        ComfyClient::with_limits(host, port, client_id, timeout, Limits::default())
    }

    /// A client with size caps of its own.
    pub fn with_limits(
        host: &str,
        port: u16,
        client_id: &str,
        timeout: Duration,
        limits: Limits,
    ) -> ComfyClient {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        ComfyClient::sharing(
            &Connections::new(timeout),
            &format!("http://{host}:{port}"),
            reqwest::header::HeaderMap::new(),
            client_id,
            limits,
        )
    }

    /// A client for the ComfyUI at `base` (`http://host:port`, or an
    /// `https://` address behind a proxy, with a path or not) that sends
    /// `headers` with every request and makes its requests through
    /// `connections`, which other backends' clients may share.
    pub fn sharing(
        connections: &Connections,
        base: &str,
        headers: reqwest::header::HeaderMap,
        client_id: &str,
        limits: Limits,
    ) -> ComfyClient {
        let base = base.trim_end_matches('/').to_string();
        let ws_base = match base.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some((_, rest)) => format!("ws://{rest}"),
            None => format!("ws://{base}"),
        };
        ComfyClient {
            base,
            ws_base,
            headers,
            client_id: client_id.to_string(),
            connections: connections.clone(),
            limits,
        }
    }

    /// The base URL, for logs.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The timeout of each call.
    pub fn timeout(&self) -> Duration {
        self.connections.timeout
    }

    /// Reads a whole answer, refusing one over the cap.
    /// A request to `path` on this backend through `client` (the farm's
    /// shared one for calls, or the one for transfers), with its headers.
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        client
            .request(method, format!("{}{path}", self.base))
            .headers(self.headers.clone())
    }

    async fn body(&self, mut r: reqwest::Response) -> Result<Vec<u8>, ComfyError> {
        let cap = self.limits.max_reply_bytes;
        if r.content_length().is_some_and(|n| n > cap) {
            return Err(ComfyError::BadResponse(format!(
                "an answer over {cap} bytes"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r
            .chunk()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?
        {
            if body.len() as u64 + chunk.len() as u64 > cap {
                return Err(ComfyError::BadResponse(format!(
                    "an answer over {cap} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn json_of(&self, r: reqwest::Response) -> Result<Value, ComfyError> {
        let status = r.status();
        let body = self.body(r).await?;
        if !status.is_success() {
            return Err(ComfyError::BadResponse(format!(
                "HTTP {status}{}: {}",
                credentials_hint(status),
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
        self.get_json_with(path, false).await
    }

    /// `close`: for a large answer (`/object_info`), read on a connection of
    /// its own that closes after it; a kept connection would hold a read
    /// buffer grown to the answer's size for as long as it lives (0.4 MB a
    /// backend with the simulator's definitions, more with custom nodes).
    async fn get_json_with(&self, path: &str, close: bool) -> Result<Value, ComfyError> {
        let mut request = self.request(&self.connections.http, reqwest::Method::GET, path);
        if close {
            request = request.header(reqwest::header::CONNECTION, "close");
        }
        let r = request
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        self.json_of(r).await
    }

    async fn post_empty(&self, path: &str, body: Value) -> Result<(), ComfyError> {
        let r = self
            .request(&self.connections.http, reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        if !r.status().is_success() {
            return Err(ComfyError::BadResponse(format!(
                "HTTP {} on {path}{}",
                r.status(),
                credentials_hint(r.status())
            )));
        }
        Ok(())
    }

    /// `POST /prompt` with our prompt id and client id. A refusal (a `4xx`,
    /// or a `200` whose `node_errors` name broken outputs) is `Rejected`.
    pub async fn submit(&self, prompt_id: &str, graph: &Value) -> Result<(), ComfyError> {
        let body = json!({
            "prompt": graph,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        });
        let r = self
            .request(&self.connections.http, reqwest::Method::POST, "/prompt")
            .json(&body)
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        let status = r.status();
        if status.is_client_error() {
            let body = self.body(r).await?;
            let body = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            return Err(ComfyError::Rejected(Rejection {
                status: status.as_u16(),
                body,
                queued: false,
            }));
        }
        let v = self.json_of(r).await?;
        if v["node_errors"].as_object().is_some_and(|e| !e.is_empty()) {
            return Err(ComfyError::Rejected(Rejection {
                status: status.as_u16(),
                body: v,
                queued: true,
            }));
        }
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
        let path = format!("/history/{prompt_id}");
        let r = self
            .request(&self.connections.http, reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        // How far the box's clock is behind ours, from its answer's `Date`
        // (to the second): its timestamps mean nothing here without it.
        let behind_ms = r
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
            .map(|d| (chrono::Utc::now() - d.with_timezone(&chrono::Utc)).num_milliseconds());
        let v = self.json_of(r).await?;
        let obj = v
            .as_object()
            .ok_or_else(|| ComfyError::BadResponse("history is not an object".into()))?;
        match obj.get(prompt_id) {
            None => Ok(None),
            Some(entry) => {
                let mut entry = HistoryEntry::parse(entry)?;
                entry.clock_behind_ms = behind_ms;
                Ok(Some(entry))
            }
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
        if v.get("system").is_none() {
            return Err(ComfyError::BadResponse(
                "/system_stats without system".into(),
            ));
        }
        let version = v["system"]["comfyui_version"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let dev = &v["devices"][0];
        Ok(SystemStats {
            comfyui_version: version,
            vram_total: dev["vram_total"].as_i64(),
            vram_free: dev["vram_free"].as_i64(),
        })
    }

    /// `GET /object_info`: every node class with its inputs (read within
    /// the reply cap: with many custom nodes it runs to tens of MB).
    pub async fn object_info(&self) -> Result<serde_json::Map<String, Value>, ComfyError> {
        match self.get_json_with("/object_info", true).await? {
            Value::Object(m) => Ok(m),
            _ => Err(ComfyError::BadResponse(
                "/object_info is not an object".into(),
            )),
        }
    }

    /// `GET /models/{folder}`: the model files a graph can name there
    /// (`None` for a folder this backend does not know).
    pub async fn models(&self, folder: &str) -> Result<Option<Vec<String>>, ComfyError> {
        let path = format!("/models/{folder}");
        let r = self
            .request(&self.connections.http, reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let v = self.json_of(r).await?;
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| ComfyError::BadResponse(format!("/models/{folder}: {e}")))
    }

    /// `GET /prompt`: prompts left in the queue.
    pub async fn queue_remaining(&self) -> Result<i64, ComfyError> {
        let v = self.get_json("/prompt").await?;
        v["exec_info"]["queue_remaining"].as_i64().ok_or_else(|| {
            ComfyError::BadResponse("/prompt without exec_info.queue_remaining".into())
        })
    }

    /// `GET /view` of one output, as a stream of chunks. A stalled transfer
    /// ends with an error after the request timeout; a file over the cap is
    /// refused.
    pub async fn view(&self, f: &OutputFile) -> Result<Download, ComfyError> {
        let r = self
            .request(&self.connections.downloads, reqwest::Method::GET, "/view")
            .query(&[
                ("filename", &f.filename),
                ("subfolder", &f.subfolder),
                ("type", &f.file_type),
            ])
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        if !r.status().is_success() {
            return Err(ComfyError::BadResponse(format!(
                "/view of {} answered HTTP {}",
                f.filename,
                r.status()
            )));
        }
        let cap = self.limits.max_output_bytes;
        if r.content_length().is_some_and(|n| n > cap) {
            return Err(ComfyError::BadResponse(format!(
                "{} is over {cap} bytes",
                f.filename
            )));
        }
        let content_type = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && *v != "application/octet-stream")
            .map(str::to_string);
        Ok(Download {
            response: r,
            content_type,
            received: 0,
            cap,
            timeout: self.connections.timeout,
        })
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

    /// `POST /upload/image`: stores a file in the backend's input folder,
    /// in `subfolder`, replacing a file of the same name (`overwrite`).
    /// Answers the value a loader node's input takes to read it.
    pub async fn upload(
        &self,
        subfolder: &str,
        name: &str,
        content_type: &str,
        file: tokio::fs::File,
        len: u64,
    ) -> Result<String, ComfyError> {
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let part = reqwest::multipart::Part::stream_with_length(body, len)
            .file_name(name.to_string())
            .mime_str(content_type)
            .map_err(|e| ComfyError::BadResponse(e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("subfolder", subfolder.to_string())
            .text("type", "input")
            .text("overwrite", "true");
        let r = self
            .request(
                &self.connections.downloads,
                reqwest::Method::POST,
                "/upload/image",
            )
            .multipart(form)
            .send()
            .await
            .map_err(|e| net_error(e, self.connections.timeout))?;
        if r.status() == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
            let body = self.body(r).await?;
            let said = String::from_utf8_lossy(&body[..body.len().min(300)]);
            return Err(ComfyError::UploadTooLarge(said.trim().to_string()));
        }
        let v = self.json_of(r).await?;
        uploaded_value(&v)
    }

    /// Removes prompts from the backend wherever they are: out of the queue,
    /// interrupted if running, out of the history.
    pub async fn remove(
        &self,
        prompt_ids: &[String],
        running: &[String],
    ) -> Result<(), ComfyError> {
        self.delete_queued(prompt_ids).await?;
        for p in prompt_ids.iter().filter(|p| running.contains(p)) {
            self.interrupt(p).await?;
        }
        self.delete_history(prompt_ids).await
    }
}

/// An output being downloaded from `/view`.
pub struct Download {
    response: reqwest::Response,
    /// The type the backend gave, when it gave a useful one.
    pub content_type: Option<String>,
    received: u64,
    cap: u64,
    timeout: Duration,
}

impl Download {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ComfyError> {
        let chunk = self
            .response
            .chunk()
            .await
            .map_err(|e| net_error(e, self.timeout))?;
        if let Some(c) = &chunk {
            self.received += c.len() as u64;
            if self.received > self.cap {
                return Err(ComfyError::BadResponse(format!(
                    "an output over {} bytes",
                    self.cap
                )));
            }
        }
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_behind_a_proxy_is_reached_under_its_path_and_its_socket_over_tls() {
        let connections = Connections::new(Duration::from_secs(1));
        let at = |base: &str| {
            let c = ComfyClient::sharing(
                &connections,
                base,
                reqwest::header::HeaderMap::new(),
                "c1",
                Limits::default(),
            );
            (c.base.clone(), c.ws_base.clone())
        };
        assert_eq!(
            at("https://gpu7.example.com/comfyui/"),
            (
                "https://gpu7.example.com/comfyui".into(),
                "wss://gpu7.example.com/comfyui".into()
            )
        );
        assert_eq!(
            at("http://10.0.0.5:8188"),
            ("http://10.0.0.5:8188".into(), "ws://10.0.0.5:8188".into())
        );
        let v6 = ComfyClient::new("::1", 8188, "c1", Duration::from_secs(1));
        assert_eq!(v6.base_url(), "http://[::1]:8188");
    }
}
