"""Start, wait for and stop a local vLLM OpenAI-compatible server (tests and benchmarks).

The server runs from its own venv (``.venv-vllm``, made by ``scripts/setup_vllm_venv.sh``) through
``serve_explainer.sh`` (package data beside this module), so tests, benchmarks and users start it the same way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

SERVE_SCRIPT = Path(__file__).with_name("serve_explainer.sh")


def default_vllm_venv() -> Path:
    """``$VLLM_VENV`` or ``.venv-vllm`` in the working directory (where `make vllm` puts it)."""
    return Path(os.environ.get("VLLM_VENV", ".venv-vllm")).resolve()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """One ``serve_explainer.sh`` process on 127.0.0.1; ``start()`` blocks until /v1/models answers."""

    def __init__(
        self,
        model: Path | str,
        port: int | None = None,
        served_model_name: str = "smollm2",
        venv: Path | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.model = str(model)
        self.port = port or free_port()
        self.served_model_name = served_model_name
        self.venv = venv or default_vllm_venv()
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _models_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                data = json.load(response)
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return any(m.get("id") == self.served_model_name for m in data.get("data", []))

    def start(self) -> "VLLMServer":
        """Launch the server and wait until it serves the model; raise with the log tail if not."""
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"no vLLM venv at {self.venv}: run `make vllm`")
        env = dict(os.environ, VLLM_PYTHON=str(python), SAEFORGE_PYTHON=sys.executable, SERVED_MODEL_NAME=self.served_model_name)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        start = time.perf_counter()
        self.process = subprocess.Popen(
            ["bash", str(SERVE_SCRIPT), self.model, str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        if self.log_path:
            out.close()  # type: ignore[union-attr]
        deadline = start + self.startup_timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode}{self._tail()}")
            if self._models_ready():
                self.startup_s = time.perf_counter() - start
                log.info("vLLM server on port %d ready in %.1f s", self.port, self.startup_s)
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {self.startup_timeout_s} s{self._tail()}")

    def _tail(self, n: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        lines = Path(self.log_path).read_text(errors="replace").splitlines()[-n:]
        return "\n--- server log tail ---\n" + "\n".join(lines)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (simulates a crash)."""
        self._signal(signal.SIGKILL, wait_s=30)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL after 20 s."""
        if not self._signal(signal.SIGTERM, wait_s=20):
            self._signal(signal.SIGKILL, wait_s=10)

    def _signal(self, sig: int, wait_s: float) -> bool:
        if self.process is None or self.process.poll() is not None:
            return True
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return True
        try:
            self.process.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
