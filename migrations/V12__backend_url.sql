-- Where a backend's ComfyUI answers, as the config gives it: a box behind a
-- proxy (`url: https://gpu7.example.com/comfyui`) showed only its host and
-- port 443, hiding its scheme and path from the operator. Written at every
-- start from the config (`http://host:port` when no `url` is given); null
-- for a backend no longer configured since before this migration.
ALTER TABLE backends ADD COLUMN url TEXT;
