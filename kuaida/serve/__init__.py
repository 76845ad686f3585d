"""The OpenAI-compatible dialogue server: `kuaida serve`, or create_app(ServerConfig(...)) in Python."""
from kuaida.serve.app import ServerConfig, create_app, run_server

__all__ = ["ServerConfig", "create_app", "run_server"]
