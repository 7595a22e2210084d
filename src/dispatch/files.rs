//! The files a job needs on its backend before it runs: the stored inputs
//! its graph names (`sha256:`) and the outputs of other jobs it starts
//! from (`job:`), uploaded once per backend and connection and named there
//! by their SHA-256.
//!
//! Why apart from the attempt's steps: which file a value means (a parent
//! job's first picture, its only output, one by name) and how it reaches a
//! box are rules of their own, which grow with the kinds of input; the
//! attempt only asks for the graph with the backend's names in place.

use serde_json::Value;

use super::attempt::Ctx;
use super::DispatchError;
use crate::comfy::ComfyError;

/// The folder inputs go to in each backend's input folder.
const INPUT_SUBFOLDER: &str = "orchestrator";

impl Ctx {
    /// Uploads each input file the graph names, and each output of another
    /// job it starts from (once per backend and connection: a backend that
    /// restarted gets them again; uploading twice is harmless), and puts the
    /// names ComfyUI answered in their place. Also says where it put them.
    pub(super) async fn with_inputs(
        &self,
        mut graph: Value,
    ) -> Result<(Value, Vec<Placed>), DispatchError> {
        let mut placed = Vec::new();
        let Some(nodes) = graph.as_object_mut() else {
            return Ok((graph, placed));
        };
        for (node_id, node) in nodes.iter_mut() {
            let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
                continue;
            };
            for (input, v) in inputs.iter_mut() {
                let Some(file) = self.file_of(v).await? else {
                    continue;
                };
                placed.push(Placed {
                    node: node_id.clone(),
                    input: input.clone(),
                    hex: file.hex.clone(),
                    value: v.clone(),
                });
                let known = self
                    .uploaded
                    .lock()
                    .expect("uploads")
                    .get(&file.hex)
                    .cloned();
                let value = match known {
                    Some(value) => value,
                    None => {
                        let value = self.upload(&file).await?;
                        self.uploaded
                            .lock()
                            .expect("uploads")
                            .insert(file.hex, value.clone());
                        value
                    }
                };
                *v = Value::String(value);
            }
        }
        Ok((graph, placed))
    }

    /// The graph with the values `placed` took put back (the job's own
    /// references), and the files ComfyUI refused on their inputs
    /// forgotten as uploaded: the box no longer has them (its input folder
    /// emptied while it ran), and [`Ctx::with_inputs`] uploads them again.
    /// `None` when it refused none of them.
    pub(super) fn refused_files(
        &self,
        mut graph: Value,
        placed: &[Placed],
        refused: &[(String, String)],
    ) -> Option<Value> {
        let gone: Vec<&Placed> = placed
            .iter()
            .filter(|p| refused.iter().any(|(n, i)| *n == p.node && *i == p.input))
            .collect();
        if gone.is_empty() {
            return None;
        }
        let mut uploaded = self.uploaded.lock().expect("uploads");
        for p in &gone {
            uploaded.remove(&p.hex);
        }
        for p in placed {
            graph[&p.node]["inputs"][&p.input] = p.value.clone();
        }
        Some(graph)
    }

    /// The file an input value stands for, if it names one: a stored input
    /// (`sha256:`), or another job's output (`job:`).
    async fn file_of(&self, v: &Value) -> Result<Option<FileToSend>, DispatchError> {
        let Some(s) = v.as_str() else {
            return Ok(None);
        };
        if let Some(hex) = crate::inputs::hex_of(s) {
            let missing = || DispatchError::Gone(format!("input {s} is not stored here any more"));
            let record = self.shared.store.input(s).await?.ok_or_else(missing)?;
            return Ok(Some(FileToSend {
                hex: hex.to_string(),
                content_type: record.content_type,
                size: record.size,
                path: self.shared.inputs_dir.join(hex),
                what: format!("input {s}"),
            }));
        }
        let Some((job, name)) = crate::inputs::job_ref(s) else {
            return Ok(None);
        };
        let outputs = self.shared.store.job_outputs(&job).await?;
        let output = crate::inputs::output_of_job(&job, name.as_deref(), &outputs)
            .map_err(DispatchError::Gone)?;
        Ok(Some(FileToSend {
            hex: output.sha256.clone(),
            content_type: output.content_type.clone(),
            size: output.size,
            path: self.shared.outputs_dir.join(&job).join(&output.name),
            what: format!("output {} of job {job}", output.name),
        }))
    }

    async fn upload(&self, file: &FileToSend) -> Result<String, DispatchError> {
        let (what, path) = (&file.what, &file.path);
        let opened = tokio::fs::File::open(path).await.map_err(|e| {
            let said = format!("{what}: {}: {e}", path.display());
            // Its record stands but its file is gone (removed from the data
            // folder by hand): no attempt will find it. Other errors may pass.
            match e.kind() {
                std::io::ErrorKind::NotFound => DispatchError::Gone(said),
                _ => DispatchError::Files(said),
            }
        })?;
        let name = format!(
            "{}.{}",
            file.hex,
            crate::inputs::extension(&file.content_type)
        );
        let value = self
            .client
            .upload(
                INPUT_SUBFOLDER,
                &name,
                &file.content_type,
                opened,
                file.size as u64,
            )
            .await
            .map_err(|e| match e {
                ComfyError::UploadTooLarge(said) => DispatchError::TooLarge(format!(
                    "backend {} refused {what} ({}) as larger than it takes (HTTP 413: {said}): \
                     start its ComfyUI with a larger --max-upload-size (in MB, 100 by default), or \
                     raise the limit of a proxy in front of it (nginx: client_max_body_size)",
                    self.backend_id,
                    crate::inputs::megabytes(file.size)
                )),
                e => e.into(),
            })?;
        tracing::info!(file = %what, backend_id = %self.backend_id, "input uploaded");
        Ok(value)
    }
}

/// Where [`Ctx::with_inputs`] put a file's name on the box, and what the
/// job's graph said there.
pub(super) struct Placed {
    node: String,
    input: String,
    hex: String,
    value: Value,
}

/// A file a job needs on the backend before it runs, named there by its
/// SHA-256 (the same bytes, whichever way they came, are sent once).
struct FileToSend {
    hex: String,
    content_type: String,
    size: i64,
    path: std::path::PathBuf,
    /// What it is, for errors and logs.
    what: String,
}
