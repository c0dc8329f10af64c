"""The tooling layer shared by tests/, bench/ and scripts/ (never imported by the pack itself).

    location    where ComfyUI is (COMFYUI_PATH, else the fetched 0.3.75 copy), fetching it, the import path
    comfyui     ComfyUI in this process: init_comfy, linking the pack into custom_nodes, one Executor, the
                pack's modules as ComfyUI loaded them, runs under a memory cap
    server      ComfyUI's main.py on 127.0.0.1 as a child process, queue_prompt over HTTP
    frontend    the real ComfyUI frontend in headless chromium (Playwright); the newest frontend package, fetched
                once for --front-end-root
    models      the model factory: T5 / DiT / VAE with random weights at size presets tiny, bench, full
    lora_files  LoRA files in the layouts trainers write (kohya, PEFT, diffusers, LoHa, LoKr), with their changes
    gguf_files  GGUF T5 encoder files as llama.cpp's converter writes them
    graphs      the API-format graphs the tests queue (the tiny full graph, the examples cut down for a CPU)
    fake_gpu    a GPU simulated on the CPU with ComfyUI's model management (the meta device)
    standins    tiny stand-ins under the names a workflow uses (runner, example servers)
    workflow    the workflow format: UI -> API (as the frontend's graphToPrompt), overrides, model references
    run         the headless runner's command line (./scripts/run)
    download    fetching the official model files (./scripts/download)
    make_examples, make_thumbnails   example_workflows/*.json and their thumbnails (./scripts/harness ...)
    mutation    the mutation run's pytest plugin (./scripts/mutation): the tests that start ComfyUI see mutmut's
                mutants, each session and test starts fresh

Python entry points run as modules (`python -m harness.run`); scripts/ holds the shell commands that set the
import path (PYTHONPATH) and call them, and pytest gets the same path from pyproject.toml.
"""
