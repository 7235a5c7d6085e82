"""The screening service: a web page and an HTTP API over one model DIR or an ensemble.

    python -m sipak_jax.serve --checkpoint=workdirs/demo            # http://127.0.0.1:8000/
    python -m sipak_jax.serve --checkpoint=A,B,C --host=0.0.0.0 --token_file=token.txt

Modules: `engine` (the model in one worker thread, requests gathered into compiled batches),
`uploads` (multipart bodies and zips in memory, under limits), `app` (routes, token, security
headers), `batch_report` (the exported HTML page), `__main__` (flags, checks, uvicorn).
`static/` holds the page (HTML, CSS, one script file; no external asset, no inline script).
"""
