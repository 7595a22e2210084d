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

/// The folder inputs go to in each backend's input folder.
const INPUT_SUBFOLDER: &str = "orchestrator";

impl Ctx {
    /// Uploads each input file the graph names, and each output of another
    /// job it starts from (once per backend and connection: a backend that
    /// restarted gets them again; uploading twice is harmless), and puts the
    /// names ComfyUI answered in their place.
    pub(super) async fn with_inputs(&self, mut graph: Value) -> Result<Value, DispatchError> {
        let Some(nodes) = graph.as_object_mut() else {
            return Ok(graph);
        };
        for node in nodes.values_mut() {
            let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
                continue;
            };
            for v in inputs.values_mut() {
                let Some(file) = self.file_of(v).await? else {
                    continue;
                };
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
        Ok(graph)
    }

    /// The file an input value stands for, if it names one: a stored input
    /// (`sha256:`), or another job's output (`job:`).
    async fn file_of(&self, v: &Value) -> Result<Option<FileToSend>, DispatchError> {
        let Some(s) = v.as_str() else {
            return Ok(None);
        };
        if let Some(hex) = crate::inputs::hex_of(s) {
            let missing = || DispatchError::Files(format!("input {s} is not stored here any more"));
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
        let output =
            parent_output(&job, name.as_deref(), &outputs).map_err(DispatchError::Files)?;
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
        let opened = tokio::fs::File::open(path)
            .await
            .map_err(|e| DispatchError::Files(format!("{what}: {}: {e}", path.display())))?;
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
            .await?;
        tracing::info!(file = %what, backend_id = %self.backend_id, "input uploaded");
        Ok(value)
    }
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

/// Which of a parent job's outputs a `job:` reference means: the one it
/// names, or else its first picture (a saved one before a preview, by
/// name), or else its only output (a video for a `LoadVideo`).
fn parent_output<'a>(
    job: &str,
    name: Option<&str>,
    outputs: &'a [crate::store::OutputRecord],
) -> Result<&'a crate::store::OutputRecord, String> {
    let names = || {
        let all: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        if all.is_empty() {
            "it has none".to_string()
        } else {
            format!("its outputs: {}", all.join(", "))
        }
    };
    let found = match name {
        Some(n) => outputs
            .iter()
            .find(|o| o.name == n)
            .ok_or_else(|| format!("job {job} has no output named `{n}` ({})", names()))?,
        None => outputs
            .iter()
            .filter(|o| crate::thumbs::of_a_picture(&o.content_type))
            .min_by_key(|o| (o.file_type != "output", o.name.as_str()))
            .or(match outputs {
                [only] => Some(only),
                _ => None,
            })
            .ok_or_else(|| {
                format!(
                    "job {job} has no picture among its outputs to start from ({}); name one as job:{job}/<name>",
                    names()
                )
            })?,
    };
    match found.pruned_at {
        Some(at) => Err(format!(
            "the output {} of job {job} was deleted by retention at {at}",
            found.name
        )),
        None => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::OutputRecord;

    fn output(name: &str, content_type: &str, file_type: &str) -> OutputRecord {
        OutputRecord {
            name: name.into(),
            kind: "images".into(),
            node_id: "9".into(),
            filename: name.into(),
            subfolder: String::new(),
            file_type: file_type.into(),
            size: 1,
            sha256: "0".repeat(64),
            content_type: content_type.into(),
            pruned_at: None,
        }
    }

    #[test]
    fn a_job_reference_means_the_named_output_or_the_first_saved_picture_or_the_only_one() {
        let outputs = [
            output("b_00001_.png", "image/png", "output"),
            output("a_preview_.png", "image/png", "temp"),
            output("clip_00001_.mp4", "video/mp4", "output"),
            output("a_00001_.png", "image/png", "output"),
        ];
        let pick = |name, outputs: &[OutputRecord]| {
            parent_output("j", name, outputs).map(|o| o.name.clone())
        };
        assert_eq!(pick(None, &outputs).unwrap(), "a_00001_.png");
        assert_eq!(
            pick(Some("clip_00001_.mp4"), &outputs).unwrap(),
            "clip_00001_.mp4"
        );
        let missing = pick(Some("nope.png"), &outputs).unwrap_err();
        assert!(missing.contains("no output named `nope.png`") && missing.contains("a_00001_.png"));
        // A video job's one output; two videos are for the reference to choose.
        let video = [output("clip_00001_.mp4", "video/mp4", "output")];
        assert_eq!(pick(None, &video).unwrap(), "clip_00001_.mp4");
        let two = [
            video[0].clone(),
            output("clip_00002_.mp4", "video/mp4", "output"),
        ];
        assert!(pick(None, &two)
            .unwrap_err()
            .contains("name one as job:j/<name>"));
        assert!(pick(None, &[]).unwrap_err().contains("it has none"));
        let mut pruned = video.clone();
        pruned[0].pruned_at = Some(chrono::Utc::now());
        assert!(pick(None, &pruned)
            .unwrap_err()
            .contains("deleted by retention"));
    }
}
