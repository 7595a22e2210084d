-- The largest upload each backend takes, in bytes, as its ComfyUI says
-- (`max_upload_size` of its answer to a socket's `feature_flags`: its
-- `--max-upload-size`, 100 MB by default); NULL until it has said.
--
-- Why: a job that starts from a file larger than that (a video, a large
-- plate) is refused there with a `413` after the whole upload, each
-- attempt; on a farm whose boxes were started with different limits the
-- job is left to one that takes it (`lease::bar_reason`).
ALTER TABLE backends ADD COLUMN max_upload_bytes INTEGER;
