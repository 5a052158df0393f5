-- The spec's creation SQL as one statement (one round trip) with the mix's row (issue 26):
-- a task row requiring one of five capabilities, a payload of about 300 bytes, and its
-- first history row. pgbench script; the load bench runs the same file.
\set n random(1, 1000000000)
WITH t AS (
  INSERT INTO tasks (trace_id, task_type, title, payload, required_capability, priority, max_retries, created_by, status)
  VALUES (gen_random_uuid(), 'document', 'document ' || (:n)::text,
          jsonb_build_object('document', 's3://mesh-documents/2026/12/' || lpad((:n)::text, 12, '0') || '/original.pdf',
                             'language', 'en', 'pages', 1 + (:n)::int % 40, 'requested_by', 'droplet-5',
                             'options', '{"ocr_engine": "tesseract-5", "dpi": 300, "deskew": true, "notes": "a few hundred bytes, as the mesh''s tasks carry"}'::jsonb,
                             'callback', 'https://droplet-5.mesh.example/results/' || (:n)::text),
          (ARRAY['verify', 'ocr', 'translate', 'summarize', 'classify'])[1 + (:n)::int % 5],
          1 + (:n)::int % 10, 3, '5', 'pending')
  ON CONFLICT (trace_id) DO NOTHING
  RETURNING id
)
INSERT INTO task_state_history (task_id, from_status, to_status, changed_by, reason)
SELECT id, NULL, 'pending', 'droplet-5', 'created' FROM t;
