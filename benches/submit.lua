-- wrk script: POST a small image_blur manifest, each with its own metadata.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = '{"workflow_id":"image_blur","parameters":{"width":64},"metadata":{"shot":"sh' .. n .. '"}}'
  return wrk.format(nil, "/api/job", nil, body)
end
