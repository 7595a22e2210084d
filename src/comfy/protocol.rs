//! What ComfyUI's answers and messages mean, as typed values.
//!
//! Why apart from the client: these are the rules read off ComfyUI's own
//! source and the recorded exchanges (`tests/fixtures/comfyui/`), such as
//! "an entry with an `execution_error` message is not a success whatever its
//! `status_str` says". Keeping them here, next to nothing else, makes them
//! one place to check against a new ComfyUI version; dispatch only ever sees
//! the typed values.
//!
//! Over 600 lines only with its unit tests (they read the rules beside
//! their code): the code is under 600, of one concern, what ComfyUI's answers mean.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::ComfyError;

/// Oldest ComfyUI this orchestrator drives: 0.3.56. Client-chosen prompt
/// ids came in 0.3.44, and an interrupt aimed at one prompt id in 0.3.56;
/// before that a cancel would interrupt whatever runs.
pub const MIN_VERSION: (u32, u32, u32) = (0, 3, 56);

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

/// Why a backend of this version cannot be driven, or `None` if it can.
pub fn version_problem(version: Option<&str>) -> Option<String> {
    let Some(v) = version else {
        return Some(
            "/system_stats does not report system.comfyui_version; an orchestrator needs 0.3.56 \
             or newer (client-chosen prompt ids, interrupts aimed at one prompt)"
                .into(),
        );
    };
    match parse_version(v) {
        Some(p) if p >= MIN_VERSION => None,
        Some(_) => Some(format!(
            "ComfyUI {v} is older than 0.3.56, which client-chosen prompt ids and interrupts \
             aimed at one prompt need; upgrade it"
        )),
        None => Some(format!("cannot read ComfyUI's version `{v}`")),
    }
}

/// One sentence from a refusal body of `POST /prompt`: the error and each
/// node's errors.
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

/// ComfyUI refused a prompt: a `400` (no output validates), a `200` whose
/// `node_errors` name broken outputs (ComfyUI then runs only the rest), or
/// another `4xx` (a body over `--max-upload-size`, a route missing).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The HTTP status.
    pub status: u16,
    /// The body, as JSON when it was JSON, else as a JSON string.
    pub body: Value,
    /// ComfyUI queued the prompt anyway (a `200` with `node_errors`): it
    /// must be removed there.
    pub queued: bool,
}

impl Rejection {
    /// A sentence for people.
    pub fn summary(&self) -> String {
        match (&self.body, self.status) {
            (Value::Object(_), 200) => format!(
                "part of the graph does not validate (ComfyUI would run only the rest): {}",
                rejection_summary(&self.body)
            ),
            (Value::Object(_), 400) => rejection_summary(&self.body),
            (Value::Object(_), s) => format!("HTTP {s}: {}", rejection_summary(&self.body)),
            (Value::String(text), s) => format!("HTTP {s}: {}", clip(text, 300)),
            (other, s) => format!("HTTP {s}: {}", clip(&other.to_string(), 300)),
        }
    }

    /// ComfyUI's `error` object, when it sent one.
    pub fn error(&self) -> Value {
        self.body.get("error").cloned().unwrap_or(Value::Null)
    }

    /// ComfyUI's per-node errors, when it sent them.
    pub fn node_errors(&self) -> Value {
        self.body.get("node_errors").cloned().unwrap_or(Value::Null)
    }

    /// The inputs its per-node errors name, as (node id, input name): a
    /// loader's file that is not in the box's input folder is refused on
    /// its input (`Invalid image file: …`, recorded in
    /// `upload_loadimage.json`).
    pub fn refused_inputs(&self) -> Vec<(String, String)> {
        let mut named = Vec::new();
        let nodes = self.body.get("node_errors").and_then(Value::as_object);
        for (node, e) in nodes.into_iter().flatten() {
            for err in e["errors"].as_array().into_iter().flatten() {
                if let Some(input) = err["extra_info"]["input_name"].as_str() {
                    named.push((node.clone(), input.to_string()));
                }
            }
        }
        named
    }
}

/// At most `n` bytes of `s`, on a character boundary.
pub(crate) fn clip(s: &str, n: usize) -> &str {
    &s[..s.floor_char_boundary(n)]
}

/// What a loader node's input takes to read an uploaded file, from the
/// answer of `/upload/image` (`{name, subfolder, type}`): `SUBFOLDER/NAME`,
/// as `LoadImage` resolves it (it validates that input itself, so the
/// subfolder need not be in its listed options).
pub fn uploaded_value(answer: &Value) -> Result<String, ComfyError> {
    let name = answer["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ComfyError::BadResponse(format!("/upload/image answered without a name: {answer}"))
        })?;
    Ok(
        match answer["subfolder"].as_str().filter(|s| !s.is_empty()) {
            Some(sub) => format!("{sub}/{name}"),
            None => name.to_string(),
        },
    )
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

/// A run-time failure, as `execution_error` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionError {
    /// The node that raised.
    pub node_id: String,
    /// Its class.
    pub node_type: String,
    /// The Python exception's class.
    pub exception_type: String,
    /// Its message.
    pub exception_message: String,
    /// The traceback lines.
    pub traceback: Value,
}

impl ExecutionError {
    fn parse(d: &Value) -> ExecutionError {
        let s = |k: &str| d[k].as_str().unwrap_or("?").to_string();
        ExecutionError {
            node_id: s("node_id"),
            node_type: s("node_type"),
            exception_type: d["exception_type"].as_str().unwrap_or("error").to_string(),
            exception_message: d["exception_message"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_string(),
            traceback: d["traceback"].clone(),
        }
    }
}

/// How a finished prompt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptEnd {
    /// It ran to its end.
    Success,
    /// A node raised.
    Error(ExecutionError),
    /// It was interrupted, at this node.
    Interrupted {
        /// The node it stopped at.
        node_id: String,
    },
    /// Neither success nor a message saying why (the status text).
    Other(String),
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
    /// How far the box's clock was behind ours when it answered (from the
    /// answer's `Date`), when it said.
    pub clock_behind_ms: Option<i64>,
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
                        let Some(filename) = f["filename"].as_str() else {
                            continue;
                        };
                        outputs.push(OutputFile {
                            node_id: node_id.clone(),
                            kind: kind.clone(),
                            filename: filename.to_string(),
                            subfolder: f["subfolder"].as_str().unwrap_or("").to_string(),
                            // ComfyUI's /view reads a missing type as `output`.
                            file_type: f["type"].as_str().unwrap_or("output").to_string(),
                        });
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
            clock_behind_ms: None,
        })
    }

    /// When the prompt started and ended on the box, on our clock: the
    /// timestamps of its `execution_start` and of its last message (a
    /// success, an error, an interrupt), moved by how far the box's clock
    /// is behind ours. `None` where ComfyUI gave no time or its answer no
    /// `Date`.
    pub fn run_times(&self) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let Some(behind) = self.clock_behind_ms else {
            return (None, None);
        };
        let at = |kinds: &[&str]| {
            let ms = self
                .messages
                .iter()
                .rev()
                .filter(|(k, _)| kinds.contains(&k.as_str()))
                .find_map(|(_, d)| d["timestamp"].as_i64())?;
            DateTime::from_timestamp_millis(ms.checked_add(behind)?)
        };
        (
            at(&["execution_start"]),
            at(&[
                "execution_success",
                "execution_error",
                "execution_interrupted",
            ]),
        )
    }

    /// The data of the first message of this kind.
    pub fn message(&self, kind: &str) -> Option<&Value> {
        self.messages
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, d)| d)
    }

    /// How the prompt ended. An `execution_error` or `execution_interrupted`
    /// message wins over `status_str`, which ComfyUI does not reset on every
    /// path.
    pub fn end(&self) -> PromptEnd {
        if let Some(d) = self.message("execution_error") {
            return PromptEnd::Error(ExecutionError::parse(d));
        }
        if let Some(d) = self.message("execution_interrupted") {
            return PromptEnd::Interrupted {
                node_id: d["node_id"].as_str().unwrap_or("?").to_string(),
            };
        }
        if self.status_str == "success" || self.completed {
            PromptEnd::Success
        } else {
            PromptEnd::Other(self.status_str.clone())
        }
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

/// A live preview frame of a running prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// `jpeg` or `png`.
    pub format: &'static str,
    /// The prompt it belongs to, when the frame says (newer servers).
    pub prompt_id: Option<String>,
    /// The image bytes.
    pub image: Bytes,
}

impl Preview {
    /// Decodes a binary frame: 4 bytes big-endian event type, then for type
    /// 1 a 4-byte format (1 JPEG, 2 PNG) and the image, for type 4 a 4-byte
    /// length, that much JSON metadata (`image_type`, `prompt_id`) and the
    /// image. Anything else (text frames, unknown types) is `None`.
    pub fn decode(frame: &Bytes) -> Option<Preview> {
        let word = |at: usize| -> Option<u32> {
            let b = frame.get(at..at + 4)?;
            Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        match word(0)? {
            1 => Some(Preview {
                format: if word(4)? == 2 { "png" } else { "jpeg" },
                prompt_id: None,
                image: frame.slice(8..),
            }),
            4 => {
                let len = word(4)? as usize;
                let meta_end = 8usize.checked_add(len)?;
                let meta: Value = serde_json::from_slice(frame.get(8..meta_end)?).ok()?;
                Some(Preview {
                    format: if meta["image_type"] == "image/png" {
                        "png"
                    } else {
                        "jpeg"
                    },
                    prompt_id: meta["prompt_id"].as_str().map(str::to_string),
                    image: frame.slice(meta_end..),
                })
            }
            _ => None,
        }
    }
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
    /// The server's answer to our `feature_flags`: this socket is the one
    /// ComfyUI sends our prompts' messages to. It says the largest upload
    /// the server takes (`max_upload_size`, bytes: its `--max-upload-size`).
    FeatureFlags {
        /// Bytes, when it says.
        max_upload_bytes: Option<i64>,
    },
    /// A binary frame (a preview image, or something to skip).
    Preview(Bytes),
    /// The answer to our ping: the connection is alive.
    Pong,
    /// Anything else (`progress_state`, `execution_cached`, ...).
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
        let with_pid = |make: fn(String, Value) -> WsEvent| match pid() {
            Some(p) => make(p, d.clone()),
            None => WsEvent::Other(kind.clone()),
        };
        match kind.as_str() {
            "status" => WsEvent::Status {
                queue_remaining: d["status"]["exec_info"]["queue_remaining"].as_i64(),
            },
            "execution_start" => with_pid(|prompt_id, _| WsEvent::ExecutionStart { prompt_id }),
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
            "execution_success" => with_pid(|prompt_id, _| WsEvent::ExecutionSuccess { prompt_id }),
            "execution_error" => {
                with_pid(|prompt_id, data| WsEvent::ExecutionError { prompt_id, data })
            }
            "execution_interrupted" => {
                with_pid(|prompt_id, data| WsEvent::ExecutionInterrupted { prompt_id, data })
            }
            "feature_flags" => WsEvent::FeatureFlags {
                // A float (MB times 1024 times 1024): 1048576.0.
                max_upload_bytes: d["max_upload_size"]
                    .as_f64()
                    .filter(|b| b.is_finite() && *b > 0.0)
                    .map(|b| b.min(i64::MAX as f64) as i64),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_prompts_run_times_are_moved_onto_our_clock() {
        // ComfyUI 0.3.64's recorded history of a cached prompt.
        let rec: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/comfyui/success_cached.json"
        ))
        .unwrap();
        let body = &rec["exchange"][10]["response"]["body"];
        let (_, raw) = body.as_object().unwrap().iter().next().unwrap();
        let mut entry = HistoryEntry::parse(raw).unwrap();
        assert_eq!(entry.run_times(), (None, None), "no Date: no times");
        // The box's clock an hour behind ours: its times are an hour later here.
        entry.clock_behind_ms = Some(3_600_000);
        let (started, ended) = entry.run_times();
        let ms = |t: Option<DateTime<Utc>>| t.unwrap().timestamp_millis();
        assert_eq!(ms(started), 1_795_565_788_673 + 3_600_000);
        assert_eq!(ms(ended), 1_795_565_788_674 + 3_600_000);
        // An end with no time (an old ComfyUI): none.
        entry.messages.retain(|(k, _)| k != "execution_success");
        assert_eq!(entry.run_times().1, None);
    }

    #[test]
    fn versions_parse_and_old_or_silent_servers_are_refused() {
        assert_eq!(parse_version("0.3.64"), Some((0, 3, 64)));
        assert_eq!(parse_version("v0.3.44-rc1"), Some((0, 3, 44)));
        assert_eq!(parse_version("garbage"), None);
        assert!(version_problem(Some("0.3.64")).is_none());
        assert!(version_problem(Some("0.3.56")).is_none());
        assert!(version_problem(Some("0.3.55")).unwrap().contains("0.3.56"));
        assert!(version_problem(None).unwrap().contains("does not report"));
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

    #[test]
    fn an_error_message_wins_over_a_success_status() {
        let entry = HistoryEntry::parse(&json!({
            "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": ""}]}},
            "status": {"status_str": "success", "completed": true, "messages": [
                ["execution_start", {}],
                ["execution_interrupted", {"node_id": "3"}]
            ]}
        }))
        .unwrap();
        assert_eq!(
            entry.end(),
            PromptEnd::Interrupted {
                node_id: "3".into()
            }
        );
        assert_eq!(entry.outputs[0].file_type, "output", "no type means output");
    }

    #[test]
    fn preview_frames_decode_both_layouts_and_skip_the_rest() {
        let mut one = vec![0, 0, 0, 1, 0, 0, 0, 2];
        one.extend_from_slice(b"PNGDATA");
        let p = Preview::decode(&Bytes::from(one)).unwrap();
        assert_eq!((p.format, &p.image[..]), ("png", &b"PNGDATA"[..]));
        let meta = br#"{"image_type":"image/jpeg","prompt_id":"p1"}"#;
        let mut four = vec![0, 0, 0, 4];
        four.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        four.extend_from_slice(meta);
        four.extend_from_slice(b"JPG");
        let p = Preview::decode(&Bytes::from(four)).unwrap();
        assert_eq!(p.prompt_id.as_deref(), Some("p1"));
        assert_eq!((p.format, &p.image[..]), ("jpeg", &b"JPG"[..]));
        assert!(Preview::decode(&Bytes::from_static(&[0, 0, 0, 3, 1])).is_none());
        assert!(Preview::decode(&Bytes::from_static(&[0, 0, 0, 4, 255, 255, 255, 255])).is_none());
        assert!(Preview::decode(&Bytes::from_static(&[0, 0])).is_none());
    }
}
