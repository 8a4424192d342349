"""ASGI entry point (`gunicorn main:app`) and the development server (`python main.py`)."""

import gc

import uvicorn

from app.application import create_app
from app.config import load_settings
from app.logs import configure_logging

settings = load_settings()
configure_logging(settings.log_format, settings.log_level)
app = create_app(settings)
# What start-up made (modules, models, routes) lives as long as the process: keep the garbage collector from
# walking it again on every collection, which shows up as latency spikes under load.
gc.collect()
gc.freeze()

if __name__ == "__main__":
    # log_config=None: keep the logging configured above (one request line each, JSON when asked).
    uvicorn.run(app, host=settings.bind_host, port=settings.port, log_config=None)
