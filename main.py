"""ASGI entry point (`gunicorn main:app`) and the development server (`python main.py`)."""

import logging

import uvicorn

from app.application import create_app
from app.config import load_settings

settings = load_settings()
app = create_app(settings)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    uvicorn.run(app, host=settings.host, port=settings.port)
