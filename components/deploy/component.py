"""Put an exported version where Triton serves from and switch a running server to it."""

from kfp import dsl
from kfp.dsl import Artifact, Input

from candgen.images import PLATFORM_IMAGE


@dsl.component(base_image=PLATFORM_IMAGE)
def deploy(
    repository: Input[Artifact],
    target_repository: str,
    triton_url: str = "",
    protocol: str = "grpc",
) -> str:
    """Copies the exported version into ``target_repository`` (the folder or volume Triton
    serves) and, with ``triton_url``, loads it into the running server without downtime;
    returns what was done. ``triton_url`` is the server's gRPC endpoint unless ``protocol`` says
    http (a load asked over HTTP stalls the HTTP requests that share its server thread). Without
    ``triton_url`` a server polling the repository (k8s/) picks the version up by itself.
    """
    from pathlib import Path

    from candgen.endpoint.export import install, swap

    version = install(Path(repository.path), Path(target_repository))
    if not triton_url:
        return f"v{version} installed in {target_repository}; no server to switch (triton_url)"
    swap(triton_url, Path(target_repository), protocol)
    return f"v{version} installed in {target_repository} and serving at {triton_url}"
