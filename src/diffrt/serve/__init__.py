"""diffrt as a service: `diffrt serve` (FastAPI), the Gradio demo and a Ray Serve deployment.

All three host the same runtime (`runtime.ServeRuntime`): one worker thread owns the pipeline
(RELIABILITY #14) and a batcher in front of it groups compatible requests; each request's
initial noise comes from its own seed, so a batched answer equals the request run alone
(RELIABILITY #18), and every answer names the backend that ran it (RELIABILITY #15).

    schema.py    the request body (diffusers argument names) and its bounds
    batcher.py   bounded queue + dynamic batching in one worker thread
    batching.py  what both workers share to batch exactly: own noise, the start-up probe, answers by id
    worker.py    what touches a pixel pipeline: load, warm-up and NaN self-test, plan, run a batch
    text_to_image_worker.py  the same for a text-to-image pipeline (prompts, ControlNet)
    runtime.py   worker + batcher + metrics behind one `generate(body)`
    metrics.py   Prometheus metrics on the service's own registry
    app.py       the HTTP service (`ServeConfig`, `create_app`, `serve`)
    ui.py        the Gradio demo (`build_ui`, `launch_ui`)
    ray_app.py   the Ray Serve deployment (`build_deployment`)

Nothing here is imported by `import diffrt`; FastAPI, Gradio and Ray are optional (`pip install
diffrt[serve]`).
"""
