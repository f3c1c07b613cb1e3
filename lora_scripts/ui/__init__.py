"""`lora-scripts ui`: a local web app over the same engine as the CLI.

The server (FastAPI, `app.py`) renders nothing itself: plain HTML/JS in `static/` calls a JSON
API. Training and labelling run as separate processes started by `jobs.py` through
`wrapper.py`, so a closed browser or a crashed UI never stops a run; the queue and its history
live in SQLite (`store.py`). Config forms come from the pydantic schema (`form.py`), live
numbers from the run's TensorBoard files and log (`live.py`).
"""
