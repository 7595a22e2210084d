//! How a simulated backend behaves: its speed, its GPU, its models, and
//! each way of failing it can be told to show.
//!
//! Why a module of its own: every failure the simulator learns (from a
//! recorded exchange of a real ComfyUI) adds a setting here, read by the
//! part of the server it concerns; the settings are the simulator's
//! contract with the tests and the `simulate` command.

/// How the simulated backend behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Time a prompt takes, spread over its sampler steps.
    pub job_ms: u64,
    /// Chance (0 to 1) that a prompt fails at run time.
    pub fail_rate: f64,
    /// Chance (0 to 1) that a prompt crashes the server once it runs (a
    /// GPU that faults, a custom node that segfaults): it comes back empty
    /// after `crash_down_ms`, as ComfyUI restarted by its service does.
    pub crash_rate: f64,
    /// GPU memory it reports in `/system_stats`, bytes.
    pub vram_bytes: u64,
    /// A prompt whose picture (a node's `width` × `height`) is larger than
    /// this runs out of GPU memory (0: never), failing as ComfyUI does
    /// (`torch.OutOfMemoryError`): a farm whose boxes differ.
    pub oom_above_pixels: u64,
    /// Checkpoint files it "has" (for `CheckpointLoaderSimple`).
    pub checkpoints: Vec<String>,
    /// `system.comfyui_version` it reports; empty: it reports none.
    pub version: String,
    /// Delay of the answer to `POST /prompt` (the prompt is queued at once):
    /// lets crash tests stop the orchestrator between submit and answer.
    pub prompt_delay_ms: u64,
    /// A submit is queued, and answered, only after this long, whether or
    /// not the client still waits (aiohttp runs a handler to its end).
    pub accept_delay_ms: u64,
    /// Time `/view` takes to send a file (it trickles in ten parts): lets
    /// crash tests stop the orchestrator while it collects outputs.
    pub view_delay_ms: u64,
    /// `/view` answers `500` (a backend whose output disk is gone): lets
    /// tests check that uncollectable outputs end the attempt.
    pub view_fails: bool,
    /// `/view` sends the headers and the first bytes, then stalls this long
    /// (a transfer that hangs mid-way).
    pub view_stall_ms: u64,
    /// Largest request body it takes (`--max-upload-size`), as it says in
    /// `GET /features` and its socket's `feature_flags`; a larger one is a
    /// `413`, as aiohttp answers it.
    pub max_body_bytes: usize,
    /// A proxy in front of it (nginx) refuses an upload whose body is larger
    /// than this with its own `413` page (0: no proxy); the server's own
    /// limit, which it says, is larger.
    pub proxy_max_body_bytes: usize,
    /// How long a crash keeps the server down before it comes back empty.
    pub crash_down_ms: u64,
    /// The first N interrupts aimed at a running prompt are lost (ComfyUI
    /// loses one that lands before the prompt really starts).
    pub ignore_interrupts: u32,
    /// Extra time a prompt takes when its checkpoint differs from the last
    /// one's (loading a model into VRAM).
    pub load_ms: u64,
    /// `GET /queue` answers only after this long (a box too loaded to
    /// answer at once), with the queue as it is then.
    pub queue_delay_ms: u64,
    /// `POST /upload/image` answers only after this long (a large picture
    /// on a slow link), with the file stored then.
    pub upload_delay_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            job_ms: 200,
            fail_rate: 0.0,
            crash_rate: 0.0,
            vram_bytes: 25_276_502_016,
            oom_above_pixels: 0,
            checkpoints: vec!["sd_xl_base_1.0.safetensors".into()],
            version: "0.3.64".into(),
            prompt_delay_ms: 0,
            accept_delay_ms: 0,
            view_delay_ms: 0,
            view_fails: false,
            view_stall_ms: 0,
            max_body_bytes: 100 * 1024 * 1024,
            proxy_max_body_bytes: 0,
            crash_down_ms: 300,
            ignore_interrupts: 0,
            load_ms: 0,
            queue_delay_ms: 0,
            upload_delay_ms: 0,
        }
    }
}
