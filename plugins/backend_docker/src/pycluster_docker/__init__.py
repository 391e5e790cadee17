"""pycluster-docker: run a container while the app is active on this node.

``from pycluster_docker import Docker`` and pass ``Docker("nginx:1.27", ports={80: 8080})`` to
``App(...)``; in a config file the section is ``docker:``. Works with Docker and with podman's
Docker-compatible API.
"""

from .backend import DockerBackend, DockerBackendError
from .options import Docker

__all__ = ["Docker", "DockerBackend", "DockerBackendError"]
