"""Operating a Triton endpoint: the model repository's export and swap, the tritonserver process,
and the client (`candgen serving`, `candgen serve`, `candgen query`). Runs on the platform, never
inside Triton."""
