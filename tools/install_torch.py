"""Install PyTorch into the current interpreter without ever replacing a user's build.

- torch already importable: keep it (CPU or CUDA, whatever the user chose).
- an NVIDIA GPU is visible (nvidia-smi): install the default PyPI build (CUDA).
- otherwise: install the CPU build, from PyTorch's CPU index when it is reachable,
  else `torch==2.13.0` from the configured indexes (a local CPU wheel on our CI machines).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys

CPU_INDEX_HOST = "download.pytorch.org"
CPU_VERSION = "2.13.0"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def _reachable(host: str) -> bool:
    try:
        socket.setdefaulttimeout(3)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def main() -> None:
    if importlib.util.find_spec("torch") is not None:
        import torch

        print(f"keeping the installed torch {torch.__version__}")
        return
    if shutil.which("nvidia-smi"):
        _pip("torch>=2.1")
    elif _reachable(CPU_INDEX_HOST):
        _pip(f"torch=={CPU_VERSION}", "--index-url", f"https://{CPU_INDEX_HOST}/whl/cpu")
    else:
        _pip(f"torch=={CPU_VERSION}")


if __name__ == "__main__":
    main()
